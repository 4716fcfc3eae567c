"""Joint attention split into its text and image parts (attention/joint.py): plain torch."""
from __future__ import annotations

import sys

import torch

from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attention.inject import sdpa  # noqa: E402
from attention.joint import attention_with_text_mass, combine  # noqa: E402

B, T, N, H, D = 2, 7, 10, 4, 8
# float32 rounding of a softmax over 17 keys and its recombination: measured up to 2.5e-6 on
# values of scale 2 over 50 seeds; 2e-5 leaves room for other CPUs' kernels.
TOL = 2e-5


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


def test_parts_recombine_to_the_joint_attention():
    """m X + (1 - m) Y with the plain parts, and out + m (X - X), are the joint attention."""
    for seed in range(5):
        q, k, v = qkv(seed)
        out, mass = attention_with_text_mass(q, k, v, H, T)
        qi = q[:, T:]
        x, y = sdpa(qi, k[:, :T], v[:, :T], H), sdpa(qi, k[:, T:], v[:, T:], H)
        joint = sdpa(q, k, v, H)[:, T:]
        assert (combine(out[:, T:], mass[:, T:], x, x, y) - joint).abs().max() < TOL
        assert (combine(out[:, T:], mass[:, T:], x, x, None) - joint).abs().max() < TOL
        assert torch.equal(combine(out[:, T:], mass[:, T:], None, x, None), out[:, T:])


def test_an_injected_part_changes_only_its_share():
    """Another image map (the source's) moves the output by (1 - m)(Y' - Y): the text's share stays."""
    q, k, v = qkv(0)
    q2, k2, _ = qkv(1)
    out, mass = attention_with_text_mass(q, k, v, H, T)
    qi = q[:, T:]
    x, y = sdpa(qi, k[:, :T], v[:, :T], H), sdpa(qi, k[:, T:], v[:, T:], H)
    y_src = sdpa(q2[:, T:], k2[:, T:], v[:, T:], H)  # the source's map, the target's values
    edited = combine(out[:, T:], mass[:, T:], None, x, y_src)
    assert (edited - (mass[:, T:] * x + (1 - mass[:, T:]) * y_src)).abs().max() < TOL
    assert (edited - out[:, T:]).abs().max() > 100 * TOL
