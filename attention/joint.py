"""Joint text-image attention (Flux, SD3's MM-DiT) seen as the UNet's two attentions.

A flow transformer attends once over the concatenated [text; image] tokens. For an image query
the one softmax over all keys splits exactly into its two blocks:

    out = m X + (1 - m) Y,

X = softmax over the text keys alone (the query's cross-attention), Y = softmax over the image
keys alone (its self-attention), m the query's attention mass on the text keys, per head. So the
pack's edits apply unchanged: P2P's cross-attention edits change X, self-attention injection
(P2P's early steps, FPE) changes Y, and the query keeps its own m (how much it listens to the
text at all). Text queries attend as usual: the edits are of the image.

Tensors use the pack's attention layout, (batch, tokens, heads * dim_head).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

JOINT_LAYOUT = "attention_edit_joint_layout"  # transformer_options: (latent shape, text tokens) of a model call


def joint_layout(options: dict, x: torch.Tensor, context) -> dict:
    """transformer_options for a model call of latent `x` with the text tokens `context`: the
    attention override finds the text and image tokens of the joint sequence from them."""
    if not isinstance(context, torch.Tensor) or context.dim() != 3:
        return options
    return dict(options, **{JOINT_LAYOUT: (tuple(x.shape), int(context.shape[1]))})


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def join_heads(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def attention_with_text_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                             text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain joint attention (B, L, H*D) and every query's attention mass on the first
    `text_tokens` keys, as (B, L, H*D) (each head's mass repeated over its channels).

    One attention call: the values carry one more channel per head, 1 on the text keys, whose
    output is the mass; q and k get a zero channel so every kernel sees equal head sizes."""
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    d = qh.shape[-1]
    marker = torch.zeros(*vh.shape[:-1], 1, dtype=vh.dtype, device=vh.device)
    marker[:, :, :text_tokens] = 1
    pad = lambda t: torch.cat([t, torch.zeros_like(t[..., :1])], -1)  # noqa: E731
    out = F.scaled_dot_product_attention(pad(qh), pad(kh), torch.cat([vh, marker], -1), scale=d ** -0.5)
    mass = out[..., d:].expand(*out.shape[:-1], d)
    return join_heads(out[..., :d]), join_heads(mass)


def combine(plain: torch.Tensor, mass: torch.Tensor, cross: torch.Tensor | None, cross_plain: torch.Tensor | None,
            self_out: torch.Tensor | None) -> torch.Tensor:
    """Image queries' joint output from its parts (see the module): with the self-attention
    replaced, m X' + (1 - m) Y'; with only the cross-attention changed, out + m (X' - X), which
    needs no second attention over the image keys."""
    if self_out is not None:
        x = cross if cross is not None else cross_plain
        return mass * x + (1 - mass) * self_out
    if cross is None:
        return plain
    return plain + mass * (cross - cross_plain)
