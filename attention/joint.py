"""Joint text-image attention (Flux, SD3's MM-DiT) seen as the UNet's two attentions.

A flow transformer attends once over the concatenated [text; image] tokens. An image query's row
of that one softmax has two blocks, its text block and its image block:

    out = m X + B,    B = (1 - m) Y,

X = softmax over the text keys alone (the query's cross-attention), Y = softmax over the image
keys alone (its self-attention), m the row's mass on the text keys, per head. The pack's edits
apply to the blocks as they do to a UNet's two attentions:
- P2P's cross-attention edits change X, the text block's distribution over the words (its mass
  stays the target's own);
- self-attention injection (P2P's early steps, FPE) puts the source's image block B, mass and
  shape, in place of the target's; the text block takes the rest of the row, m = the source's
  text mass, distributed over the words as the target's X (or its P2P edit).
B = (1 - m) Y and m come from the image block's attention and the two blocks' log-sum-exps
(image_block_heads). With the text rows and X, an edited call's attention products do the plain
call's work plus the image queries over the text keys once more.
With both parts the source's (P2P inside both windows, no share of the target's own map), m X + B
is the source's joint row on [aligned text values; image values]: one call (dit.py).
Text queries attend as usual: the edits are of the image.

Tensors use the pack's attention layout, (batch, tokens, heads * dim_head), except where a name
says `heads`: ComfyUI's head layout (batch, heads, tokens, dim_head), in which Flux hands over its
queries, keys and values, and which the adapter edits in without copying them to the pack's.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

JOINT_LAYOUT = "attention_edit_joint_layout"  # transformer_options: the model call's JointCall


class JointCall(NamedTuple):
    """What every joint attention call of one model call shares, found once per model call."""
    latent_shape: tuple[int, ...]
    text: int  # text tokens, first in the joint sequence
    sigma: float
    step: int | None  # the sampling step (None outside a sampler run)


def joint_layout(options: dict, x: torch.Tensor, context, sigma: float, step: int | None) -> dict:
    """transformer_options for a model call of latent `x` with the text tokens `context` at `sigma`
    and `step`: the attention override finds the text and image tokens of the joint sequence, and
    where the run is, from them."""
    if not isinstance(context, torch.Tensor) or context.dim() != 3:
        return options
    return dict(options, **{JOINT_LAYOUT: JointCall(tuple(x.shape), int(context.shape[1]), sigma, step)})


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def join_heads(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def packed(t: torch.Tensor) -> torch.Tensor:
    """A kept tensor in the pack's layout: a flow transformer's are kept in head layout."""
    return t if t.dim() == 3 else join_heads(t)


def image_rows(cross: torch.Tensor, image_block: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Image queries' output from its blocks: m X + B."""
    return torch.addcmul(image_block, mass, cross)


def edited_image_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int,
                      own: tuple[torch.Tensor, torch.Tensor] | None = None, x: torch.Tensor | None = None,
                      aligned_text_values: torch.Tensor | None = None) -> torch.Tensor:
    """The image rows of a joint call (head layout; q, k, v the target's [text; image]), m X + B with
    X = `x` (the P2P-edited text block; None: the target's own) and (B, m) from `own` = the source's
    (image queries, [text; image] keys) (None: the target's own). With `own` and
    `aligned_text_values` (the target's text values carried to the source's columns), both blocks
    are the source's: the row is its whole joint map on [aligned text values; image values]."""
    v_image = v[:, :, text:]
    if own is not None and aligned_text_values is not None:
        return F.scaled_dot_product_attention(own[0], own[1], torch.cat([aligned_text_values, v_image], 2))
    if x is None:
        x = F.scaled_dot_product_attention(q[:, :, text:], k[:, :, :text], v[:, :, :text])
    block, mass = image_block_heads(*(own or (q[:, :, text:], k)), v_image)
    return image_rows(x, block, mass)


SMALL_SCORES = 1 << 18  # image_block_heads: up to this many scores, explicit softmax (1 MiB in float32)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def kernel_gives_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether attention_lse runs PyTorch's CPU flash kernel, the one scaled_dot_product_attention runs
    on a CPU (same output), which hands out its rows' log-sum-exp."""
    return _CPU_FLASH is not None and q.device.type == "cpu" and q.shape[-1] == k.shape[-1] == v.shape[-1] \
        and q.dtype == k.dtype == v.dtype


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-layout attention and its rows' log-sum-exp (B, H, N, 1), float32 (kernel_gives_lse)."""
    out, lse = _CPU_FLASH(q, k, v, 0.0, False)
    return out, lse.unsqueeze(-1)


MARK = 8  # block_by_marked_values: the marker channel and padding, so that a head size stays a multiple of 8


def block_by_marked_values(q: torch.Tensor, k: torch.Tensor,
                           v_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """image_block_heads in one attention over the whole sequence, for kernels that give no
    log-sum-exp: the values are [0, 1] on the text keys and [v, 0] on the image keys, so the output
    is [B, m]. Queries and keys get as many zero channels as the values (the scores, scaled by the
    unpadded size, are unchanged): equal head sizes, multiples of 8 as the model's are, which the
    fused kernels take."""
    text, d = k.shape[2] - v_image.shape[2], q.shape[-1]
    values = v_image.new_zeros(*k.shape[:3], d + MARK)
    values[:, :, :text, d] = 1
    values[:, :, text:, :d] = v_image
    out = F.scaled_dot_product_attention(F.pad(q, (0, MARK)), F.pad(k, (0, MARK)), values, scale=d ** -0.5)
    return out[..., :d], out[..., d:d + 1]


def image_block_heads(q: torch.Tensor, k: torch.Tensor, v_image: torch.Tensor,
                      lse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, m) of head-layout image queries q (B, H, N, D) over a joint sequence k = [text; image]:
    the rows' image block (their attention to the image keys on the values v_image) and their text
    mass (B, H, N, 1). The text count is what k holds beyond the image values, so the source's
    sequence serves an injection into a target whose prompt has another length: the source's map
    and mass, the target's image values.

    B = (1 - m) Y with Y the attention over the image keys alone and m = sigmoid(lse_text - lse_image)
    from the two blocks' log-sum-exps, where the kernel gives them (kernel_gives_lse; on a CPU this
    costs less than the whole sequence once more). Elsewhere, or with `lse=False`, one attention over
    the whole sequence on marked values (block_by_marked_values). Calls of at most SMALL_SCORES
    scores take one explicit softmax instead (`lse=False`: never)."""
    text = k.shape[2] - v_image.shape[2]
    if q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= SMALL_SCORES and lse:
        # a small call (a demo model's): one explicit softmax costs less than two kernel launches
        p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return p[..., text:] @ v_image, p[..., :text].sum(-1, keepdim=True)
    if text == 0:
        y = F.scaled_dot_product_attention(q, k, v_image)
        return y, y.new_zeros(*y.shape[:3], 1)
    if not (lse and kernel_gives_lse(q, k, v_image)):
        return block_by_marked_values(q, k, v_image)
    y, lse_image = attention_lse(q, k[:, :, text:], v_image)
    mass = torch.sigmoid(attention_lse(q, k[:, :, :text], k[:, :, :text])[1] - lse_image).to(y.dtype)
    return torch.addcmul(y, mass, y, value=-1), mass


def image_block(q: torch.Tensor, k: torch.Tensor, v_image: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """image_block_heads in the pack's layout (B, L, H*D), the mass repeated over each head's channels."""
    block, mass = image_block_heads(split_heads(q, heads), split_heads(k, heads), split_heads(v_image, heads))
    return join_heads(block), join_heads(mass.expand_as(block))
