"""Where the words of a prompt sit among the tokens that reach the attention.

Positions come from the very tokenisation that makes the conditioning (ComfyUI's
`tokenize_with_weights`): chunks of [start, content..., end, padding...], 77 tokens each for
CLIP, concatenated, so a prompt of k chunks has 77k positions; T5 (Flux, SD3) gives one chunk of
[content..., end, padding...] with no start token. Weight syntax, nested and escaped
parentheses and `embedding:` names are ComfyUI's business; this module only reads its output.

A word is a whitespace-separated piece of the prompt, as in P2P's reference code. Its tokens are
split into its `core` and the punctuation tokens at its edges ("tiger." -> core 'tiger' plus '.'),
so that naming a word addresses its word tokens only and a swap maps the punctuation one to one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

CHUNK = 77  # CLIP's tokens per chunk


class PromptError(ValueError):
    """A prompt the edit cannot use; the message says which word or limit and what to do."""


@dataclass(frozen=True)
class Word:
    text: str  # the word without its edge punctuation, lower case ("tiger" for "Tiger.")
    positions: tuple[int, ...]  # all its tokens
    core: tuple[int, ...]  # its tokens without leading/trailing punctuation (all, for a punctuation word)


@dataclass(frozen=True)
class Prompt:
    text: str
    keys: tuple  # per position: the token id (an embedding vector's tokens get a string key)
    words: tuple[Word, ...]
    starts: tuple[int, ...]  # start-token position of each chunk
    tails: tuple[tuple[int, ...], ...]  # end-token and padding positions of each chunk

    @property
    def length(self) -> int:
        """Tokens of the conditioning (CLIP: 77 per chunk)."""
        return len(self.keys)

    @property
    def map_tokens(self) -> int:
        """How many leading positions can hold a word: the token maps kept for local blend and
        previews stop there (the padding's maps are never read)."""
        return max(self.content, default=0) + 1

    @property
    def content(self) -> tuple[int, ...]:
        """Positions of the words' tokens, in order."""
        return tuple(p for w in self.words for p in w.positions)

    def has(self, word: str) -> bool:
        return any(w.text == normalise(word) for w in self.words)

    def positions(self, words: str) -> list[int]:
        """Core token positions of the named word(s); each must occur in the prompt."""
        out: list[int] = []
        for name in split_words(words):
            hits = [w for w in self.words if w.text == normalise(name)]
            if not hits:
                raise PromptError(f"the word '{name}' is not in the prompt '{self.text}'")
            for w in hits:
                out.extend(w.core)
        return sorted(set(out))


def normalise(word: str) -> str:
    return word.strip(".,;:!?\"'()[]{}").lower()


def split_words(text: str) -> list[str]:
    return [w for w in text.replace(",", " ").split() if normalise(w)]


def is_punctuation(piece: str) -> bool:
    return not any(ch.isalnum() for ch in piece)


@dataclass(frozen=True)
class Piece:
    """One pre-token of the tokenizer (CLIP: up to a token ending in '</w>')."""
    positions: tuple[int, ...]
    text: str
    new_word: bool  # whitespace (or a weight group's edge) before it


def build_prompt(text: str, length: int, keys: Sequence, pieces: Sequence[Piece],
                 starts: Sequence[int], tails: Sequence[Sequence[int]]) -> Prompt:
    """Group pre-tokens into whitespace words and split off their edge punctuation."""
    groups: list[list[Piece]] = []
    for piece in pieces:
        if piece.new_word or not groups:
            groups.append([])
        groups[-1].append(piece)
    words = []
    for group in groups:
        marks = [is_punctuation(p.text) for p in group]
        first = next((i for i, m in enumerate(marks) if not m), 0)
        last = max((i for i, m in enumerate(marks) if not m), default=len(group) - 1)
        core = group[first:last + 1]
        words.append(Word("".join(p.text for p in core).lower(),
                          tuple(q for p in group for q in p.positions), tuple(q for p in core for q in p.positions)))
    assert len(keys) == length
    return Prompt(text, tuple(keys), tuple(words), tuple(starts), tuple(tuple(t) for t in tails))


def sentencepiece_texts(chunk: Sequence[tuple], piece: Callable[[int], str | None]) -> list[str | None]:
    """T5's SentencePiece pieces ('▁red', 'dish', '.') written as CLIP's pre-token strings ('red',
    'dish</w>', '.</w>'): a piece ends a pre-token before the next '▁' piece, a special token or
    punctuation, so words and their edge punctuation come out as they do for CLIP."""
    raw = [piece(t) if w != 0 and isinstance(t, int) else None for t, _, w in chunk]
    out: list[str | None] = []
    for i, s in enumerate(raw):
        if s is None:
            out.append(None)
            continue
        core = s.lstrip("\u2581")
        nxt = raw[i + 1] if i + 1 < len(raw) else None
        nxt_core = nxt.lstrip("\u2581") if nxt is not None else ""
        ends = (nxt is None or nxt.startswith("\u2581") or (core != "" and is_punctuation(core))
                or (nxt_core != "" and is_punctuation(nxt_core)))
        out.append(core + ("</w>" if ends else ""))
    return out


def prompt_from_tokens(text: str, chunks: Sequence[Sequence[tuple]], piece_text: Callable[[object], str | None],
                       plain: str, sentencepiece: bool = False) -> Prompt:
    """A prompt from ComfyUI's `tokenize_with_weights(text, return_word_ids=True)` output.

    chunks: lists of (token, weight, word id); word id 0 marks start/end/padding, equal ids a
    weight group (or an embedding). piece_text(token): the tokenizer's string of a token id
    ('tiger</w>'), None for an embedding's vector. plain: the text as the tokenizer saw it (weight
    syntax removed); whitespace in it tells which pre-tokens belong to one word. Where the text
    cannot be followed (unusual characters), every pre-token is taken as its own word.
    """
    keys: list = []
    pieces: list[Piece] = []
    starts: list[int] = []
    tails: list[list[int]] = []
    cursor, plain = 0, plain.lower()
    current: list[int] = []
    current_text, group, embedding = "", None, 0
    for chunk in chunks:
        tail: list[int] = []
        offset = len(keys)
        texts = (sentencepiece_texts(chunk, piece_text) if sentencepiece
                 else [piece_text(t) if isinstance(t, int) else None for t, _, _ in chunk])
        for i, (token, _weight, word_id) in enumerate(chunk):
            pos = offset + i
            if word_id == 0:
                keys.append(int(token))
                (starts.append(pos) if i == 0 else tail.append(pos))
                continue
            piece = texts[i]
            if piece is None:  # an embedding's vector: one word per embedding
                if group != ("embedding", word_id):
                    name = _embedding_name(plain, cursor)
                    cursor = plain.find(name, cursor) + len(name) if name else cursor
                    pieces.append(Piece((pos,), name or f"embedding{embedding}", True))
                    embedding += 1
                else:
                    pieces[-1] = Piece(pieces[-1].positions + (pos,), pieces[-1].text, pieces[-1].new_word)
                group = ("embedding", word_id)
                keys.append(f"{pieces[-1].text}#{len(pieces[-1].positions) - 1}")
                continue
            keys.append(int(token))
            current.append(pos)
            current_text += piece
            if not piece.endswith("</w>"):
                continue
            word = current_text[:-4]
            found = plain.find(word, cursor) if word else -1
            new = group != word_id or found < 0 or any(ch.isspace() for ch in plain[cursor:found])
            if found >= 0:
                cursor = found + len(word)
            pieces.append(Piece(tuple(current), word, new))
            current, current_text, group = [], "", word_id
        tails.append(tail)
    if current:  # a word cut by the chunk limit without its end mark
        pieces.append(Piece(tuple(current), current_text, group is None))
    return build_prompt(text, len(keys), keys, pieces, starts, tails)


def concat_prompts(first: Prompt, second: Prompt) -> Prompt:
    """One conditioning made of two tokenisations side by side (SD3: CLIP's chunks, then T5's):
    the second's positions follow the first's, and a word is found in both parts."""
    shift = lambda ps: tuple(p + first.length for p in ps)  # noqa: E731
    words = first.words + tuple(Word(w.text, shift(w.positions), shift(w.core)) for w in second.words)
    return Prompt(first.text, first.keys + second.keys, words, first.starts + shift(second.starts),
                  first.tails + tuple(shift(t) for t in second.tails))


def _embedding_name(plain: str, cursor: int) -> str:
    at = plain.find("embedding:", cursor)
    if at < 0:
        return ""
    end = at
    while end < len(plain) and not plain[end].isspace():
        end += 1
    return plain[at:end]


def parse_prompt(text: str, tokenize_word: Callable[[str], list[int]], start: int = 49406, end: int = 49407,
                 punctuation: Callable[[int], bool] = lambda token: False) -> Prompt:
    """One chunk of [start, words' tokens, end, padding] from a per-word tokenizer: for tests and
    tools that have no ComfyUI tokenizer at hand. A word's runs of tokens are one pre-token each;
    the tokens that `punctuation` names are pre-tokens of their own."""
    pieces, keys = [], [start]
    for word in text.split():
        new, run = True, []
        for t in tokenize_word(word) + [None]:
            if run and (t is None or punctuation(t)):  # a run of word tokens is one piece
                pieces.append(Piece(tuple(range(len(keys) - len(run), len(keys))), normalise(word), new))
                new, run = False, []
            if t is None:
                break
            if punctuation(t):
                pieces.append(Piece((len(keys),), ".", new))
                new = False
            else:
                run.append(t)
            keys.append(t)
    if len(keys) + 1 > CHUNK:
        raise PromptError(f"the test prompt has {len(keys) - 1} tokens; parse_prompt builds one chunk")
    tail = list(range(len(keys), CHUNK))
    keys += [end] * len(tail)
    return build_prompt(text, CHUNK, keys, pieces, [0], [tail])
