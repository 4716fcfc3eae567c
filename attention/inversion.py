"""DDIM inversion and exact reconstruction, in ComfyUI's sigma space.

`denoise(x, sigma) -> x0` is any model's denoised prediction, so the functions here run on plain
tensors. ComfyUI's samplers step along d = (x - x0) / sigma for every model: the noise for eps and
v-prediction (x = x0 + sigma * eps), the velocity for flow matching (Flux, SD3: x = (1 - sigma) *
x0 + sigma * noise, d = noise - x0). An Euler step is the same formula for both, so one inversion
serves UNets and flow transformers. Sampling sigmas come in ComfyUI's order, sigma_max first and
0 last; a trajectory holds the latent at each of them, from the noise (index 0) to the image.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


class InversionError(ValueError):
    pass


@dataclass
class Trajectory:
    """What DDIMInvert leaves for the branches: latents[k] is the inverted latent at sigmas[k]
    (model space, i.e. after the latent format's scaling); latents[-1] is the image itself."""
    sigmas: torch.Tensor  # (N + 1,), sigma_max ... 0
    latents: torch.Tensor  # (N + 1, B, C, H, W)
    noise_latent: torch.Tensor  # the LATENT output (before the model's latent scaling): latents[0]
    model_id: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt: torch.Tensor | None = None  # the positive conditioning it was inverted with (checked by AttentionStore)
    solver: str = "euler"

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def at(self, sigma: float) -> int:
        """Index of the trajectory latent at `sigma` (a sampling step's start)."""
        dist = (self.sigmas - sigma).abs()
        k = int(dist.argmin())
        if float(dist[k]) > 1e-4 * max(1.0, sigma):
            raise InversionError(f"sigma {sigma:.5g} is not on the inversion's schedule")
        return k


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One deterministic DDIM (= Euler in sigma space) step from sigma to sigma_next, either way."""
    return denoised + (x - denoised) * (sigma_next / sigma)


SOLVERS = {"euler": 1, "midpoint": 2}  # inversion solver -> model evaluations per step


def direction(denoise: Denoise, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """d = (x - x0) / sigma: the noise (eps models) or the velocity (flow models)."""
    return (x - denoise(x, sigma)) / sigma


def invert(denoise: Denoise, image_latent: torch.Tensor, sigmas: torch.Tensor,
           callback: Callable[[int, torch.Tensor], None] | None = None, solver: str = "euler") -> torch.Tensor:
    """Walk the sampling schedule backwards from the image (sigmas[-1] = 0) to sigmas[0].
    Returns all latents, (N + 1, B, C, H, W).

    - "euler" (DDIM inversion): step k -> k-1 uses the direction predicted at the *target* sigma
      from the current latent, d(x_k, sigma_{k-1}) -- the approximation d(x_{k-1}) ~ d(x_k) of
      Mokady et al., which never evaluates the model at sigma 0. One evaluation per step.
    - "midpoint" (second order, as RF-Solver's Taylor step with a finite-difference derivative):
      d(x_k, sigma_k), a half step to the midpoint sigma, and the whole step along the midpoint's
      direction. The midpoint is the geometric mean of the two sigmas, ComfyUI's `dpm_2`, so that
      sampler retraces the inversion step for step. The step from sigma 0 stays an Euler step as
      above (dpm_2's last step is Euler). Two evaluations per step."""
    if solver not in SOLVERS:
        raise InversionError(f"unknown inversion solver {solver!r}; one of {sorted(SOLVERS)}")
    n = len(sigmas) - 1
    out = [None] * (n + 1)
    x = image_latent
    out[n] = x
    for k in range(n, 0, -1):
        s_to, s_from = float(sigmas[k - 1]), float(sigmas[k])
        if solver == "euler" or s_from == 0.0:
            x = x + (s_to - s_from) * direction(denoise, x, s_to)
        else:
            s_mid = math.sqrt(s_from * s_to)
            half = x + (s_mid - s_from) * direction(denoise, x, s_from)
            x = x + (s_to - s_from) * direction(denoise, half, s_mid)
        out[k - 1] = x
        if callback is not None:
            callback(n - k, x)
    return torch.stack(out)


def anchored_denoised(x: torch.Tensor, sigma: float, sigma_next: float, target: torch.Tensor) -> torch.Tensor:
    """The denoised prediction whose Euler step from (x, sigma) lands exactly on `target` at
    sigma_next. Direct inversion (PnP Inversion, Ju et al.) re-anchors the source branch to the
    inversion trajectory this way; the difference to the model's own prediction is the correction."""
    r = sigma_next / sigma
    return (target - r * x) / (1.0 - r)


def cfg_step(x: torch.Tensor, sigma: float, sigma_next: float, cond_denoised: torch.Tensor,
             uncond_denoised: torch.Tensor, cfg: float) -> torch.Tensor:
    return euler_step(x, uncond_denoised + cfg * (cond_denoised - uncond_denoised), sigma, sigma_next)


def optimize_null_embedding(step: Callable[[torch.Tensor], torch.Tensor], embedding: torch.Tensor,
                            target: torch.Tensor, inner_steps: int, lr: float, tolerance: float,
                            check: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Null-text inversion's inner loop (Mokady et al.): Adam on the unconditional embedding so
    that the guided step `step(embedding)` lands on the inversion's next latent. At most
    `inner_steps` evaluations of `step`; the last one (or the first below `tolerance`, mean squared
    error) is not followed by an update, so its output is the step taken: no extra evaluation.
    Returns (embedding, its step output, evaluations used)."""
    emb = embedding.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    for used in range(1, inner_steps + 1):
        if check is not None:
            check()
        out = step(emb)
        loss = torch.nn.functional.mse_loss(out, target)
        if used == inner_steps or loss.item() < tolerance:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return emb.detach(), out.detach(), used


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    mse = float(torch.mean((a.float() - b.float()) ** 2))
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(peak**2 / mse)).item()
