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
         "dog": [8], "blue": [11], "square": [12], "with": [13], "tiger": [14], "soup": [15], "pea": [16],
         "croutons": [17, 18], "hippopotamus": [20, 21, 22], "zebra": [30, 31], "giraffe": [32, 33],
         ",": [40], ".": [41]}
PUNCTUATION = {40, 41}


def tok(word):
    core = word.rstrip(",.")
    return VOCAB[core] + [VOCAB[c][0] for c in word[len(core):]]


def P(text):
    return parse_prompt(text, tok, punctuation=lambda t: t in PUNCTUATION)


def end(prompt):
    return prompt.tails[0][0]


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
    assert (end(src), end(tgt)) == (7, 9)
    A = replace_mapper(src, tgt)
    E = torch.zeros(N, N)
    E[0, 0] = 1
    E[1, 1] = 1  # a
    E[2, 2] = E[2, 3] = E[2, 4] = 1 / 3  # cat -> hip po potamus: each target token 1/3
    E[3, 5] = E[4, 6] = E[5, 7] = E[6, 8] = 1  # on a red circle
    with_tail(E, 7, 9)
    assert torch.equal(A, E)
    # rows of the prompt part (start, words, end) each sum to 1: no attention mass is lost or made
    assert torch.allclose(A[:end(src) + 1].sum(1), torch.ones(end(src) + 1))
    # mass: the three hippopotamus columns together receive exactly cat's column
    M = softmax_rows(0)
    MA = M @ A.double()
    assert torch.allclose(MA[:, 2:5].sum(1), M[:, 2])
    assert torch.allclose(MA[:, 2], M[:, 2] / 3) and torch.allclose(MA[:, 4], M[:, 2] / 3)
    # the prompt part of the target receives the prompt part of the source, nothing more or less
    assert torch.allclose(MA[:, :end(tgt) + 1].sum(1), M[:, :end(src) + 1].sum(1))


def test_replace_three_tokens_to_one_token_sums():
    src, tgt = P("a hippopotamus on a red circle"), P("a cat on a red circle")
    A = replace_mapper(src, tgt)
    E = torch.zeros(N, N)
    E[0, 0] = E[1, 1] = 1
    E[2, 2] = E[3, 2] = E[4, 2] = 1  # the single target token gets the sum of the three
    E[5, 3] = E[6, 4] = E[7, 5] = E[8, 6] = 1
    with_tail(E, 9, 7)
    assert torch.equal(A, E)
    assert torch.allclose(A[:end(src) + 1].sum(1), torch.ones(end(src) + 1))
    M = softmax_rows(1)
    MA = M @ A.double()
    assert torch.allclose(MA[:, 2], M[:, 2] + M[:, 3] + M[:, 4])
    assert torch.allclose(MA[:, :end(tgt) + 1].sum(1), M[:, :end(src) + 1].sum(1))


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


def test_replace_matrix_is_source_length_by_target_length():
    A = replace_mapper(P("a cat"), P("a dog"))
    assert A.shape == (P("a cat").length, P("a dog").length) == (N, N)
    assert torch.equal(A, torch.eye(N))


# ---------------------------------------------------------------- refine_mapper
def test_refine_inserted_phrase():
    src, tgt = P("a red circle"), P("a red circle on a black background")
    assert (end(src), end(tgt)) == (4, 8)
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


def ids(prompt):
    return [prompt.keys[p] for p in prompt.content]


def test_refine_is_a_global_alignment_not_a_greedy_walk():
    # deleting the first "a": a greedy walk matches the source's first "a" to the target's only "a"
    # and then loses "cat on"; the longest common subsequence keeps "cat on a red circle"
    src, tgt = P("a cat on a red circle"), P("cat on a red circle")
    assert len(greedy_alignment(ids(src), ids(tgt))) == 3
    A, aligned = refine_mapper(src, tgt)
    words = slice(1, end(tgt))
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
    assert int(aligned[1:end(tgt)].sum()) == 5
    # every source word token is aligned to exactly one target token with the same id, in order
    pairs = [(s, t) for s, t in A[1:end(src), 1:end(tgt)].nonzero().add(1).tolist()]
    assert [s for s, _ in pairs] == [1, 2, 3, 4, 5]
    ts = [t for _, t in pairs]
    assert ts == sorted(ts)
    assert all(src.keys[s] == tgt.keys[t] for s, t in pairs)
    assert torch.equal(aligned[1:end(tgt)].nonzero().flatten().add(1), torch.tensor(ts))


def test_refine_identical_prompts_is_identity():
    A, aligned = refine_mapper(P("a red circle"), P("a red circle"))
    assert torch.equal(A, torch.eye(N)) and torch.equal(aligned, torch.ones(N))


def test_refine_aligned_columns_have_one_source_and_unaligned_none():
    A, aligned = refine_mapper(P("a red circle on a black background"), P("a blue square on a black background"))
    assert torch.equal(A.sum(0), aligned)
    assert aligned[2] == 0 and aligned[3] == 0 and aligned[1] == 1 and aligned[4:8].tolist() == [1, 1, 1, 1]


def test_identity_mapper():
    assert torch.equal(identity_mapper(P("a cat")), torch.eye(N))


# ---------------------------------------------------------------- punctuation
def test_replace_maps_noun_to_noun_and_full_stop_to_full_stop():
    # (a) "a tiger." -> "a cat.": tiger (2) -> cat (2) and '.' (3) -> '.' (3), one to one; the
    # whole word "tiger." was one swapped span before, sharing 1/2 of both tokens with each
    src, tgt = P("a tiger."), P("a cat.")
    assert [src.keys[p] for p in (2, 3)] == [14, 41] and [tgt.keys[p] for p in (2, 3)] == [7, 41]
    A = replace_mapper(src, tgt)
    assert A[2, 2] == 1 and A[3, 3] == 1 and A[2, 3] == 0 and A[3, 2] == 0
    assert torch.equal(A, torch.eye(N))


def test_replace_multi_token_noun_keeps_its_full_stop_one_to_one():
    src, tgt = P("a hippopotamus."), P("a cat.")
    A = replace_mapper(src, tgt)
    E = torch.zeros(N, N)
    E[0, 0] = E[1, 1] = 1
    E[2, 2] = E[3, 2] = E[4, 2] = 1  # the noun's three tokens -> cat's one
    E[5, 3] = 1  # '.' -> '.'
    with_tail(E, 6, 4)
    assert torch.equal(A, E)


def test_replace_different_edge_punctuation_is_part_of_the_swapped_span():
    # "cat." -> "dog,": the '.' and ',' differ, so [cat .] -> [dog ,] shares equally (1/2 each)
    A = replace_mapper(P("a cat."), P("a dog,"))
    assert torch.allclose(A[2:4, 2:4], torch.full((2, 2), 0.5))
    assert torch.equal(A[4:, 4:], torch.eye(N - 4))


def test_refine_soup_to_pea_soup_with_croutons():
    src, tgt = P("soup"), P("pea soup with croutons")
    assert tgt.positions("croutons") == [4, 5] and end(src) == 2 and end(tgt) == 6
    A, aligned = refine_mapper(src, tgt)
    E = torch.zeros(N, N)
    E[0, 0] = 1
    E[1, 2] = 1  # soup -> soup
    with_tail(E, 2, 6)
    assert torch.equal(A, E)
    expected = torch.ones(N)
    expected[[1, 3, 4, 5]] = 0  # pea, with, crou, tons: new
    assert torch.equal(aligned, expected)


# ---------------------------------------------------------------- several chunks
PIECES = {1: "a</w>", 7: "cat</w>", 8: "dog</w>"}


def long_prompt(words, ids):
    """A prompt of two CLIP chunks (ComfyUI's tokenize_with_weights layout): 75 tokens in the first."""
    from attention.tokens import prompt_from_tokens
    text = " ".join(words)
    entries = [(t, i + 1) for i, t in enumerate(ids)]
    chunks = []
    for c in range(0, len(entries), 75):
        body = [(49406, 1.0, 0)] + [(t, 1.0, w) for t, w in entries[c:c + 75]] + [(49407, 1.0, 0)]
        chunks.append(body + [(49407, 1.0, 0)] * (N - len(body)))
    return prompt_from_tokens(text, chunks, PIECES.get, text)


def test_refine_one_chunk_source_against_a_two_chunk_target():
    src = P("a cat")
    tgt = long_prompt(["a"] * 75 + ["cat"], [1] * 75 + [7])
    assert tgt.length == 2 * N and tgt.starts == (0, 77) and tgt.tails[0] == (76,)
    A, aligned = refine_mapper(src, tgt)
    assert A.shape == (N, 2 * N)
    E = torch.zeros(N, 2 * N)
    E[0, 0] = E[0, 77] = 1  # the start token to each chunk's start
    E[1, 1] = 1  # 'a' to the first 'a' (ties towards the earliest)
    E[2, 78] = 1  # 'cat' to 'cat' in the second chunk
    E[3, 76] = 1  # chunk 0's tail (its end token only) from the source's end token
    for k, j in enumerate(range(79, 154)):  # chunk 1's tail from the source's end token on, clamped
        E[min(3 + k, N - 1), j] = 1
    assert torch.equal(A, E)
    expected = torch.ones(2 * N)
    expected[2:76] = 0  # the 74 added 'a'
    assert torch.equal(aligned, expected)


def test_replace_two_chunk_prompts_swap_in_the_second_chunk():
    src = long_prompt(["a"] * 75 + ["cat"], [1] * 75 + [7])
    tgt = long_prompt(["a"] * 75 + ["dog"], [1] * 75 + [8])
    A = replace_mapper(src, tgt)
    assert torch.equal(A, torch.eye(2 * N))
