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
from attention.inject import (attention_probs, blend_mask, edit_cross_attention, edited_maps,  # noqa: E402
                              expand_columns, expand_mapper, inject_self_attention, key_layout, run_jobs,
                              sdpa, token_maps, words_mask)
from attention.tokens import parse_prompt  # noqa: E402

HEADS, D = 2, 8
C = HEADS * D
B, NQ, T = 2, 12, 77
VOCAB = {"a": [1], "red": [2], "circle": [3], "on": [4], "black": [5], "background": [6], "cat": [7],
         "hippopotamus": [20, 21, 22]}


def P(text):
    return parse_prompt(text, lambda w: VOCAB[w])


def p2p_weights(alpha, c):
    """The old (alpha, equalizer) form as (ws, wt): ws = alpha c, wt = 1 - alpha."""
    return alpha * c, 1 - alpha


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


def ref_new_maps(q_t, k_t, q_s, k_s, A, ws, wt, heads):
    """M_new = (M_src A) diag(ws) + M_tgt diag(wt) per batch row and head, float64: (B, heads, Nq, L_t)."""
    Ms, Mt = ref_maps(q_s, k_s, heads), ref_maps(q_t, k_t, heads)
    ws = ws.double().expand(q_t.shape[0], -1)
    wt = wt.double().expand(q_t.shape[0], -1)
    return (Ms @ A.double()) * ws[:, None, None, :] + Mt * wt[:, None, None, :]


def ref_edit(q_t, k_t, v_t, q_s, k_s, A, ws, wt, heads):
    """out = M_new v per head, M_new as in ref_new_maps (explicit maps, float64)."""
    M_new = ref_new_maps(q_t, k_t, q_s, k_s, A, ws, wt, heads)
    d = v_t.shape[-1] // heads
    out = torch.zeros(v_t.shape[0], q_t.shape[1], v_t.shape[-1], dtype=torch.float64)
    for b in range(v_t.shape[0]):
        for h in range(heads):
            out[b, :, h * d:(h + 1) * d] = M_new[b, h] @ v_t[b, :, h * d:(h + 1) * d].double()
    return out


@pytest.fixture
def qkv():
    return dict(q_t=rand(B, NQ, C, seed=1), k_t=rand(B, T, C, seed=2), v_t=rand(B, T, C, seed=3),
                q_s=rand(B, NQ, C, seed=4), k_s=rand(B, T, C, seed=5))


def check_edit(qkv, A, ws, wt):
    got = edit_cross_attention(qkv["q_t"], qkv["k_t"], qkv["v_t"], qkv["q_s"], qkv["k_s"], A, ws, wt, HEADS)
    want = ref_edit(qkv["q_t"], qkv["k_t"], qkv["v_t"], qkv["q_s"], qkv["k_s"], A, ws, wt, HEADS)
    assert got.shape == (B, NQ, C) and got.dtype == torch.float32
    # float32 fused attention against float64 explicit maps: |v| ~ 3, weights up to 2.5, sums over
    # 77 keys; 1e-5 is ~100 ulp of float32 at these magnitudes
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
    got = check_edit(qkv, torch.eye(T), *p2p_weights(torch.ones(T), torch.ones(T)))
    # with alpha = 1 and A = I the result is the source's map applied to the target's values
    torch.testing.assert_close(got, sdpa(qkv["q_s"], qkv["k_s"], qkv["v_t"], HEADS), atol=1e-5, rtol=0)


def test_edit_alpha_zero_is_plain_target_attention(qkv):
    got = check_edit(qkv, torch.eye(T), *p2p_weights(torch.zeros(T), torch.ones(T)))
    torch.testing.assert_close(got, sdpa(qkv["q_t"], qkv["k_t"], qkv["v_t"], HEADS), atol=1e-5, rtol=0)


def test_edit_fractional_and_per_batch_alpha(qkv):
    alpha = torch.rand(T, generator=torch.Generator().manual_seed(9))
    check_edit(qkv, torch.eye(T), *p2p_weights(alpha, torch.ones(T)))
    alpha_b = torch.stack([torch.ones(T), torch.zeros(T)])  # (B, T): row 0 injects, row 1 does not
    got = check_edit(qkv, torch.eye(T), *p2p_weights(alpha_b, torch.ones(T)))
    torch.testing.assert_close(got[0], sdpa(qkv["q_s"], qkv["k_s"], qkv["v_t"], HEADS)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], sdpa(qkv["q_t"], qkv["k_t"], qkv["v_t"], HEADS)[1], atol=1e-5, rtol=0)


def test_edit_replace_mapper_unequal_tokens(qkv):
    A = replace_mapper(P("a cat on a red circle"), P("a hippopotamus on a red circle"))
    check_edit(qkv, A, *p2p_weights(torch.ones(T), torch.ones(T)))
    alpha = torch.ones(T)
    alpha[2:5] = 0  # the new word keeps its own map for these steps
    check_edit(qkv, A, *p2p_weights(alpha, torch.ones(T)))


def test_edit_refine_mapper_with_unaligned_tokens(qkv):
    A, aligned = refine_mapper(P("a red circle"), P("a red circle on a black background"))
    assert (aligned == 0).any()
    check_edit(qkv, A, *p2p_weights(aligned, torch.ones(T)))


def test_edit_equalizer_including_negative_weights(qkv):
    c = torch.ones(T)
    c[2], c[3], c[5] = 2.5, -1.0, 0.0
    check_edit(qkv, torch.eye(T), *p2p_weights(torch.ones(T), c))
    A, aligned = refine_mapper(P("a red circle"), P("a red circle on a black background"))
    check_edit(qkv, A, *p2p_weights(aligned, c))
    check_edit(qkv, torch.eye(T), *p2p_weights(torch.full((T,), 0.5), c))
    # P2P's re-weighting after a refine also scales a new word's own column: wt = (1 - g) c there
    ws, wt = aligned * c, 1 - aligned + (1 - aligned) * c
    check_edit(qkv, A, ws, wt)


def test_edit_of_identical_branches_is_plain_attention():
    q, k, v = rand(B, NQ, C, seed=11), rand(B, T, C, seed=12), rand(B, T, C, seed=13)
    got = edit_cross_attention(q, k, v, q, k, torch.eye(T), torch.ones(T), torch.zeros(T), HEADS)
    torch.testing.assert_close(got, sdpa(q, k, v, HEADS), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), ref_attention(q, k, v, HEADS), atol=1e-5, rtol=0)


def test_edit_uses_the_given_attention_function(qkv):
    """...and both attention products go through it in one call over the doubled batch."""
    calls = []

    def attention(q, k, v, heads):
        calls.append((heads, q.shape[0]))
        return sdpa(q, k, v, heads)

    edit_cross_attention(qkv["q_t"], qkv["k_t"], qkv["v_t"], qkv["q_s"], qkv["k_s"], torch.eye(T),
                         torch.full((T,), 0.5), torch.full((T,), 0.5), HEADS, attention)
    assert calls == [(HEADS, 2 * B)]
    # wt = 0 everywhere: the target's own product is left out, one product of B rows
    calls.clear()
    edit_cross_attention(qkv["q_t"], qkv["k_t"], qkv["v_t"], qkv["q_s"], qkv["k_s"], torch.eye(T),
                         torch.ones(T), torch.zeros(T), HEADS, attention)
    assert calls == [(HEADS, B)]


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


def mask_of(maps, positions, size, **kw):
    """The local-blend mask of one prompt's maps (no words of the other prompt)."""
    return blend_mask(maps, None, positions, [], size, **kw)


def test_blend_mask_covers_the_dilated_blob():
    m = maps_with({(0, 2, 3, 3): 1.0, (0, 2, 4, 4): 0.8, (0, 2, 3, 4): 0.9, (0, 2, 4, 3): 0.9})
    mask = mask_of(m, [2], (16, 16), threshold=0.3)
    assert mask.shape == (1, 1, 16, 16) and mask.dtype == torch.float32
    # blob rows/cols 3..4 -> dilated by one: 2..5 at 8x8 -> nearest x2: 4..11 at 16x16
    assert torch.equal(mask, region((16, 16), slice(4, 12), slice(4, 12)))
    # same resolution: just the dilation
    assert torch.equal(mask_of(m, [2], (8, 8)), region((8, 8), slice(2, 6), slice(2, 6)))
    # other tokens' maps are not looked at
    assert torch.equal(mask_of(m, [1], (8, 8)), torch.zeros(1, 1, 8, 8))


def test_blend_mask_dilation_radius():
    m = maps_with({(0, 2, 3, 3): 1.0})
    assert torch.equal(mask_of(m, [2], (8, 8), dilate=0), region((8, 8), slice(3, 4), slice(3, 4)))
    assert torch.equal(mask_of(m, [2], (8, 8), dilate=2), region((8, 8), slice(1, 6), slice(1, 6)))
    assert torch.equal(mask_of(m, [2], (16, 16), dilate=0), region((16, 16), slice(6, 8), slice(6, 8)))


def test_blend_mask_threshold_is_strict_and_relative_to_the_maximum():
    m = maps_with({(0, 1, 1, 1): 1.0, (0, 1, 6, 6): 0.5})
    both = region((8, 8), slice(0, 3), slice(0, 3)) + region((8, 8), slice(5, 8), slice(5, 8))
    assert torch.equal(mask_of(m, [1], (8, 8), threshold=0.49), both)
    assert torch.equal(mask_of(m, [1], (8, 8), threshold=0.5), region((8, 8), slice(0, 3), slice(0, 3)))
    # normalised by the maximum: scaling the maps changes nothing
    assert torch.equal(mask_of(m * 7.0, [1], (8, 8), threshold=0.49), both)
    assert torch.equal(mask_of(m * 0.01, [1], (8, 8), threshold=0.5), region((8, 8), slice(0, 3), slice(0, 3)))


def test_blend_mask_sums_words_and_normalises_each_batch_row():
    m = maps_with({(0, 1, 1, 1): 1.0, (0, 2, 6, 6): 1.0, (1, 1, 6, 1): 0.01}, shape=(2, 4, 8, 8))
    mask = mask_of(m, [1, 2], (8, 8), threshold=0.3)
    assert mask.shape == (2, 1, 8, 8)
    expected0 = region((8, 8), slice(0, 3), slice(0, 3)) + region((8, 8), slice(5, 8), slice(5, 8))
    assert torch.equal(mask[0:1], expected0)
    assert torch.equal(mask[1:2], region((8, 8), slice(5, 8), slice(0, 3)))  # its own max, not row 0's


def test_blend_mask_of_empty_maps_is_empty():
    assert torch.equal(mask_of(torch.zeros(1, 4, 8, 8), [1], (8, 8)), torch.zeros(1, 1, 8, 8))


def test_blend_mask_is_the_union_of_the_source_and_the_target_words():
    src = maps_with({(0, 1, 1, 1): 1.0})  # source word at (1, 1)
    tgt = maps_with({(0, 2, 6, 6): 1.0})  # target word (another position) at (6, 6)
    both = region((8, 8), slice(0, 3), slice(0, 3)) + region((8, 8), slice(5, 8), slice(5, 8))
    assert torch.equal(blend_mask(src, tgt, [1], [2], (8, 8)), both)
    # each prompt's maps are normalised by their own maximum before the union
    assert torch.equal(blend_mask(src, tgt * 0.01, [1], [2], (8, 8)), both)
    # only the target's words
    assert torch.equal(blend_mask(src, tgt, [], [2], (8, 8)), region((8, 8), slice(5, 8), slice(5, 8)))


def test_blend_mask_subtracts_the_unpooled_union_of_both_prompts_subtracted_words():
    # (c) P2P's LocalBlend: mask = pooled(words of source | target) & ~unpooled(subtracted words of source | target)
    src = maps_with({(0, 1, 3, 3): 1.0, (0, 1, 3, 4): 1.0,  # source word: rows 2..4, cols 2..5 pooled
                     (0, 3, 2, 2): 1.0})  # source's subtracted word: (2, 2) only, unpooled
    tgt = maps_with({(0, 1, 2, 3): 1.0,  # target word: rows 1..3, cols 2..4 pooled
                     (0, 3, 4, 5): 1.0})  # target's subtracted word: (4, 5) only, unpooled
    words = region((8, 8), slice(2, 5), slice(2, 6)) + region((8, 8), slice(1, 4), slice(2, 5))
    words = (words > 0).float()
    assert torch.equal(blend_mask(src, tgt, [1], [1], (8, 8)), words)
    want = words.clone()
    want[..., 2, 2] = 0
    want[..., 4, 5] = 0
    got = blend_mask(src, tgt, [1], [1], (8, 8), subtract_source=[3], subtract_target=[3])
    assert torch.equal(got, want)
    assert int(words.sum()) == 15 and int(got.sum()) == 13
    # what other readings would give, so that this case tells them apart:
    # - the target's subtracted word alone would keep (2, 2)
    target_only = blend_mask(src, tgt, [1], [1], (8, 8), subtract_target=[3])
    assert target_only[0, 0, 2, 2] == 1 and target_only[0, 0, 4, 5] == 0
    # - a pooled subtraction would remove the 3x3 cells around (2, 2) and (4, 5): 10 cells, not 2
    pooled = words_mask(src, tgt, [3], [3], (8, 8), dilate=1)
    assert int((words.bool() & pooled).sum()) == 10
    # - each prompt less its own subtraction, then the union, would keep (2, 2) (the target's word has it)
    per_prompt = (blend_mask(src, None, [1], [], (8, 8), subtract_source=[3]).bool()
                  | blend_mask(None, tgt, [], [1], (8, 8), subtract_target=[3]).bool())
    assert per_prompt[0, 0, 2, 2]


def test_words_mask_is_unpooled_by_default_and_needs_a_word():
    m = maps_with({(0, 2, 3, 3): 1.0})
    assert torch.equal(words_mask(m, None, [2], [], (8, 8)).float(), region((8, 8), slice(3, 4), slice(3, 4)))
    assert torch.equal(words_mask(m, None, [2], [], (8, 8), dilate=1).float(), region((8, 8), slice(2, 5), slice(2, 5)))
    assert words_mask(m, m, [2], [2], (8, 8)).dtype == torch.bool
    with pytest.raises(ValueError):
        words_mask(m, m, [], [], (8, 8))


def test_edited_maps_by_hand():
    # source 3 tokens, target 2 tokens, one pixel: (M_src A) diag(ws) + M_tgt diag(wt)
    src = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).reshape(1, 3, 1, 1)
    tgt = torch.tensor([0.6, 0.4], dtype=torch.float64).reshape(1, 2, 1, 1)
    A = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.0, 0.5]], dtype=torch.float64)
    ws, wt = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 0.5], dtype=torch.float64)
    got = edited_maps(src, tgt, A, ws, wt).flatten().tolist()
    # token 0: 0.5 * 1 + 0.6 * 0 = 0.5; token 1: (0.3 + 0.2) / 2 * 2 + 0.4 * 0.5 = 0.7
    assert got == pytest.approx([0.5, 0.7], abs=1e-15)


# ---------------------------------------------------------------- repeated and concatenated conditionings
def test_key_layout_of_a_prompt_its_repetition_and_a_foreign_block():
    k = rand(B, T, C, seed=41)
    assert torch.equal(key_layout(k, T), torch.arange(T))
    # ComfyUI repeats a 77-token conditioning to 154 to batch it with a two-chunk one
    assert torch.equal(key_layout(torch.cat([k, k], 1), T), torch.arange(T).repeat(2))
    assert torch.equal(key_layout(torch.cat([k, k, k], 1), T), torch.arange(T).repeat(3))
    # a copy rounded differently by a projection (relative 1e-6) is still a copy
    assert torch.equal(key_layout(torch.cat([k, k * (1 + 1e-6)], 1), T), torch.arange(T).repeat(2))
    # a concatenated block of another conditioning (ConditioningConcat) is no prompt token
    foreign = rand(B, T, C, seed=42)
    want = torch.cat([torch.arange(T), torch.full((T,), -1)])
    assert torch.equal(key_layout(torch.cat([k, foreign], 1), T), want)
    # a two-chunk prompt's own keys are its tokens
    assert torch.equal(key_layout(torch.cat([k, foreign], 1), 2 * T), torch.arange(2 * T))


def test_expand_columns_and_expand_mapper_by_hand():
    layout = torch.tensor([0, 1, 0, 1, -1])
    assert expand_columns(torch.tensor([3.0, 4.0]), layout, 9.0).tolist() == [3, 4, 3, 4, 9]
    assert expand_columns(torch.tensor([[1.0, 2.0]]), layout, 0.0).tolist() == [[1, 2, 1, 2, 0]]
    A = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # source layout [0, 1, -1]: rows are the source tokens' copies (the foreign one sends nothing);
    # target layout [0, 1, 0, 1, -1]: each target token has two copies, each takes half its column
    got = expand_mapper(A, torch.tensor([0, 1, -1]), layout)
    want = torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0],
                         [0.25, 0.25, 0.25, 0.25, 0.0],
                         [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(got, want)


def repeated_case(seed, source_chunks, target_chunks):
    """q/k/v of a source of `source_chunks` x 77 and a target of `target_chunks` x 77 prompt tokens,
    a refine-like mapper (0/1 entries) and P2P weights with a re-weighted new word."""
    Ls, Lt = source_chunks * T, target_chunks * T
    g = torch.Generator().manual_seed(seed)
    case = dict(q_t=rand(B, NQ, C, seed=seed + 1), k_t=rand(B, Lt, C, seed=seed + 2), v_t=rand(B, Lt, C, seed=seed + 3),
                q_s=rand(B, NQ, C, seed=seed + 4), k_s=rand(B, Ls, C, seed=seed + 5))
    A = torch.zeros(Ls, Lt)
    cols = torch.randperm(Lt, generator=g)[:min(Ls, Lt) - 10]
    rows = torch.randperm(Ls, generator=g)[:len(cols)]
    A[rows, cols] = 1.0
    aligned = (A.sum(0) > 0).float()
    c = torch.ones(Lt)
    c[cols[:3]] = 2.0  # re-weighted aligned tokens
    c[(aligned == 0).nonzero()[:2, 0]] = 0.5  # a re-weighted new word
    return case, A, aligned * c, 1 - aligned + (1 - aligned) * c


@pytest.mark.parametrize("source_chunks,target_chunks", [(1, 2), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edit_on_repeated_keys_equals_the_edit_on_the_prompt_keys(source_chunks, target_chunks, dtype):
    # (e) ComfyUI batches a 77-token with a 154-token conditioning by repeating the shorter one
    case, A, ws, wt = repeated_case(50, source_chunks, target_chunks)
    case = {n: t.to(dtype) for n, t in case.items()}
    reps = max(source_chunks, target_chunks)
    k_s, k_t, v_t = case["k_s"], case["k_t"], case["v_t"]
    if source_chunks < reps:
        k_s = k_s.repeat(1, reps // source_chunks, 1)
    if target_chunks < reps:
        k_t, v_t = k_t.repeat(1, reps // target_chunks, 1), v_t.repeat(1, reps // target_chunks, 1)
    lay_s, lay_t = key_layout(k_s, source_chunks * T), key_layout(k_t, target_chunks * T)
    assert len(lay_s) == len(lay_t) == reps * T and bool((lay_s >= 0).all() and (lay_t >= 0).all())
    got = edit_cross_attention(case["q_t"], k_t, v_t, case["q_s"], k_s, expand_mapper(A, lay_s, lay_t),
                               expand_columns(ws, lay_t, 0.0), expand_columns(wt, lay_t, 1.0), HEADS)
    assert got.dtype == dtype
    # the edit on the prompt's own keys, from explicit float64 maps (the two key lengths differ,
    # so no fused call can compute it)
    want = ref_edit(case["q_t"], case["k_t"], case["v_t"], case["q_s"], case["k_s"], A, ws, wt, HEADS)
    # measured over 50 seeds (dense random mappers, float32): max error 1.4e-5 with the source
    # repeated, 3.8e-6 with the target repeated, any thread count: the softmax over twice the keys
    # and the 2x longer value sums round differently from the unrepeated float64 sums. float64: <= 3e-14.
    atol = 5e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)


def test_edit_with_a_concatenated_foreign_block_keeps_the_target_map_there():
    # (e) the target's conditioning carries a ConditioningConcat block after its 77 prompt tokens
    q_t, q_s = rand(B, NQ, C, seed=61), rand(B, NQ, C, seed=62)
    k_prompt, k_foreign, k_s = rand(B, T, C, seed=63), rand(B, T, C, seed=64), rand(B, T, C, seed=65)
    k_t, v_t = torch.cat([k_prompt, k_foreign], 1), rand(B, 2 * T, C, seed=66)
    lay_s, lay_t = key_layout(k_s, T), key_layout(k_t, T)
    assert torch.equal(lay_t[T:], torch.full((T,), -1))
    A, ws, wt = torch.eye(T), torch.ones(T), torch.zeros(T)  # full injection of the prompt tokens
    A2, ws2, wt2 = expand_mapper(A, lay_s, lay_t), expand_columns(ws, lay_t, 0.0), expand_columns(wt, lay_t, 1.0)
    assert torch.equal(A2[:, T:], torch.zeros(T, T)) and torch.equal(ws2[T:], torch.zeros(T))
    assert torch.equal(wt2[T:], torch.ones(T))
    # the source's 77 columns are padded to the target's 154 by concatenation for the fused call
    # (equal key lengths); its zero rows of A' make those columns carry nothing
    k_s2 = torch.cat([k_s, k_foreign], 1)
    lay_s2 = key_layout(k_s2, T)
    A3 = expand_mapper(A, lay_s2, lay_t)
    got = edit_cross_attention(q_t, k_t, v_t, q_s, k_s2, A3, ws2, wt2, HEADS)
    M_new = ref_new_maps(q_t, k_t, q_s, k_s2, A3, ws2, wt2, HEADS)
    Mt, Ms = ref_maps(q_t, k_t, HEADS), ref_maps(q_s, k_s2, HEADS)
    assert torch.equal(M_new[..., T:], Mt[..., T:])  # the foreign columns: the target's own map, exactly
    torch.testing.assert_close(M_new[..., :T], Ms[..., :T], atol=1e-15, rtol=0)  # the prompt: the source's
    # float32 fused attention vs explicit float64 maps, as in check_edit
    torch.testing.assert_close(got.double(), ref_edit(q_t, k_t, v_t, q_s, k_s2, A3, ws2, wt2, HEADS), atol=1e-5, rtol=0)


def test_token_maps_fold_the_copies_of_a_repeated_conditioning():
    h, w = 3, 4
    q, k = rand(B, h * w, C, seed=71), rand(B, T, C, seed=72)
    once = token_maps(q, k, HEADS, (h, w), T)
    twice = token_maps(q, torch.cat([k, k], 1), HEADS, (h, w), T)
    assert twice.shape == (B, T, h, w)
    # each copy gets half of a token's attention, and the two halves are summed back; float32
    # softmax over 154 vs 77 keys: rounding of ~1e-7 on maps <= 1
    torch.testing.assert_close(twice, once, atol=1e-6, rtol=0)
    # a foreign block's columns are dropped: the prompt's maps then sum to less than one
    foreign = token_maps(q, torch.cat([k, rand(B, T, C, seed=73)], 1), HEADS, (h, w), T)
    assert (foreign.sum(1) < 1 - 1e-3).all()
