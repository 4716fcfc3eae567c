"""The attention edits, written so that no full attention map is built where the maths allows.

Tensors use ComfyUI's attention layout: q, k, v are (batch, tokens, heads * dim_head).

- Injecting a map M_src = softmax(Q_src K_srcᵀ/√d) into the target is attention(Q_src, K_src, V).
- P2P's cross-attention edits are all of the form
      M_new = (M_src A) diag(alpha * c) + M_tgt diag(1 - alpha)
  (A: token alignment, alpha: which target tokens take the source's map, c: re-weighting), and
      M_new V = attention(Q_src, K_src, A (alpha c V)) + attention(Q_tgt, K_tgt, (1 - alpha) V),
  so replace, refine and re-weight are one or two fused attention calls.
- Only local blend needs explicit maps, of a few tokens at a low resolution.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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


def cross_edit_jobs(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                    q_s: torch.Tensor, k_s: torch.Tensor, mapper: torch.Tensor,
                    alpha: torch.Tensor, equalizer: torch.Tensor) -> list[Job]:
    """The attention products whose sum is M_new V, M_new = (M_src A) diag(alpha*c) + M_tgt diag(1-alpha).

    mapper A: (n_src, n_tgt); alpha, equalizer: (n_tgt,) or (B, n_tgt).
    """
    alpha = alpha.to(v_t).expand(v_t.shape[0], -1)[..., None]
    equalizer = equalizer.to(v_t).expand(v_t.shape[0], -1)[..., None]
    v_src = torch.einsum("st,btc->bsc", mapper.to(v_t), alpha * equalizer * v_t)
    jobs = [(q_s, k_s, v_src)]
    if bool((alpha < 1).any()):
        jobs.append((q_t, k_t, (1 - alpha) * v_t))
    return jobs


def run_jobs(groups: list[list[Job]], heads: int, attention: AttentionFn = sdpa) -> list[torch.Tensor]:
    """Each group's summed attention products, computed in ONE attention call over the
    concatenated batch (the keys of all jobs must have the same length)."""
    jobs = [job for group in groups for job in group]
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
                         alpha: torch.Tensor, equalizer: torch.Tensor, heads: int,
                         attention: AttentionFn = sdpa) -> torch.Tensor:
    """Output of M_new V (see cross_edit_jobs): one or two fused attention products, one call."""
    return run_jobs([cross_edit_jobs(q_t, k_t, v_t, q_s, k_s, mapper, alpha, equalizer)], heads, attention)[0]


def inject_self_attention(q_s: torch.Tensor, k_s: torch.Tensor, v_t: torch.Tensor, heads: int,
                          attention: AttentionFn = sdpa) -> torch.Tensor:
    """The target reads its own values through the source's self-attention map."""
    return attention(q_s, k_s, v_t, heads)


def token_maps(q: torch.Tensor, k: torch.Tensor, heads: int, hw: tuple[int, int], tokens: int) -> torch.Tensor:
    """Head-averaged cross-attention maps of the first `tokens` tokens: (B, tokens, h, w)."""
    probs = attention_probs(q, k, heads)[..., :tokens].mean(1)  # B, Nq, T
    return probs.transpose(1, 2).reshape(q.shape[0], tokens, *hw)


def blend_mask(maps: torch.Tensor, positions: list[int], size: tuple[int, int], threshold: float = 0.3,
               subtract: list[int] | None = None, subtract_maps: torch.Tensor | None = None,
               dilate: int = 1) -> torch.Tensor:
    """P2P local blend: the words' maps (B, T, h, w) summed, max-pooled over (2*dilate+1)² cells
    (P2P: 3x3 on 16x16 maps), resized to the latent, normalised by their maximum and thresholded.
    `subtract` words' mask is removed."""

    def word_mask(m: torch.Tensor, pos: list[int]) -> torch.Tensor:
        m = m[:, pos].sum(1, keepdim=True).float()
        if dilate > 0:
            m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
        m = F.interpolate(m, size=size, mode="nearest")
        return m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12) > threshold

    mask = word_mask(maps, positions)
    if subtract:
        mask = mask & ~word_mask(maps if subtract_maps is None else subtract_maps, subtract)
    return mask.float()
