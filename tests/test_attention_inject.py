"""attention/inject.py: the fused edits against explicitly materialised attention maps."""
from __future__ import annotations

import math
import pathlib
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attention.align import refine_mapper, replace_mapper  # noqa: E402
from attention.inject import (attention_probs, blend_mask, edit_cross_attention,  # noqa: E402
                              inject_self_attention, run_jobs, sdpa, token_maps)
from attention.tokens import parse_prompt  # noqa: E402

HEADS, D = 2, 8
C = HEADS * D
B, NQ, T = 2, 12, 77
VOCAB = {"a": [1], "red": [2], "circle": [3], "on": [4], "black": [5], "background": [6], "cat": [7],
         "hippopotamus": [20, 21, 22]}


def P(text):
    return parse_prompt(text, lambda w: VOCAB[w])


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ref_maps(q, k, heads):
    """softmax(q kᵀ/√d) per batch row and head, in float64: (B, heads, Nq, Nk)."""
    d = q.shape[-1] // heads
    out = torch.zeros(q.shape[0], heads, q.shape[1], k.shape[1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(heads):
            qs, ks = q[b, :, h * d:(h + 1) * d].double(), k[b, :, h * d:(h + 1) * d].double()
            out[b, h] = torch.softmax(qs @ ks.T / math.sqrt(d), dim=-1)
    return out


def ref_attention(q, k, v, heads):
    M = ref_maps(q, k, heads)
    d = v.shape[-1] // heads
    out = torch.zeros(v.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(heads):
            out[b, :, h * d:(h + 1) * d] = M[b, h] @ v[b, :, h * d:(h + 1) * d].double()
    return out


def ref_edit(q_t, k_t, v_t, q_s, k_s, A, alpha, c, heads):
    """M_new = (M_src A) * (alpha c) + M_tgt * (1 - alpha), column-wise; out = M_new v per head."""
    Ms, Mt = ref_maps(q_s, k_s, heads), ref_maps(q_t, k_t, heads)
    d = v_t.shape[-1] // heads
    A = A.double()
    alpha = alpha.double().expand(v_t.shape[0], -1)
    c = c.double().expand(v_t.shape[0], -1)
    out = torch.zeros(v_t.shape[0], q_t.shape[1], v_t.shape[-1], dtype=torch.float64)
    for b in range(v_t.shape[0]):
        for h in range(heads):
            M_new = (Ms[b, h] @ A) * (alpha[b] * c[b])[None, :] + Mt[b, h] * (1 - alpha[b])[None, :]
            out[b, :, h * d:(h + 1) * d] = M_new @ v_t[b, :, h * d:(h + 1) * d].double()
    return out


@pytest.fixture
def qkv():
    return dict(q_t=rand(B, NQ, C, seed=1), k_t=rand(B, T, C, seed=2), v_t=rand(B, T, C, seed=3),
                q_s=rand(B, NQ, C, seed=4), k_s=rand(B, T, C, seed=5))


def check_edit(qkv, A, alpha, c):
    got = edit_cross_attention(qkv["q_t"], qkv["k_t"], qkv["v_t"], qkv["q_s"], qkv["k_s"], A, alpha, c, HEADS)
    want = ref_edit(qkv["q_t"], qkv["k_t"], qkv["v_t"], qkv["q_s"], qkv["k_s"], A, alpha, c, HEADS)
    assert got.shape == (B, NQ, C) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    return got


def test_sdpa_and_attention_probs_match_the_reference(qkv):
    q, k, v = qkv["q_t"], qkv["k_t"], qkv["v_t"]
    torch.testing.assert_close(sdpa(q, k, v, HEADS).double(), ref_attention(q, k, v, HEADS), atol=1e-5, rtol=0)
    probs = attention_probs(q, k, HEADS)
    assert probs.shape == (B, HEADS, NQ, T)
    torch.testing.assert_close(probs.double(), ref_maps(q, k, HEADS), atol=1e-6, rtol=0)
    # heads are really separate: one head alone is not the same as the two-head result
    assert not torch.allclose(sdpa(q, k, v, 1), sdpa(q, k, v, HEADS), atol=1e-3)


def test_edit_identity_mapper_full_injection(qkv):
    got = check_edit(qkv, torch.eye(T), torch.ones(T), torch.ones(T))
    # with alpha = 1 and A = I the result is the source's map applied to the target's values
    torch.testing.assert_close(got, sdpa(qkv["q_s"], qkv["k_s"], qkv["v_t"], HEADS), atol=1e-5, rtol=0)


def test_edit_alpha_zero_is_plain_target_attention(qkv):
    got = check_edit(qkv, torch.eye(T), torch.zeros(T), torch.ones(T))
    torch.testing.assert_close(got, sdpa(qkv["q_t"], qkv["k_t"], qkv["v_t"], HEADS), atol=1e-5, rtol=0)


def test_edit_fractional_and_per_batch_alpha(qkv):
    alpha = torch.rand(T, generator=torch.Generator().manual_seed(9))
    check_edit(qkv, torch.eye(T), alpha, torch.ones(T))
    alpha_b = torch.stack([torch.ones(T), torch.zeros(T)])  # (B, T): row 0 injects, row 1 does not
    got = check_edit(qkv, torch.eye(T), alpha_b, torch.ones(T))
    torch.testing.assert_close(got[0], sdpa(qkv["q_s"], qkv["k_s"], qkv["v_t"], HEADS)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], sdpa(qkv["q_t"], qkv["k_t"], qkv["v_t"], HEADS)[1], atol=1e-5, rtol=0)


def test_edit_replace_mapper_unequal_tokens(qkv):
    A = replace_mapper(P("a cat on a red circle"), P("a hippopotamus on a red circle"))
    check_edit(qkv, A, torch.ones(T), torch.ones(T))
    alpha = torch.ones(T)
    alpha[2:5] = 0  # the new word keeps its own map for these steps
    check_edit(qkv, A, alpha, torch.ones(T))


def test_edit_refine_mapper_with_unaligned_tokens(qkv):
    A, aligned = refine_mapper(P("a red circle"), P("a red circle on a black background"))
    assert (aligned == 0).any()
    check_edit(qkv, A, aligned, torch.ones(T))


def test_edit_equalizer_including_negative_weights(qkv):
    c = torch.ones(T)
    c[2], c[3], c[5] = 2.5, -1.0, 0.0
    check_edit(qkv, torch.eye(T), torch.ones(T), c)
    A, aligned = refine_mapper(P("a red circle"), P("a red circle on a black background"))
    check_edit(qkv, A, aligned, c)
    check_edit(qkv, torch.eye(T), torch.full((T,), 0.5), c)


def test_edit_of_identical_branches_is_plain_attention():
    q, k, v = rand(B, NQ, C, seed=11), rand(B, T, C, seed=12), rand(B, T, C, seed=13)
    got = edit_cross_attention(q, k, v, q, k, torch.eye(T), torch.ones(T), torch.ones(T), HEADS)
    torch.testing.assert_close(got, sdpa(q, k, v, HEADS), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), ref_attention(q, k, v, HEADS), atol=1e-5, rtol=0)


def test_edit_uses_the_given_attention_function(qkv):
    """...and both attention products go through it in one call over the doubled batch."""
    calls = []

    def attention(q, k, v, heads):
        calls.append((heads, q.shape[0]))
        return sdpa(q, k, v, heads)

    edit_cross_attention(qkv["q_t"], qkv["k_t"], qkv["v_t"], qkv["q_s"], qkv["k_s"], torch.eye(T),
                         torch.full((T,), 0.5), torch.ones(T), HEADS, attention)
    assert calls == [(HEADS, 2 * B)]


def test_run_jobs_sums_each_group_from_one_call():
    jobs = [(rand(B, NQ, C, seed=s), rand(B, T, C, seed=s + 1), rand(B, T, C, seed=s + 2)) for s in (31, 34, 37)]
    calls = []

    def attention(q, k, v, heads):
        calls.append(q.shape[0])
        return sdpa(q, k, v, heads)

    first, second = run_jobs([jobs[:2], jobs[2:]], HEADS, attention)
    assert calls == [3 * B]
    torch.testing.assert_close(first, sdpa(*jobs[0], HEADS) + sdpa(*jobs[1], HEADS), atol=1e-6, rtol=0)
    torch.testing.assert_close(second, sdpa(*jobs[2], HEADS), atol=1e-6, rtol=0)


def test_inject_self_attention():
    q_s, k_s, v_t = rand(B, NQ, C, seed=21), rand(B, NQ, C, seed=22), rand(B, NQ, C, seed=23)
    got = inject_self_attention(q_s, k_s, v_t, HEADS)
    torch.testing.assert_close(got.double(), ref_attention(q_s, k_s, v_t, HEADS), atol=1e-5, rtol=0)


def test_token_maps_shape_layout_and_sums():
    h, w = 3, 4
    q, k = rand(B, h * w, C, seed=31), rand(B, T, C, seed=32)
    full = token_maps(q, k, HEADS, (h, w), T)
    assert full.shape == (B, T, h, w)
    # every pixel's attention over all tokens sums to one (head average of softmaxes)
    torch.testing.assert_close(full.sum(1), torch.ones(B, h, w), atol=1e-5, rtol=0)
    few = token_maps(q, k, HEADS, (h, w), 5)
    assert few.shape == (B, 5, h, w)
    M = ref_maps(q, k, HEADS).mean(1)  # (B, Nq, T)
    for b in range(B):
        for t in range(5):
            for y in range(h):
                for x in range(w):
                    assert abs(float(few[b, t, y, x]) - float(M[b, y * w + x, t])) < 1e-6
    # truncated maps are the first tokens of the full ones, and sum to less than one
    torch.testing.assert_close(few, full[:, :5])
    assert (few.sum(1) < 1).all()


def maps_with(blobs, shape=(1, 4, 8, 8)):
    m = torch.zeros(shape)
    for (b, t, y, x), value in blobs.items():
        m[b, t, y, x] = value
    return m


def region(size, rows, cols):
    out = torch.zeros(1, 1, *size)
    out[..., rows, cols] = 1.0
    return out


def test_blend_mask_covers_the_dilated_blob():
    m = maps_with({(0, 2, 3, 3): 1.0, (0, 2, 4, 4): 0.8, (0, 2, 3, 4): 0.9, (0, 2, 4, 3): 0.9})
    mask = blend_mask(m, [2], (16, 16), threshold=0.3)
    assert mask.shape == (1, 1, 16, 16) and mask.dtype == torch.float32
    # blob rows/cols 3..4 -> dilated by one: 2..5 at 8x8 -> nearest x2: 4..11 at 16x16
    assert torch.equal(mask, region((16, 16), slice(4, 12), slice(4, 12)))
    # same resolution: just the dilation
    assert torch.equal(blend_mask(m, [2], (8, 8)), region((8, 8), slice(2, 6), slice(2, 6)))
    # other tokens' maps are not looked at
    assert torch.equal(blend_mask(m, [1], (8, 8)), torch.zeros(1, 1, 8, 8))


def test_blend_mask_dilation_radius():
    m = maps_with({(0, 2, 3, 3): 1.0})
    assert torch.equal(blend_mask(m, [2], (8, 8), dilate=0), region((8, 8), slice(3, 4), slice(3, 4)))
    assert torch.equal(blend_mask(m, [2], (8, 8), dilate=2), region((8, 8), slice(1, 6), slice(1, 6)))
    assert torch.equal(blend_mask(m, [2], (16, 16), dilate=0), region((16, 16), slice(6, 8), slice(6, 8)))


def test_blend_mask_threshold_is_strict_and_relative_to_the_maximum():
    m = maps_with({(0, 1, 1, 1): 1.0, (0, 1, 6, 6): 0.5})
    both = region((8, 8), slice(0, 3), slice(0, 3)) + region((8, 8), slice(5, 8), slice(5, 8))
    assert torch.equal(blend_mask(m, [1], (8, 8), threshold=0.49), both)
    assert torch.equal(blend_mask(m, [1], (8, 8), threshold=0.5), region((8, 8), slice(0, 3), slice(0, 3)))
    # normalised by the maximum: scaling the maps changes nothing
    assert torch.equal(blend_mask(m * 7.0, [1], (8, 8), threshold=0.49), both)
    assert torch.equal(blend_mask(m * 0.01, [1], (8, 8), threshold=0.5), region((8, 8), slice(0, 3), slice(0, 3)))


def test_blend_mask_sums_words_and_normalises_each_batch_row():
    m = maps_with({(0, 1, 1, 1): 1.0, (0, 2, 6, 6): 1.0, (1, 1, 6, 1): 0.01}, shape=(2, 4, 8, 8))
    mask = blend_mask(m, [1, 2], (8, 8), threshold=0.3)
    assert mask.shape == (2, 1, 8, 8)
    expected0 = region((8, 8), slice(0, 3), slice(0, 3)) + region((8, 8), slice(5, 8), slice(5, 8))
    assert torch.equal(mask[0:1], expected0)
    assert torch.equal(mask[1:2], region((8, 8), slice(5, 8), slice(0, 3)))  # its own max, not row 0's


def test_blend_mask_subtract():
    m = maps_with({(0, 1, 3, 3): 1.0, (0, 1, 3, 4): 1.0, (0, 3, 3, 6): 1.0})
    # word 1: rows 2..4, cols 2..5; word 3: rows 2..4, cols 5..7; subtracted: cols 2..4 remain
    mask = blend_mask(m, [1], (8, 8), threshold=0.3, subtract=[3])
    assert torch.equal(mask, region((8, 8), slice(2, 5), slice(2, 5)))
    # subtract words read from other maps when given
    other = maps_with({(0, 3, 3, 2): 1.0})  # rows 2..4, cols 1..3
    mask = blend_mask(m, [1], (8, 8), threshold=0.3, subtract=[3], subtract_maps=other)
    assert torch.equal(mask, region((8, 8), slice(2, 5), slice(4, 6)))
    # an empty subtract list removes nothing
    assert torch.equal(blend_mask(m, [1], (8, 8), subtract=[]), region((8, 8), slice(2, 5), slice(2, 6)))


def test_blend_mask_of_empty_maps_is_empty():
    assert torch.equal(blend_mask(torch.zeros(1, 4, 8, 8), [1], (8, 8)), torch.zeros(1, 1, 8, 8))
