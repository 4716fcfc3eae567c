"""Alignment of source and target prompt tokens, as a matrix A (source x target positions).

An injected target map is M_src @ A: column j of the target receives the source columns that A
sends to it. `alpha[j]` says whether target token j takes the source's map at all (refine: new
words keep their own maps).
"""
from __future__ import annotations

import torch

from .tokens import MAX_TOKENS, Prompt, PromptError


def _tail(A: torch.Tensor, i: int, j: int) -> None:
    """End token and padding: aligned from each prompt's end onwards."""
    n = A.shape[0]
    while j < n:
        A[min(i, n - 1), j] = 1.0
        i, j = i + 1, j + 1


def replace_mapper(source: Prompt, target: Prompt, n: int = MAX_TOKENS) -> torch.Tensor:
    """Word swap: prompts with the same number of words, some of them different.

    Equal words map token to token. A swapped word's attention mass is shared equally among the
    target word's tokens (one source token -> k target tokens: each gets 1/k of it; k source
    tokens -> one target token: it gets their sum), so each pixel's total attention is kept.
    """
    if len(source.words) != len(target.words):
        raise PromptError(
            f"a word swap needs the same number of words: source has {len(source.words)} "
            f"('{source.text}'), target has {len(target.words)} ('{target.text}'); "
            "use P2PRefine to add or remove words")
    A = torch.zeros(n, n)
    A[0, 0] = 1.0
    for s_span, t_span, s_word, t_word in zip(source.spans, target.spans, source.words, target.words):
        if s_word == t_word and len(s_span) == len(t_span):
            for s, t in zip(s_span, t_span):
                A[s, t] = 1.0
        else:
            for t in t_span:
                A[list(s_span), t] = 1.0 / len(t_span)
    _tail(A, source.end, target.end)
    return A


def refine_mapper(source: Prompt, target: Prompt, n: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Phrase added or removed: a global alignment (longest common subsequence of the token ids,
    ties broken towards the earliest source token) instead of a greedy walk. Returns (A, aligned):
    aligned[j] = 1 where target token j has a source counterpart."""
    a, b = source.ids, target.ids
    # dp[i][j]: length of the best alignment of a[i:] and b[j:]
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) - 1, -1, -1):
        for j in range(len(b) - 1, -1, -1):
            dp[i][j] = dp[i + 1][j + 1] + 1 if a[i] == b[j] else max(dp[i + 1][j], dp[i][j + 1])
    A, aligned = torch.zeros(n, n), torch.zeros(n)
    A[0, 0] = aligned[0] = 1.0
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] == b[j] and dp[i][j] == dp[i + 1][j + 1] + 1:
            A[i + 1, j + 1] = aligned[j + 1] = 1.0
            i, j = i + 1, j + 1
        elif dp[i + 1][j] >= dp[i][j + 1]:
            i += 1
        else:
            j += 1
    _tail(A, source.end, target.end)
    aligned[target.end:] = 1.0
    return A, aligned


def identity_mapper(n: int = MAX_TOKENS) -> torch.Tensor:
    return torch.eye(n)
