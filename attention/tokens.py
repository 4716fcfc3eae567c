"""Where the words of a prompt sit among its CLIP tokens.

A CLIP prompt is [start, tokens of word 1, tokens of word 2, ..., end, padding...]; a word may
take several BPE tokens ("hippopotamus" -> 3). Positions here are indices into that sequence.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MAX_TOKENS = 77


class PromptError(ValueError):
    """A prompt the edit cannot use; the message says which word or limit and what to do."""


@dataclass(frozen=True)
class Prompt:
    text: str
    words: tuple[str, ...]
    spans: tuple[tuple[int, ...], ...]  # token positions of each word (start token is position 0)
    ids: tuple[int, ...]  # token ids of the words, in order, without start/end tokens

    @property
    def end(self) -> int:
        """Position of the end token."""
        return len(self.ids) + 1

    def positions(self, words: str) -> list[int]:
        """Token positions of the given space-separated word(s); each must occur in the prompt."""
        out: list[int] = []
        for word in split_words(words):
            hits = [i for i, w in enumerate(self.words) if _norm(w) == _norm(word)]
            if not hits:
                raise PromptError(f"the word '{word}' is not in the prompt '{self.text}'")
            for i in hits:
                out.extend(self.spans[i])
        return sorted(set(out))


def _norm(word: str) -> str:
    return word.strip(".,;:!?\"'()").lower()


def split_words(text: str) -> list[str]:
    return [w for w in text.replace(",", " ").split() if w]


def parse_prompt(text: str, tokenize_word: Callable[[str], list[int]], max_tokens: int = MAX_TOKENS) -> Prompt:
    """Tokenise word by word (CLIP's BPE never merges across spaces, so this equals the whole)."""
    words = tuple(text.split())
    spans, ids, pos = [], [], 1
    for word in words:
        word_ids = tokenize_word(word)
        spans.append(tuple(range(pos, pos + len(word_ids))))
        ids.extend(word_ids)
        pos += len(word_ids)
    if len(ids) + 2 > max_tokens:
        raise PromptError(f"the prompt has {len(ids)} tokens; attention editing supports at most "
                          f"{max_tokens - 2} (one CLIP chunk): shorten the prompt")
    return Prompt(text, words, tuple(spans), tuple(ids))
