"""The attention edits, written so that no full attention map is built where the maths allows.

Tensors use ComfyUI's attention layout: q, k, v are (batch, tokens, heads * dim_head).

- Injecting a map M_src = softmax(Q_src K_srcᵀ/√d) into the target is attention(Q_src, K_src, V).
- P2P's cross-attention edits are all of the form
      M_new = (M_src A) diag(ws) + M_tgt diag(wt),   ws = t g c,   wt = 1 - t + t (1 - g) c
  (A: token alignment, t: the step window, g: which target tokens have a source counterpart,
  c: re-weighting, which scales a column whatever its origin, as P2P's equaliser does), and
      M_new V = attention(Q_src, K_src, A (ws V)) + attention(Q_tgt, K_tgt, wt V),
  so replace, refine and re-weight are one or two fused attention calls.
- Only local blend needs explicit maps, of a few tokens at a low resolution.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .joint import packed

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(QKᵀ/√d) V per head, (B, N, H*D) in and out."""
    b, n, c = q.shape
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, c)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Explicit maps (B, heads, Nq, Nk), for the few places that need them."""
    d = q.shape[-1] // heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    return torch.softmax(split(q).float() @ split(k).float().transpose(-1, -2) / d**0.5, dim=-1)


Job = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (q, k, v) of one attention product


@functools.lru_cache(maxsize=64)
def _prompt_first(length: int, tokens: int) -> torch.Tensor:
    """The layout of `length` key columns whose first `tokens` are the prompt's (shared: not to be written)."""
    layout = torch.full((length,), -1, dtype=torch.long)
    n = min(tokens, length)
    layout[:n] = torch.arange(n)
    return layout


def key_layout(k: torch.Tensor, tokens: int) -> torch.Tensor:
    """The prompt token that each key column is, -1 for columns that are not the prompt's.

    ComfyUI lengthens a conditioning batched with a longer one by repeating it (conds.py, "padding
    with repeat doesn't change result"): blocks equal to the first are copies of the prompt.
    Other columns beyond the prompt (a ConditioningConcat) belong to no prompt token. Blocks are
    compared with a tolerance far below the difference of any two prompts' keys, because a
    projection need not round identical rows alike at every position."""
    if k.shape[1] < 2 * tokens:  # no room for a repeated copy
        return _prompt_first(k.shape[1], tokens)
    layout = _prompt_first(k.shape[1], tokens).clone()
    first = k[:, :tokens].float()
    scale = float(first.abs().amax()) if first.numel() else 0.0
    for b in range(1, k.shape[1] // tokens if k.shape[1] > tokens else 1):
        block = k[:, b * tokens:(b + 1) * tokens].float()
        if float((block - first).abs().amax()) <= 1e-4 * scale:
            layout[b * tokens:(b + 1) * tokens] = torch.arange(tokens)
    return layout


def text_layout(k: torch.Tensor, text: int, tokens: int) -> torch.Tensor:
    """key_layout of the first `text` keys of head-layout keys k (B, H, L, D) (a flow transformer's
    text keys come first), looked at only where they have room for a repeated copy."""
    return _prompt_first(text, tokens) if text < 2 * tokens else key_layout(k[:, :, :text].transpose(1, 2), tokens)


def expand_columns(values: torch.Tensor, layout: torch.Tensor, fill: float) -> torch.Tensor:
    """Per-token values (..., T) as per-key-column values (..., L); `fill` on foreign columns."""
    out = values[..., layout.clamp_min(0)]
    return torch.where(layout >= 0, out, torch.full_like(out, fill))


def expand_mapper(mapper: torch.Tensor, src_layout: torch.Tensor, tgt_layout: torch.Tensor) -> torch.Tensor:
    """A (T_s, T_t) as A' (L_s, L_t) over the actual key columns: a source token's copies each
    carry their share of its attention already; a target token's r copies each take 1/r of its
    column (their values are equal), so M_src' A' V' = M_src A V."""
    copies = torch.bincount(tgt_layout[tgt_layout >= 0], minlength=mapper.shape[1]).clamp_min(1).to(mapper)
    out = mapper[src_layout.clamp_min(0)][:, tgt_layout.clamp_min(0)] / copies[tgt_layout.clamp_min(0)]
    keep = (src_layout >= 0)[:, None] & (tgt_layout >= 0)[None, :]
    return out * keep.to(out)


def cross_edit_jobs(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                    q_s: torch.Tensor, k_s: torch.Tensor, mapper: torch.Tensor,
                    source_weight: torch.Tensor, target_weight: torch.Tensor | None) -> list[Job]:
    """The attention products whose sum is M_new V, M_new = (M_src A) diag(ws) + M_tgt diag(wt).

    mapper A: (L_s, L_t) over the key columns; ws, wt: (L_t,) or (B, L_t), wt None where it is
    zero (the target's own map is then not read). P2P's edits: ws = t g c and
    wt = 1 - t + t (1 - g) c, with t the step window, g the alignment, c the weights.
    """
    v_src = torch.matmul(_like(mapper, v_t), _like(source_weight, v_t)[..., None] * v_t)
    jobs = [(q_s, k_s, v_src)]
    if target_weight is not None and bool((target_weight != 0).any()):
        jobs.append((q_t, k_t, _like(target_weight, v_t)[..., None] * v_t))
    return jobs


def _like(t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """t in other's dtype and device (itself when it is already)."""
    return t if t.dtype == other.dtype and t.device == other.device else t.to(other)


def run_jobs(groups: list[list[Job]], heads: int, attention: AttentionFn = sdpa) -> list[torch.Tensor]:
    """Each group's summed attention products, computed in ONE attention call over the
    concatenated batch."""
    jobs = [job for group in groups for job in group]
    lengths = {job[1].shape[1] for job in jobs}
    if len(lengths) > 1:  # keys of prompts of different lengths: repeated to a common one, as ComfyUI
        common = math.lcm(*lengths)  # batches them (a repeated key and value attends exactly as one)
        jobs = [(q, k.repeat(1, common // k.shape[1], 1), v.repeat(1, common // v.shape[1], 1)) for q, k, v in jobs]
    if len(jobs) == 1:
        return [attention(*jobs[0], heads)]
    out = attention(*(torch.cat([job[i] for job in jobs]) for i in range(3)), heads)
    pieces = out.split([job[0].shape[0] for job in jobs])
    results, i = [], 0
    for group in groups:
        results.append(sum(pieces[i + 1:i + len(group)], pieces[i]))
        i += len(group)
    return results


def edit_cross_attention(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                         q_s: torch.Tensor, k_s: torch.Tensor, mapper: torch.Tensor,
                         source_weight: torch.Tensor, target_weight: torch.Tensor, heads: int,
                         attention: AttentionFn = sdpa) -> torch.Tensor:
    """Output of M_new V (see cross_edit_jobs): one or two fused attention products, one call."""
    jobs = cross_edit_jobs(q_t, k_t, v_t, q_s, k_s, mapper, source_weight, target_weight)
    return run_jobs([jobs], heads, attention)[0]


def inject_self_attention(q_s: torch.Tensor, k_s: torch.Tensor, v_t: torch.Tensor, heads: int,
                          attention: AttentionFn = sdpa) -> torch.Tensor:
    """The target reads its own values through the source's self-attention map."""
    return attention(q_s, k_s, v_t, heads)


def token_maps(q: torch.Tensor, k: torch.Tensor, heads: int, hw: tuple[int, int], tokens: int,
               keep: int | None = None) -> torch.Tensor:
    """Head-averaged cross-attention maps of a prompt of `tokens` tokens, the copies of a repeated
    conditioning summed (key_layout), of its first `keep` tokens (all): (B, keep, h, w). q, k: the
    pack's layout, or head layout (as a flow transformer's are kept)."""
    q, k = packed(q), packed(k)
    probs = attention_probs(q, k, heads).mean(1)  # B, Nq, L
    layout = key_layout(k, tokens).to(probs.device)
    keep = tokens if keep is None else keep
    own = (layout >= 0) & (layout < keep)
    out = probs.new_zeros(probs.shape[0], probs.shape[1], keep).index_add_(-1, layout[own], probs[..., own])
    return out.transpose(1, 2).reshape(q.shape[0], keep, *hw)


def edited_maps(source: torch.Tensor, target: torch.Tensor, mapper: torch.Tensor,
                source_weight: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """Token maps (B, T_t, h, w) after the cross-attention edit: (M_src A) diag(ws) + M_tgt diag(wt).
    The maps may hold a prompt's first tokens only (Prompt.map_tokens): A and w are cut to match."""
    ns, nt = source.shape[1], target.shape[1]
    moved = torch.einsum("bshw,st->bthw", source.to(target), mapper[:ns, :nt].to(target))
    ws, wt = source_weight[..., :nt].to(target), target_weight[..., :nt].to(target)
    return moved * ws[..., :, None, None] + target * wt[..., :, None, None]


def words_mask(source_maps: torch.Tensor | None, target_maps: torch.Tensor | None, source_positions: list[int],
               target_positions: list[int], size: tuple[int, int], threshold: float = 0.3,
               dilate: int = 0) -> torch.Tensor:
    """P2P's word mask, (B, 1, H, W) bool: each prompt's words' maps (B, T, h, w) summed,
    max-pooled over (2*dilate+1)² cells (P2P: 3x3 on 16x16 maps; 0: unpooled), resized to the
    latent, normalised by their maximum and thresholded; the source's and the target's united."""

    def one(m: torch.Tensor, pos: list[int]) -> torch.Tensor:
        m = m[:, pos].sum(1, keepdim=True).float()
        if dilate > 0:
            m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
        m = F.interpolate(m, size=size, mode="nearest")
        return m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12) > threshold

    masks = [one(m, p) for m, p in ((source_maps, source_positions), (target_maps, target_positions)) if p]
    if not masks:
        raise ValueError("words_mask needs at least one word")
    return masks[0] if len(masks) == 1 else masks[0] | masks[1]


def blend_mask(source_maps: torch.Tensor, target_maps: torch.Tensor, source_positions: list[int],
               target_positions: list[int], size: tuple[int, int], threshold: float = 0.3,
               subtract_source: list[int] | None = None, subtract_target: list[int] | None = None,
               dilate: int = 1) -> torch.Tensor:
    """P2P's local-blend mask (float): the words' pooled mask less the subtracted words' unpooled
    mask, both the union of the source's and the target's (as P2P's LocalBlend computes them)."""
    mask = words_mask(source_maps, target_maps, source_positions, target_positions, size, threshold, dilate)
    if subtract_source or subtract_target:
        mask = mask & ~words_mask(source_maps, target_maps, subtract_source or [], subtract_target or [], size, threshold)
    return mask.float()
