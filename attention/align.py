"""Alignment of source and target prompt tokens, as a matrix A (source x target positions).

An injected target map is M_src @ A: column j of the target receives the source columns that A
sends to it. `aligned[j]` says whether target token j has a source counterpart at all (refine:
new words keep their own maps). Prompts of several chunks give matrices of 77k rows/columns.
"""
from __future__ import annotations

import torch

from .tokens import Prompt, PromptError


def _specials(A: torch.Tensor, source: Prompt, target: Prompt) -> None:
    """Start tokens chunk to chunk; each chunk's end token and padding in order from its end
    token on, clamped to the source's last (P2P's reference aligns the tail from the end token)."""
    for c, j in enumerate(target.starts):
        A[source.starts[min(c, len(source.starts) - 1)], j] = 1.0
    for c, t_tail in enumerate(target.tails):
        s_tail = source.tails[min(c, len(source.tails) - 1)]
        for k, j in enumerate(t_tail):
            A[s_tail[min(k, len(s_tail) - 1)], j] = 1.0


def _edges(word) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The punctuation tokens before and after a word's core."""
    i, k = word.positions.index(word.core[0]), word.positions.index(word.core[-1])
    return word.positions[:i], word.positions[k + 1:]


def replace_mapper(source: Prompt, target: Prompt) -> torch.Tensor:
    """Word swap: prompts with the same number of words, some of them different.

    Equal words map token to token, and so does edge punctuation that both words carry ("tiger."
    -> "cat.": the '.' to the '.'). A swapped word's attention mass is shared equally among the
    target word's tokens (one source token -> k target tokens: each gets 1/k of it; k source
    tokens -> one target token: it gets their sum; k -> k alike), so each pixel's total attention
    is kept and BPE pieces, which carry no correspondence between different words, are not paired.
    """
    if len(source.words) != len(target.words):
        raise PromptError(
            f"a word swap needs the same number of words: source has {len(source.words)} "
            f"('{source.text}'), target has {len(target.words)} ('{target.text}'); "
            "use P2PRefine to add or remove words")
    A = torch.zeros(source.length, target.length)
    key = lambda prompt, positions: [prompt.keys[p] for p in positions]  # noqa: E731
    for s_word, t_word in zip(source.words, target.words):
        pairs = [(s_word.positions, t_word.positions)]
        if key(source, s_word.positions) != key(target, t_word.positions):
            (s_lead, s_trail), (t_lead, t_trail) = _edges(s_word), _edges(t_word)
            s_core, t_core = list(s_word.core), list(t_word.core)
            pairs = []
            for s_edge, t_edge, at_start in ((s_lead, t_lead, True), (s_trail, t_trail, False)):
                if key(source, s_edge) == key(target, t_edge):
                    pairs.append((s_edge, t_edge))
                else:  # different punctuation: part of the swapped span
                    s_core = [*s_edge, *s_core] if at_start else [*s_core, *s_edge]
                    t_core = [*t_edge, *t_core] if at_start else [*t_core, *t_edge]
            for t in t_core:
                A[s_core, t] = 1.0 / len(t_core)
        for s_span, t_span in pairs:
            for s, t in zip(s_span, t_span):
                A[s, t] = 1.0
    _specials(A, source, target)
    return A


def refine_mapper(source: Prompt, target: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Phrase added or removed: a global alignment (longest common subsequence of the token ids,
    ties broken towards the earliest source token) instead of a greedy walk. Returns (A, aligned):
    aligned[j] = 1 where target token j has a source counterpart."""
    sp, tp = source.content, target.content
    a, b = [source.keys[p] for p in sp], [target.keys[p] for p in tp]
    # dp[i][j]: length of the best alignment of a[i:] and b[j:]
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) - 1, -1, -1):
        for j in range(len(b) - 1, -1, -1):
            dp[i][j] = dp[i + 1][j + 1] + 1 if a[i] == b[j] else max(dp[i + 1][j], dp[i][j + 1])
    A = torch.zeros(source.length, target.length)
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] == b[j] and dp[i][j] == dp[i + 1][j + 1] + 1:
            A[sp[i], tp[j]] = 1.0
            i, j = i + 1, j + 1
        elif dp[i + 1][j] >= dp[i][j + 1]:
            i += 1
        else:
            j += 1
    _specials(A, source, target)
    return A, (A.sum(0) > 0).float()


def identity_mapper(prompt: Prompt) -> torch.Tensor:
    return torch.eye(prompt.length)
