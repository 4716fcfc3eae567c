"""attention/align.py: replace and refine mappers, checked entry by entry against hand-built matrices."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attention.align import identity_mapper, refine_mapper, replace_mapper  # noqa: E402
from attention.tokens import PromptError, parse_prompt  # noqa: E402

N = 77
VOCAB = {"a": [1], "red": [2], "circle": [3], "on": [4], "black": [5], "background": [6], "cat": [7],
         "dog": [8], "blue": [11], "square": [12], "with": [13],
         "hippopotamus": [20, 21, 22], "zebra": [30, 31], "giraffe": [32, 33]}


def P(text):
    return parse_prompt(text, lambda w: VOCAB[w])


def with_tail(A, i, j):
    """Expected tail: source end i -> target end j, then padding one to one, clamped at 76."""
    while j < N:
        A[min(i, N - 1), j] = 1.0
        i, j = i + 1, j + 1
    return A


def softmax_rows(seed, rows=5):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, N, generator=g, dtype=torch.float64), -1)


# ---------------------------------------------------------------- replace_mapper
def test_replace_equal_token_counts_is_identity_with_the_swap_on_the_diagonal():
    A = replace_mapper(P("a red circle"), P("a blue circle"))
    assert A.shape == (N, N)
    assert torch.equal(A, torch.eye(N))  # red (pos 2) -> blue (pos 2) with weight 1, rest identity


def test_replace_swap_in_a_longer_prompt_touches_only_that_word():
    A = replace_mapper(P("a cat on a black background"), P("a dog on a black background"))
    assert torch.equal(A, torch.eye(N))
    # the swapped word: target column 2 takes exactly source column 2
    assert A[:, 2].nonzero().flatten().tolist() == [2]


def test_replace_one_token_to_three_tokens():
    src, tgt = P("a cat on a red circle"), P("a hippopotamus on a red circle")
    assert (src.end, tgt.end) == (7, 9)
    A = replace_mapper(src, tgt)
    E = torch.zeros(N, N)
    E[0, 0] = 1
    E[1, 1] = 1  # a
    E[2, 2] = E[2, 3] = E[2, 4] = 1 / 3  # cat -> hip po potamus: each target token 1/3
    E[3, 5] = E[4, 6] = E[5, 7] = E[6, 8] = 1  # on a red circle
    with_tail(E, 7, 9)
    assert torch.equal(A, E)
    # rows of the prompt part (start, words, end) each sum to 1: no attention mass is lost or made
    assert torch.allclose(A[:src.end + 1].sum(1), torch.ones(src.end + 1))
    # mass: the three hippopotamus columns together receive exactly cat's column
    M = softmax_rows(0)
    MA = M @ A.double()
    assert torch.allclose(MA[:, 2:5].sum(1), M[:, 2])
    assert torch.allclose(MA[:, 2], M[:, 2] / 3) and torch.allclose(MA[:, 4], M[:, 2] / 3)
    # the prompt part of the target receives the prompt part of the source, nothing more or less
    assert torch.allclose(MA[:, :tgt.end + 1].sum(1), M[:, :src.end + 1].sum(1))


def test_replace_three_tokens_to_one_token_sums():
    src, tgt = P("a hippopotamus on a red circle"), P("a cat on a red circle")
    A = replace_mapper(src, tgt)
    E = torch.zeros(N, N)
    E[0, 0] = E[1, 1] = 1
    E[2, 2] = E[3, 2] = E[4, 2] = 1  # the single target token gets the sum of the three
    E[5, 3] = E[6, 4] = E[7, 5] = E[8, 6] = 1
    with_tail(E, 9, 7)
    assert torch.equal(A, E)
    assert torch.allclose(A[:src.end + 1].sum(1), torch.ones(src.end + 1))
    M = softmax_rows(1)
    MA = M @ A.double()
    assert torch.allclose(MA[:, 2], M[:, 2] + M[:, 3] + M[:, 4])
    assert torch.allclose(MA[:, :tgt.end + 1].sum(1), M[:, :src.end + 1].sum(1))


def test_replace_two_tokens_to_two_different_tokens_share_equally():
    A = replace_mapper(P("a zebra"), P("a giraffe"))
    assert torch.allclose(A[2:4, 2:4], torch.full((2, 2), 0.5))
    assert torch.equal(A[4:, 4:], torch.eye(N - 4))
    assert torch.allclose(A.sum(1), torch.ones(N)) and torch.allclose(A.sum(0), torch.ones(N))


def test_replace_tail_end_token_and_padding():
    # target longer: source end 3 -> target end 5, padding follows one to one, and the last two
    # source padding positions have no target left
    A = replace_mapper(P("a cat"), P("a hippopotamus"))
    assert A[3, 5] == 1 and A[4, 6] == 1 and A[74, 76] == 1
    assert A[3].sum() == 1 and A[75].sum() == 0 and A[76].sum() == 0
    # every target column from the end token on receives exactly one source column
    assert torch.equal(A[:, 5:].sum(0), torch.ones(N - 5))
    # target shorter: the target's last padding columns all read the source's last position
    B = replace_mapper(P("a hippopotamus"), P("a cat"))
    assert B[5, 3] == 1 and B[76, 74] == 1 and B[76, 75] == 1 and B[76, 76] == 1
    assert torch.equal(B[:, 3:].sum(0), torch.ones(N - 3))


def test_replace_needs_the_same_number_of_words():
    with pytest.raises(PromptError) as e:
        replace_mapper(P("a red circle"), P("a red circle on a black background"))
    msg = str(e.value)
    assert "P2PRefine" in msg
    assert "3" in msg and "7" in msg


def test_replace_custom_size():
    A = replace_mapper(P("a cat"), P("a dog"), n=10)
    assert torch.equal(A, torch.eye(10))


# ---------------------------------------------------------------- refine_mapper
def test_refine_inserted_phrase():
    src, tgt = P("a red circle"), P("a red circle on a black background")
    assert (src.end, tgt.end) == (4, 8)
    A, aligned = refine_mapper(src, tgt)
    E = torch.zeros(N, N)
    E[0, 0] = E[1, 1] = E[2, 2] = E[3, 3] = 1
    with_tail(E, 4, 8)
    assert torch.equal(A, E)
    expected = torch.ones(N)
    expected[4:8] = 0  # "on a black background" are new: they keep their own maps
    assert torch.equal(aligned, expected)
    # new words' columns take nothing from the source
    assert torch.equal(A[:, 4:8], torch.zeros(N, 4))


def test_refine_deleted_words():
    src, tgt = P("a red circle on a black background"), P("a red circle")
    A, aligned = refine_mapper(src, tgt)
    E = torch.zeros(N, N)
    E[0, 0] = E[1, 1] = E[2, 2] = E[3, 3] = 1
    with_tail(E, 8, 4)
    assert torch.equal(A, E)
    assert E[76, 72] == E[76, 76] == 1  # clamped tail
    assert torch.equal(aligned, torch.ones(N))  # every target token has a source counterpart
    assert torch.equal(A[4:8].sum(1), torch.zeros(4))  # deleted source words go nowhere


def greedy_alignment(a, b):
    """A greedy walk: each source token takes the first equal target token after the last match."""
    out, j = [], 0
    for i, t in enumerate(a):
        for jj in range(j, len(b)):
            if b[jj] == t:
                out.append((i, jj))
                j = jj + 1
                break
    return out


def test_refine_is_a_global_alignment_not_a_greedy_walk():
    # deleting the first "a": a greedy walk matches the source's first "a" to the target's only "a"
    # and then loses "cat on"; the longest common subsequence keeps "cat on a red circle"
    src, tgt = P("a cat on a red circle"), P("cat on a red circle")
    assert len(greedy_alignment(src.ids, tgt.ids)) == 3
    A, aligned = refine_mapper(src, tgt)
    words = slice(1, tgt.end)
    assert int(aligned[words].sum()) == 5
    E = torch.zeros(N, N)
    E[0, 0] = 1
    for s, t in [(2, 1), (3, 2), (4, 3), (5, 4), (6, 5)]:
        E[s, t] = 1
    with_tail(E, 7, 6)
    assert torch.equal(A, E)
    assert torch.equal(aligned, torch.ones(N))


def test_refine_repeated_tokens_with_insertion():
    src, tgt = P("a cat on a dog"), P("a dog with a cat on a dog")
    # LCS of (a cat on a dog) and (a dog with a cat on a dog) is the whole source (5 tokens)
    A, aligned = refine_mapper(src, tgt)
    assert int(aligned[1:tgt.end].sum()) == 5
    # every source word token is aligned to exactly one target token with the same id, in order
    pairs = [(s, t) for s, t in A[1:src.end, 1:tgt.end].nonzero().add(1).tolist()]
    assert [s for s, _ in pairs] == [1, 2, 3, 4, 5]
    ts = [t for _, t in pairs]
    assert ts == sorted(ts)
    assert all(src.ids[s - 1] == tgt.ids[t - 1] for s, t in pairs)
    assert torch.equal(aligned[1:tgt.end].nonzero().flatten().add(1), torch.tensor(ts))


def test_refine_identical_prompts_is_identity():
    A, aligned = refine_mapper(P("a red circle"), P("a red circle"))
    assert torch.equal(A, torch.eye(N)) and torch.equal(aligned, torch.ones(N))


def test_refine_aligned_columns_have_one_source_and_unaligned_none():
    A, aligned = refine_mapper(P("a red circle on a black background"), P("a blue square on a black background"))
    assert torch.equal(A.sum(0), aligned)
    assert aligned[2] == 0 and aligned[3] == 0 and aligned[1] == 1 and aligned[4:8].tolist() == [1, 1, 1, 1]


def test_identity_mapper():
    assert torch.equal(identity_mapper(), torch.eye(N))
    assert torch.equal(identity_mapper(5), torch.eye(5))
