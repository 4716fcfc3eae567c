"""Real images: DDIM inversion through ComfyUI's own sampler machinery, and null-text inversion."""
from __future__ import annotations

import contextlib

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..attention.dit import is_dit
from ..attention.inversion import SOLVERS, Trajectory, cfg_step, invert, optimize_null_embedding
from .common import NodeInputError, current_controller, guidance_distilled, model_id
from .common import CATEGORY, Schema

InversionType = io.Custom("INVERSION")


class InvertedNoise:
    """SamplerCustomAdvanced's noise for a branch that starts from an inversion. With DDIMInvert's
    LATENT as latent_image the sampler then starts exactly at the inverted latent: a flow model
    starts at sigma * noise + (1 - sigma) * latent, so its noise is that latent; other models add
    sigma * noise to the latent, so theirs is zero."""

    seed = 0  # nothing random: the same start on every run

    def __init__(self, latent: torch.Tensor, flow: bool):
        self.latent, self.flow = latent, flow

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        if tuple(samples.shape) != tuple(self.latent.shape):
            raise NodeInputError("DDIMInvert", "noise", f"the sampler's latent is {tuple(samples.shape)} but the "
                                 f"inversion's is {tuple(self.latent.shape)}: connect DDIMInvert's LATENT as the "
                                 "sampler's latent_image")
        return self.latent.clone() if self.flow else torch.zeros_like(self.latent)


def is_flow(model) -> bool:
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def schedule(model, scheduler: str, steps: int) -> torch.Tensor:
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).float().cpu()


class DDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return Schema(
            node_id="DDIMInvert", display_name="DDIM Invert", category=CATEGORY + "/inversion",
            search_aliases=["inversion", "ddim inversion", "invert image", "real image editing", "image to noise"],
            description="Deterministic inversion of an image's latent to the noise it would be sampled from "
                        "(DDIM inversion; on Flux and SD3 the flow ODE walked backwards). Sample the source and "
                        "target branches from it with the same steps and scheduler and sampler euler or ddim (others "
                        "are refused): KSamplerAdvanced (add_noise disable) from the LATENT, or SamplerCustomAdvanced "
                        "with noise = this node's noise and latent_image = the LATENT (required on Flux and SD3). "
                        "Connect the inversion to AttentionStore for exact reconstruction (direct inversion, "
                        "correct_target off). To keep what the prompts do not name (a background): FPE, or P2P with "
                        "P2PLocalBlend (docs/real-images.md).",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL (not one patched by this pack)."),
                io.Conditioning.Input("positive", tooltip="The source prompt: P2P needs one that describes the image; "
                                      "FPE works with an empty prompt."),
                io.Conditioning.Input("negative", tooltip="Used only when cfg > 1 (an empty prompt)."),
                io.Latent.Input("latent", tooltip="The image's VAEEncode output."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Use the same steps in both branches."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="Use the same scheduler in both branches."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Guidance while inverting. 1.0 (no guidance) inverts most faithfully "
                                       "(Flux.1-dev's distilled guidance is the conditioning's FluxGuidance, not this)."),
                io.Combo.Input("solver", options=list(SOLVERS), default="euler", optional=True,
                               tooltip="euler: DDIM inversion, one model call per step. midpoint: second order "
                                       "(RF-Solver), two calls per step; it reconstructs better at the same steps, "
                                       "and the dpm_2 sampler retraces it without AttentionStore."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The inverted latent at the first sigma: sample both "
                                 "branches from it (KSamplerAdvanced with add_noise disabled, or SamplerCustomAdvanced "
                                 "with this node's noise)."),
                InversionType.Output(display_name="inversion", tooltip="The trajectory (latent at every sigma)."),
                io.Noise.Output(display_name="noise", tooltip="For SamplerCustomAdvanced, with the LATENT as its "
                                "latent_image: the branches start exactly at the inverted latent. Required on flow "
                                "models (Flux, SD3), where KSamplerAdvanced without noise would start at zero."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, steps, scheduler, cfg, solver="euler") -> io.NodeOutput:
        if current_controller(model) is not None:
            raise NodeInputError("DDIMInvert", "model", "this model carries an attention-edit patch: connect the "
                                 "checkpoint's MODEL (before AttentionStore or an edit node)")
        if solver not in SOLVERS:
            raise NodeInputError("DDIMInvert", "solver", f"{solver!r} is not one of {', '.join(SOLVERS)}")
        if guidance_distilled(model) and cfg != 1.0:
            raise NodeInputError("DDIMInvert", "cfg", f"{type(model.model).__name__} has distilled guidance "
                                 "(Flux.1-dev): invert at cfg 1 (its guidance is the conditioning's, FluxGuidance)")
        sigmas = schedule(model, scheduler, steps)
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        trail: dict[str, torch.Tensor] = {}

        def inversion_sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            image = model_k.latent_image  # the model-space image (x is its noise scaling: (1 - sigma) * it on flows)
            s_in = image.new_ones([image.shape[0]])
            progress = None if callback is None else (lambda i, xi: callback({"i": i, "denoised": xi, "x": xi}))
            trail["latents"] = invert(lambda xi, s: model_k(xi, s * s_in, **(extra_args or {})), image, sigmas,
                                      progress, solver)
            return trail["latents"][0]

        with torch.no_grad():  # (the executor runs nodes in inference mode; direct callers may not)
            out = comfy.sample.sample_custom(
                model, torch.zeros_like(samples), cfg, comfy.samplers.KSAMPLER(inversion_sampler), sigmas, positive,
                negative, samples, callback=latent_preview.prepare_callback(model, steps),
                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)
        trajectory = Trajectory(sigmas, trail["latents"].float().cpu(), out.float().cpu(), model_id(model),
                                prompt=positive[0][0].float().cpu(), solver=solver)
        noise = InvertedNoise(trajectory.latents[0], is_flow(model))
        return io.NodeOutput({**latent, "samples": out}, trajectory, noise)


def percent_for_sigma(model_sampling, sigma: float) -> float:
    """The sampling percent whose sigma is `sigma` (bisection on ComfyUI's own percent_to_sigma)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model_sampling.percent_to_sigma(mid) > sigma else (lo, mid)
    return (lo + hi) / 2


def per_step_conditioning(model_sampling, sigmas: torch.Tensor, embeddings: list[torch.Tensor], extra: dict) -> list:
    """One CONDITIONING entry per step, each active only around its step's sigma."""
    n = len(embeddings)
    bounds = [0.0] + [percent_for_sigma(model_sampling, float((sigmas[k] * sigmas[k + 1]).sqrt()) if sigmas[k + 1] > 0
                                        else float(sigmas[k]) / 2) for k in range(n - 1)] + [1.0]
    return [[emb, {**extra, "start_percent": bounds[k], "end_percent": bounds[k + 1]}] for k, emb in enumerate(embeddings)]


class NullTextInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return Schema(
            node_id="NullTextInversion", display_name="Null-Text Inversion", category=CATEGORY + "/inversion",
            search_aliases=["inversion", "null-text inversion", "null text", "real image editing"],
            description="Optimises the unconditional (negative) embedding at every step so that guided sampling "
                        "from the inverted noise retraces the inversion (Mokady et al.). Use the output as the "
                        "negative of both branches, with the same cfg, steps and scheduler, sampler euler/ddim. "
                        "Needs classifier-free guidance: not for guidance-distilled models (Flux.1-dev), where "
                        "direct inversion is the way.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL, as given to DDIMInvert."),
                InversionType.Input("inversion", tooltip="DDIMInvert's inversion output."),
                io.Conditioning.Input("positive", tooltip="The source prompt, as given to DDIMInvert."),
                io.Conditioning.Input("negative", tooltip="The starting unconditional embedding (an empty prompt)."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="The guidance the branches will be sampled with."),
                io.Int.Input("inner_steps", default=10, min=1, max=100,
                             tooltip="Model evaluations per step at most (each but the last is followed by an Adam "
                                     "update); 1 = plain DDIM with this negative."),
                io.Float.Input("learning_rate", default=0.01, min=0.0001, max=1.0, step=0.001,
                               tooltip="Adam's step size (halved linearly over the steps). 0.01 is the paper's "
                                       "for SD; small models may need more."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6,
                               tooltip="Stop a step's optimisation once the latent error (MSE) is below this "
                                       "(plus 2e-5 per step, as in the paper)."),
            ],
            outputs=[io.Conditioning.Output(display_name="negative", tooltip="Per-step unconditional embeddings.")],
        )

    @classmethod
    def execute(cls, model, inversion, positive, negative, cfg, inner_steps, learning_rate, early_stop) -> io.NodeOutput:
        if not isinstance(inversion, Trajectory):
            raise NodeInputError("NullTextInversion", "inversion", "expects the inversion output of DDIMInvert")
        if inversion.model_id != model_id(model):
            raise NodeInputError("NullTextInversion", "model", "the inversion was made with another model: "
                                 "connect the MODEL that DDIMInvert used")
        if guidance_distilled(model):
            raise NodeInputError("NullTextInversion", "model", f"{type(model.model).__name__} has distilled guidance "
                                 "(Flux.1-dev: sampled at cfg 1, no negative branch to optimise): use direct inversion "
                                 "instead (DDIMInvert's inversion into AttentionStore)")
        comfy.model_management.load_models_gpu([model])
        dm, device = model.model, model.load_device
        sigmas, n = inversion.sigmas, inversion.num_steps
        z = inversion.latents[0].to(device)
        options = model.model_options.get("transformer_options", {})

        def denoise(x, sigma, entry, emb):
            extra = {k: v for k, v in entry[1].items() if k not in ("cross_attn", "device", "noise")}
            conds = dm.extra_conds(cross_attn=emb, device=device, noise=x, width=x.shape[-1] * 8,
                                   height=x.shape[-2] * 8, **extra)
            kwargs = {k: c.process_cond(batch_size=x.shape[0], device=device).cond for k, c in conds.items()}
            with saved_copies if torch.is_grad_enabled() else contextlib.nullcontext():
                return dm.apply_model(x, torch.full((x.shape[0],), sigma, device=device), transformer_options=options,
                                      **kwargs)

        # Flux's blocks add to their inputs in place, which autograd rejects for tensors it saved: keep copies
        saved_copies = (torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
                        if is_dit(dm.diffusion_model) else contextlib.nullcontext())

        # one embedding per image: each image's step depends on its own row only, so one batched Adam run
        # optimises every image as if alone (its loss is the batch mean: the same directions, Adam's scale)
        emb = negative[0][0].to(device)
        emb = emb.expand(z.shape[0], *emb.shape[1:]) if emb.shape[0] == 1 else emb
        cond_emb = positive[0][0].to(device)
        embeddings, pbar = [], comfy.utils.ProgressBar(n)
        with torch.inference_mode(False), torch.enable_grad():
            z, emb, cond_emb = z.clone(), emb.clone(), cond_emb.clone()
            for k in range(n):
                s, s_next = float(sigmas[k]), float(sigmas[k + 1])
                with torch.no_grad():
                    cond_d = denoise(z, s, positive[0], cond_emb)
                step = lambda e: cfg_step(z, s, s_next, cond_d, denoise(z, s, negative[0], e), cfg)  # noqa: E731
                target = inversion.latents[k + 1].to(device)
                emb, z, _ = optimize_null_embedding(step, emb, target, inner_steps, learning_rate * (1 - 0.5 * k / n),
                                                    early_stop + 2e-5 * k,
                                                    comfy.model_management.throw_exception_if_processing_interrupted)
                embeddings.append(emb.detach().cpu())
                pbar.update(1)
        extra = {k: v for k, v in negative[0][1].items() if k not in ("start_percent", "end_percent")}
        return io.NodeOutput(per_step_conditioning(dm.model_sampling, sigmas, embeddings, extra))
