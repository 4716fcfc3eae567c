"""Joint attention split into its text and image parts (attention/joint.py): plain torch."""
from __future__ import annotations

import sys
from unittest.mock import patch

import torch

from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch.nn.functional as F  # noqa: E402

import attention.joint as joint  # noqa: E402
from attention.inject import sdpa  # noqa: E402
from attention.joint import image_block, image_block_heads, image_rows, join_heads, split_heads  # noqa: E402

B, T, N, H, D = 2, 7, 10, 4, 8
# float32 rounding of a softmax over 17 keys and its recombination: measured up to 2.9e-6 on
# values of scale 2 over 50 seeds; 2e-5 leaves room for other CPUs' kernels.
TOL = 2e-5


def attention_with_text_mass(q, k, v, heads: int, text_tokens: int):
    """Reference: the plain joint attention (B, L, H*D) and every query's mass on the first
    `text_tokens` keys (repeated over each head's channels), from one value channel more that is 1
    on the text keys (q and k padded alike)."""
    d = q.shape[-1] // heads
    v_marked = F.pad(split_heads(v, heads), (0, 1))
    v_marked[..., :text_tokens, -1] = 1
    out = F.scaled_dot_product_attention(F.pad(split_heads(q, heads), (0, 1)), F.pad(split_heads(k, heads), (0, 1)),
                                         v_marked, scale=d ** -0.5)
    return join_heads(out[..., :d]), join_heads(out[..., d:].expand_as(out[..., :d]))


def qkv(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T + N, H * D, generator=g) * 2 for _ in range(3)]


def test_plain_attention_and_text_mass_in_one_call():
    for seed in range(5):
        q, k, v = qkv(seed)
        out, mass = attention_with_text_mass(q, k, v, H, T)
        assert (out - sdpa(q, k, v, H)).abs().max() < TOL
        d = H * D // H
        logits = q.view(B, -1, H, d).transpose(1, 2) @ k.view(B, -1, H, d).permute(0, 2, 3, 1) / d ** 0.5
        expected = logits.softmax(-1)[..., :T].sum(-1)  # (B, H, L)
        assert (mass.view(B, -1, H, d)[..., 0].transpose(1, 2) - expected).abs().max() < TOL


def test_blocks_recombine_to_the_joint_attention():
    """m X + B (B: the image queries over the whole sequence, text values zeroed) are the joint
    attention's image rows."""
    for seed in range(5):
        q, k, v = qkv(seed)
        out, mass = attention_with_text_mass(q, k, v, H, T)
        qi = q[:, T:]
        x = sdpa(qi, k[:, :T], v[:, :T], H)
        block, block_mass = image_block(qi, k, v[:, T:], H)
        joint = sdpa(q, k, v, H)[:, T:]
        assert (block_mass - mass[:, T:]).abs().max() < TOL
        assert (image_rows(x, block, block_mass) - joint).abs().max() < TOL


def test_an_injected_image_block_brings_its_mass_and_the_text_takes_the_rest():
    """The source's image block (another q, k: its map and its text mass), the target's values: the
    row is m' X + B' and still sums to one (checked with constant values)."""
    q, k, v = qkv(0)
    q2, k2, _ = qkv(1)
    out, mass = attention_with_text_mass(q, k, v, H, T)
    x = sdpa(q[:, T:], k[:, :T], v[:, :T], H)
    block, m_src = image_block(q2[:, T:], k2, v[:, T:], H)
    edited = image_rows(x, block, m_src)
    assert (edited - out[:, T:]).abs().max() > 100 * TOL
    assert (m_src - mass[:, T:]).abs().max() > 0.01  # the source's own text mass
    ones = torch.ones_like(v)
    total = image_rows(sdpa(q[:, T:], k[:, :T], ones[:, :T], H),
                           image_block(q2[:, T:], k2, ones[:, T:], H)[0], m_src)
    assert (total - 1).abs().max() < TOL


def test_a_source_prompt_of_another_length_injects_its_image_block():
    """FPE with an empty source prompt (1 text token) into a 5-token target: the source's image block
    and mass over its own sequence, the target's image values; every row still sums to one."""
    q, k, v = qkv(0)
    g = torch.Generator().manual_seed(7)
    short = 1
    k_src = torch.cat([torch.randn(k.shape[0], short, k.shape[2], generator=g), k[:, T:]], 1)
    q_src = torch.randn(q.shape[0], q.shape[1] - T, q.shape[2], generator=g)
    ones = torch.ones_like(v)
    block, mass = image_block(q_src, k_src, ones[:, T:], H)
    total = image_rows(sdpa(q[:, T:], k[:, :T], ones[:, :T], H), block, mass)
    assert torch.isfinite(total).all() and (total - 1).abs().max() < TOL
    # the mass is the source's own: its image-only attention equals the short sequence's joint rows
    full, full_mass = attention_with_text_mass(q_src, k_src, torch.cat([torch.zeros_like(ones[:, :short]), ones[:, T:]], 1), H, short)
    assert (block - full).abs().max() < TOL and (mass - full_mass).abs().max() < TOL


def test_the_mass_from_log_sum_exps_equals_the_mass_from_a_marked_value():
    """image_block_heads' three ways to the block and the text mass (one explicit softmax for small
    calls; the CPU kernel's log-sum-exps; one attention over the whole sequence on marked values,
    for other devices) agree, and match the softmax."""
    # the three differ from each other and from the softmax by at most 3.6e-6 over 50 seeds: TOL holds
    for seed in range(5):
        q, k, v = qkv(seed)
        qh, kh, vh = (split_heads(t, H) for t in (q[:, T:], k, v[:, T:]))
        by_lse, by_marker = image_block_heads(qh, kh, vh), image_block_heads(qh, kh, vh, lse=False)
        with patch.object(joint, "SMALL_SCORES", 0):  # these shapes are small: the kernels' way, forced
            by_kernel = image_block_heads(qh, kh, vh)
        expected = (qh @ kh.transpose(-1, -2) / D ** 0.5).softmax(-1)[..., :T].sum(-1, keepdim=True)
        for block, mass in (by_lse, by_marker, by_kernel):
            assert (mass - expected).abs().max() < TOL
            assert (block - by_marker[0]).abs().max() < TOL


def test_the_marked_values_keep_the_fused_kernels_head_sizes():
    """Where no kernel gives log-sum-exps (a GPU), the block and the mass come from one attention over
    the whole sequence whose queries, keys and values have one head size, a multiple of 8 (the fused
    kernels' condition), for the head sizes of Flux (128), SD3 (64) and TinyFlux (32)."""
    calls = []
    sdpa_kernel = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        calls.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return sdpa_kernel(q, k, v, *args, **kwargs)
    for d in (128, 64, 32):
        q, k, v = torch.randn(1, 2, 6, d), torch.randn(1, 2, 9, d), torch.randn(1, 2, 6, d)
        calls.clear()
        with patch.object(joint.F, "scaled_dot_product_attention", recording):
            block, mass = image_block_heads(q, k, v, lse=False)
        (sizes,) = calls
        assert len(set(sizes)) == 1 and sizes[0] % 8 == 0 and sizes[0] > d, sizes
        p = (q @ k.transpose(-1, -2) / d ** 0.5).softmax(-1)  # TOL: float32 rounding of a 9-key softmax, as above
        assert (mass - p[..., :3].sum(-1, keepdim=True)).abs().max() < TOL
        assert (block - p[..., 3:] @ v).abs().max() < TOL


def test_both_parts_from_the_source_are_one_attention_over_its_sequence():
    """P2P with the image block and the text block both the source's (no share of the target's own
    map): m X + B, X over the aligned text values, is the source's joint row on [text values; image
    values], which the adapter computes in one call."""
    for seed in range(5):
        q_src, k_src, v_text = qkv(seed)
        _, _, v_image = qkv(seed + 100)
        qi, v_text, v_image = q_src[:, T:], v_text[:, :T], v_image[:, T:]
        block, mass = image_block(qi, k_src, v_image, H)
        rows = image_rows(sdpa(qi, k_src[:, :T], v_text, H), block, mass)
        assert (rows - sdpa(qi, k_src, torch.cat([v_text, v_image], 1), H)).abs().max() < TOL
