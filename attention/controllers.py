"""The callables that ComfyUI's attention patches, post-CFG functions and sampling wrappers call.

They speak ComfyUI's calling conventions (extra_options with cond_or_uncond, sigmas,
sample_sigmas, n_heads) but import nothing from it, so they are tested with plain tensors.
A `deepcopy` returns the object itself: ComfyUI 0.3.75 deep-copies model_options on every
clone, and a copy must keep pointing at the same record.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .inversion import Trajectory, anchored_denoised
from .inject import (AttentionFn, Job, cross_edit_jobs, edited_maps, expand_columns, expand_mapper,
                     key_layout, run_jobs, sdpa, text_layout, token_maps, words_mask)
from .joint import JOINT_LAYOUT, joint_layout, packed
from .layers import AttentionLayer
from .record import COND, RecordError, SourceRecord, by_evaluation, cumulative_maps
from .schedule import StepRange, schedule_starts, sigma_key, step_in
from .tokens import Prompt


LIVE_SOURCE = "attention_edit_live_source"  # transformer_options: leading chunks that are the recomputed source


class Shared:
    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self


def chunks(extra: dict, batch: int) -> list[tuple[int, slice]]:
    """(cond_or_uncond, rows) of each chunk of a batched attention call."""
    cou = extra["cond_or_uncond"]
    if len(cou) == 1:  # one prompt per model call (cfg 1, or prompts of different lengths)
        return [(cou[0], slice(0, batch))]
    per = batch // len(cou)
    return [(c, slice(i * per, (i + 1) * per)) for i, c in enumerate(cou)]


def chunk_rows(t: torch.Tensor, rows: slice) -> torch.Tensor:
    """A chunk's rows of t (t itself when the chunk is the whole batch)."""
    return t if rows.start == 0 and rows.stop >= t.shape[0] else t[rows]


_last_sigma: tuple[object, float] = (None, 0.0)  # ComfyUI passes one sigmas tensor to every layer of a model call


def current_sigma(extra: dict) -> float:
    global _last_sigma
    sigmas = extra["sigmas"]
    if sigmas is not _last_sigma[0]:
        _last_sigma = (sigmas, float(torch.as_tensor(sigmas).flatten()[0]))
    return _last_sigma[1]


OVERRIDE = "optimized_attention_override"  # transformer_options: the attention override (dit.JointPatch)


def without_own_override(options: dict, controller) -> dict:
    """transformer_options for a model call that `controller` leaves alone (no conditional chunk,
    nothing to inject): its attention runs as ComfyUI's, or as the override ours chains, without
    passing through ours."""
    patch = options.get(OVERRIDE)
    if getattr(patch, "controller", None) is not controller:
        return options
    options = dict(options)
    if patch.previous is None:
        del options[OVERRIDE]
    else:
        options[OVERRIDE] = patch.previous
    return options


def call_sigma(t, transformer_options: dict) -> float:
    """A model call's sigma (apply_model's t), read from what its attention calls read it from."""
    return current_sigma(transformer_options if "sigmas" in transformer_options else {"sigmas": t})


class Occurrences:
    """Names each model evaluation of a run: samplers such as heun evaluate the model twice at the
    same sigma (a correction, then the next step), so a key is the sigma and its evaluation number.
    The guider's predict_noise wrapper opens each evaluation (`begin`); inside it each layer's calls
    are numbered too ("<sigma>#<evaluation>/<call>"): PAG's perturbed pass or a second positive of
    ConditioningCombine is call 1. A target whose source made no such call reads call 0
    (`main_call`). Without the wrapper, calls are counted per layer and chunk. Source and target
    sample alike, so their keys agree."""

    def __init__(self):
        self.seen: dict[tuple, int] = {}
        self.evaluations: dict[str, int] = {}
        self.current: tuple[str, str] | None = None  # (sigma key, evaluation key) of the open evaluation
        self.steps: dict[float, int] = {}  # sigma -> step index: every layer asks, once per model call
        self._starts: tuple[object, list[float]] = (None, [])  # (sample sigmas, their schedule_starts)

    def begin(self, sigma: float) -> None:
        sk = sigma_key(sigma)
        n = self.evaluations.get(sk, 0)
        self.evaluations[sk] = n + 1
        self.current = (sk, f"{sk}#{n}")

    def step(self, sigma: float, sample_sigmas: torch.Tensor) -> int:
        if sigma not in self.steps:
            if self._starts[0] is not sample_sigmas:
                self._starts = (sample_sigmas, schedule_starts(sample_sigmas))
            self.steps[sigma] = step_in(sigma, self._starts[1])
        return self.steps[sigma]

    def key(self, sigma: float, *where) -> str:
        sk = sigma_key(sigma)
        base = self.current[1] if self.current is not None and self.current[0] == sk else sk
        n = self.seen.get((base, *where), 0)
        self.seen[(base, *where)] = n + 1
        return f"{base}/{n}" if base != sk else f"{sk}#{n}"


def main_call(key: str) -> str:
    """The key of the evaluation's first call for this layer (the one every source makes)."""
    evaluation, sep, _ = key.partition("/")
    return f"{evaluation}/0" if sep else key


def source_entry(table: dict, key):
    """table[key], or the evaluation's first call where the source made no such call."""
    if key in table:
        return table[key]
    *layer, sk = key if isinstance(key, tuple) else (key,)
    fallback = (*layer, main_call(sk)) if isinstance(key, tuple) else main_call(sk)
    return table.get(fallback)


def predict_noise(occurrences: Occurrences, executor, x, timestep, model_options, seed):
    """Opens a model evaluation for `occurrences` (see Occurrences)."""
    occurrences.begin(float(torch.as_tensor(timestep).flatten()[0]))
    try:
        return executor(x, timestep, model_options, seed)
    finally:
        occurrences.current = None


def key_sigma(key: str) -> float:
    return float(key.partition("#")[0])


def spatial_hw(extra: dict, tokens: int) -> tuple[int, int]:
    """The (h, w) of this layer's token grid: the latent downsampled by stride-2 convolutions
    (each halving rounds up) until it has `tokens` positions."""
    h, w = extra["original_shape"][-2:]
    while h * w > tokens and h > 1:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise ValueError(f"no downsampled grid of the latent {tuple(extra['original_shape'][-2:])} has {tokens} positions")
    return h, w


@dataclass
class LayerPatch(Shared):
    """One attention layer's replace patch: `controller.attend(kind, layer, q, k, v, extra)`."""
    controller: object
    kind: str  # "attn1" (self) | "attn2" (cross)
    layer: AttentionLayer
    previous: object = None  # a replace patch that was on the model before ours

    def __call__(self, q, k, v, extra):
        return self.controller.attend(self, q, k, v, extra)

    def plain(self, q, k, v, extra, attention: AttentionFn):
        if self.previous is not None:
            return self.previous(q, k, v, extra)
        return attention(q, k, v, extra["n_heads"])


@dataclass
class BlockPatch(Shared):
    """The replace patch of a whole block, ComfyUI key (block, id): dispatches on the transformer
    index (extra_options["block_index"]) to the layers' patches, and to `previous` (or plain
    attention) for the others. Registering per block rather than per layer lets a node that
    overrides the block at sampling time (ComfyUI's PAG does, under this key) take precedence,
    as it would over an unpatched model."""
    layers: dict[int, LayerPatch]
    previous: object = None

    def __call__(self, q, k, v, extra):
        patch = self.layers.get(int(extra.get("block_index", 0)))
        if patch is not None:
            return patch(q, k, v, extra)
        if self.previous is not None:
            return self.previous(q, k, v, extra)
        return comfy_attention(q, k, v, extra)


def comfy_attention(q, k, v, extra):
    """Plain attention for a block's layer that no patch handles (imports ComfyUI lazily)."""
    import comfy.ldm.modules.attention as attention
    return attention.optimized_attention(q, k, v, extra["n_heads"])


class Recorder(Shared):
    """Source branch: attention runs as usual and what the record's spec asks for is kept."""

    def __init__(self, record: SourceRecord, attention: AttentionFn = sdpa):
        self.record, self.attention = record, attention
        self.occurrences = Occurrences()
        self.last_cond: str | None = None  # key of the last kept conditioning

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        if self.record.inversion is not None:
            check_inversion_sampler(sampler, "AttentionStore")
            check_starts_from_inversion(self.record.inversion, noise, latent_image, sigmas, "AttentionStore", executor)
            check_inversion_guidance(executor, "AttentionStore")
        self.record.begin(sigmas, tuple(noise.shape))
        self.record.settings = run_settings(executor, noise, sampler)
        self.occurrences, self.last_cond = Occurrences(), None
        out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        if self.record.mode == "pending":
            self.record.decide()
        self.record.finish(out)
        return out

    def predict_noise(self, executor, x, timestep, model_options={}, seed=None):
        return predict_noise(self.occurrences, executor, x, timestep, model_options, seed)

    def apply_model(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        """Keeps the model's inputs (latent-sized) while the store may recompute the source later."""
        rec = self.record
        check_whole_latent(x, rec.latent_shape, "AttentionStore")
        if rec.sample_sigmas is not None and rec.spec.strategy != "keep":
            sigma = float(torch.as_tensor(t).flatten()[0])
            conds = dict(kwargs, c_crossattn=c_crossattn, c_concat=c_concat)
            for cou, rows in chunks(transformer_options, x.shape[0]):
                if cou != COND:  # the edits read the conditional half only
                    continue
                sk = self.occurrences.key(sigma, "input", cou)
                rec.inputs[sk] = x[rows].detach()
                rec.conds[sk] = batch_rows(conds, rows, x.shape[0], rec.conds.get(self.last_cond))
                self.last_cond = sk
            rec.has_control |= control is not None
        sigma = call_sigma(t, transformer_options)
        step = self.occurrences.step(sigma, rec.sample_sigmas) if rec.sample_sigmas is not None else None
        options = joint_layout(transformer_options, x, c_crossattn, sigma, step)
        if COND not in options.get("cond_or_uncond", (COND,)):  # the store keeps the conditional half only
            options = without_own_override(options, self)
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    def attend(self, patch: LayerPatch, q, k, v, extra):
        out = patch.plain(q, k, v, extra, self.attention)
        self.record_attention(patch, q, k, extra)
        return out

    def record_attention(self, patch: LayerPatch, q, k, extra) -> None:
        """Keeps what the record's spec asks for of one attention call's queries and keys."""
        rec, spec = self.record, self.record.spec
        if rec.sample_sigmas is None:  # used outside a sampler run (e.g. a preview): nothing to keep
            return
        sigma = current_sigma(extra)
        step = self.occurrences.step(sigma, rec.sample_sigmas)
        key = patch.layer.key
        for cou, rows in chunks(extra, q.shape[0]):
            if cou != COND:  # P2P and FPE edit the conditional half only (local blend reads it too)
                continue
            qc, kc = chunk_rows(q, rows), chunk_rows(k, rows)
            sk = self.occurrences.key(sigma, patch.kind, key, cou)
            if rec.recompute:  # the target recomputes the attention; only the blend's token maps stay
                if patch.kind == "attn2" and patch.layer.level == rec.map_level:
                    rec.layer_hw.setdefault(key, (extra["n_heads"], spatial_hw(extra, q.shape[1])))
                    rec.map_tokens(key, sk, qc, kc)
            elif patch.kind == "attn1":
                if key in spec.self_layers and spec.self_steps.active(step, rec.num_steps):
                    rec.self_qk[(key, sk)] = (rec.keep(qc), rec.keep(kc))
            else:
                kept = kept_k = None
                if key in spec.cross_layers and spec.cross_steps.active(step, rec.num_steps):
                    kept = rec.cross_q[(key, sk)] = rec.keep(qc)
                    kept_k = rec.keep_keys(rec.cross_k, key, sk, kc)
                if key not in rec.layer_hw:
                    rec.layer_hw[key] = (extra["n_heads"], spatial_hw(extra, q.shape[1]))
                if patch.layer.level == rec.map_level:  # maps for local blend/previews, built when asked
                    rec.map_q[(key, sk)] = kept if kept is not None else rec.keep(qc)
                    if kept_k is not None:
                        rec.map_k[(key, sk)] = kept_k
                    else:
                        rec.keep_keys(rec.map_k, key, sk, kc)

    def joint_keeps(self, layer: AttentionLayer, cross: bool, own: bool, step: int) -> tuple[bool, bool, bool]:
        """What a flow transformer's layer keeps at a step, of the parts patched (`cross`: image->text,
        `own`: image->image): (its image->image part, its image->text part, its token maps)."""
        rec, spec, key = self.record, self.record.spec, layer.key
        n = rec.num_steps
        return (own and key in spec.self_layers and spec.self_steps.active(step, n),
                cross and key in spec.cross_layers and spec.cross_steps.active(step, n),
                cross and layer.level == rec.map_level)

    def record_joint(self, layer: AttentionLayer, cross: bool, own: bool, q, k, extra: dict) -> None:
        """record_attention for one joint call of a flow transformer (q, k in head layout, (B, H, L, D),
        [text; image] tokens as extra's JOINT_LAYOUT says) whose image->text part (`cross`) and
        image->image part (`own`) are patched.
        Per conditional chunk, copies in head layout (dit.py reads them so) of the image queries (one
        tensor for both parts and the token maps), of the [text; image] keys (the image->image part)
        and of the text keys (the image->text part, token maps). Its parts share one occurrence key,
        the one each part would get alone (one call, counted once)."""
        rec, (latent_shape, text, sigma, step) = self.record, extra[JOINT_LAYOUT]
        if step is None or rec.sample_sigmas is None:
            return
        keep_self, keep_cross, keep_map = self.joint_keeps(layer, cross, own, step)
        key = layer.key
        if key not in rec.layer_hw:
            rec.layer_hw[key] = (q.shape[1], spatial_hw({"original_shape": latent_shape}, q.shape[2] - text))
        if not (keep_self or keep_cross or keep_map):  # past the windows
            return
        for cou, rows in chunks(extra, q.shape[0]):
            if cou != COND:  # P2P and FPE edit the conditional half only (local blend reads it too)
                continue
            sk = self.occurrences.key(sigma, "joint", key, cou)
            qc, kc = chunk_rows(q, rows), chunk_rows(k, rows)
            if rec.recompute:  # the target recomputes the attention; only the blend's token maps stay
                if keep_map:
                    rec.map_tokens(key, sk, qc[:, :, text:], kc[:, :, :text])
                continue
            q_image = rec.keep(qc[:, :, text:]) if keep_self or keep_cross or keep_map else None
            if keep_self:
                rec.self_qk[(key, sk)] = (q_image, rec.keep(kc))
            if keep_cross or keep_map:
                k_text = rec.keep(kc[:, :, :text])  # the text stream changes with the step: no two are equal
                if keep_cross:
                    rec.cross_q[(key, sk)], rec.cross_k[(key, sk)] = q_image, k_text
                if keep_map:
                    rec.map_q[(key, sk)], rec.map_k[(key, sk)] = q_image, k_text

    def post_cfg(self, args):
        rec, denoised = self.record, args["denoised"]
        if rec.sample_sigmas is None:
            return denoised
        if rec.mode == "pending":  # the first step has shown what keeping every step costs
            rec.decide()
        rec.check_budget()
        sigma = current_sigma({"sigmas": args["sigma"]})
        sk = self.occurrences.key(sigma, "denoised")
        if rec.inversion is not None:  # direct inversion: land on the trajectory's next latent
            k = rec.inversion.at(sigma)
            target = rec.inversion.latents[k + 1].to(denoised)
            anchored = anchored_denoised(args["input"], sigma, float(rec.inversion.sigmas[k + 1]), target)
            rec.corrections[sk] = (anchored - denoised).detach()
            denoised = anchored
        rec.denoised[sk] = denoised.detach().clone()
        return denoised


def batched(c, batch: int) -> bool:
    """A conditioning value with one row per batch row (c_crossattn, y, c_concat, ...)."""
    return isinstance(c, torch.Tensor) and c.dim() > 0 and c.shape[0] == batch


def batch_rows(conds: dict, rows: slice, batch: int, previous: dict | None) -> dict:
    """The rows of every batched conditioning tensor (c_crossattn, y, c_concat ...); the previous
    step's dict when nothing changed, so a store keeps one copy of a prompt, not one per step."""
    picked = {name: c[rows].detach() for name, c in conds.items()
              if batched(c, batch)}
    if previous is not None and previous.keys() == picked.keys() and all(
            previous[n].shape == c.shape and torch.equal(previous[n], c) for n, c in picked.items()):
        return previous
    return picked


def guider_model(executor):
    """The BaseModel of the guider an outer_sample wrapper runs (None outside ComfyUI's guider)."""
    return getattr(getattr(getattr(executor, "class_obj", None), "model_patcher", None), "model", None)


def sampler_start(executor, noise: torch.Tensor, latent_image: torch.Tensor, sigma0) -> torch.Tensor | None:
    """The latent an outer_sample run starts from, as ComfyUI's KSAMPLER makes it: the model's
    noise_scaling of the noise and the model-space latent (eps models: latent + sigma * noise;
    flow models: sigma * noise + (1 - sigma) * latent). None outside a ComfyUI guider."""
    model = guider_model(executor)
    if model is None:
        return None
    latent = latent_image.float().cpu()
    if torch.count_nonzero(latent) > 0:  # as CFGGuider.inner_sample: an empty latent is not shifted
        latent = model.process_latent_in(latent)
    sigma = torch.as_tensor(sigma0).float().cpu().reshape(1)
    return model.model_sampling.noise_scaling(sigma, noise.float().cpu(), latent, False)


def flow_model(executor) -> bool:
    """Whether the guider's model samples a flow (x = (1 - sigma) x0 + sigma noise), as Flux and SD3."""
    sampling = getattr(guider_model(executor), "model_sampling", None)
    return any(c.__name__ == "CONST" for c in type(sampling).__mro__)


def check_starts_from_inversion(inv: Trajectory, noise, latent_image, sigmas, node: str, executor=None) -> None:
    """A branch of a real-image edit must start from the inverted noise, exactly."""
    if len(sigmas) != len(inv.sigmas) or not torch.allclose(sigmas.float().cpu(), inv.sigmas, rtol=1e-4, atol=1e-6):
        raise RecordError(f"{node}: the sampler's sigmas ({len(sigmas) - 1} steps) differ from DDIMInvert's "
                          f"({inv.num_steps} steps): use DDIMInvert's steps and scheduler, and denoise 1.0")
    if tuple(latent_image.shape) != tuple(inv.noise_latent.shape):
        raise RecordError(f"{node}: the sampler's latent is {tuple(latent_image.shape)} but the inversion's is "
                          f"{tuple(inv.noise_latent.shape)}: connect DDIMInvert's LATENT (the trajectory is of "
                          "another image size)")
    start = sampler_start(executor, noise, latent_image, sigmas[0])
    if start is None:  # outside ComfyUI's guider: compare what the branch was given
        starts = not bool(noise.abs().max() > 0) and torch.allclose(
            latent_image.float().cpu(), inv.noise_latent.float().cpu(), atol=1e-5)
    else:
        z = inv.latents[0].float()
        starts = torch.allclose(start, z, rtol=1e-4, atol=1e-4 * max(1.0, float(z.abs().max())))
    if starts:
        return
    if flow_model(executor):
        raise RecordError(f"{node}: the sampler must start from the inverted noise: on a flow model (Flux, SD3) "
                          "sample both branches with SamplerCustomAdvanced, noise = DDIMInvert's noise and "
                          "latent_image = DDIMInvert's LATENT (KSamplerAdvanced with add_noise 'disable' starts a flow "
                          "model at (1 - sigma) x latent, which is 0 at sigma 1)")
    raise RecordError(f"{node}: the sampler must start from DDIMInvert's LATENT with no noise added: use "
                      "KSamplerAdvanced with add_noise 'disable' (or SamplerCustomAdvanced with DDIMInvert's noise)")


def check_inversion_guidance(executor, node: str) -> None:
    """A guidance-distilled model (Flux.1-dev: guidance as an input) samples at cfg 1: a real-image
    branch at another cfg would run a negative branch the model was not made for (negative-prompt
    inversion needs classifier-free guidance)."""
    params = getattr(getattr(guider_model(executor), "diffusion_model", None), "params", None)
    cfg = guider_cfg(executor)
    if getattr(params, "guidance_embed", False) and cfg is not None and cfg != 1.0:
        raise RecordError(f"{node}: this model's guidance is distilled (Flux.1-dev): sample real-image branches at "
                          f"cfg 1, not {cfg:g} (set its guidance with FluxGuidance); negative-prompt and null-text "
                          "inversion need classifier-free guidance, direct inversion does not")


def check_whole_latent(x: torch.Tensor, latent_shape, node: str) -> None:
    """Area conditioning (ConditioningSetArea) runs the model on a crop, where the source's maps
    of the whole image have no meaning."""
    if latent_shape is not None and tuple(x.shape[-2:]) != tuple(latent_shape[-2:]):
        raise RecordError(f"{node}: the model was called on a {tuple(x.shape[-2:])} crop of the {tuple(latent_shape[-2:])} "
                          "latent (area conditioning such as ConditioningSetArea): attention editing needs conditioning "
                          "of the whole image; use ConditioningSetMask (set_cond_area 'default') instead, or drop the area")


def sampler_name(sampler) -> str:
    """ComfyUI's name of a KSAMPLER's function ('ddim' runs euler's)."""
    fn = getattr(sampler, "sampler_function", None)
    return getattr(fn, "__name__", type(sampler).__name__).removeprefix("sample_")


def guider_cfg(executor) -> float | None:
    """The cfg of the guider an outer_sample wrapper runs (None where it has no single number)."""
    cfg = getattr(getattr(executor, "class_obj", None), "cfg", None)
    return float(cfg) if isinstance(cfg, (int, float)) else None


def run_settings(executor, noise: torch.Tensor, sampler) -> dict:
    """What an outer_sample wrapper can see of a run's settings: its noise, sampler and cfg."""
    return {"noise": noise.detach().float().cpu(), "sampler": sampler_name(sampler), "cfg": guider_cfg(executor)}


def schedule_difference(sigmas: torch.Tensor, source: torch.Tensor) -> str | None:
    """Which setting makes a target's sigmas differ from the source's, or None if they agree."""
    steps, src_steps = len(sigmas) - 1, len(source) - 1
    if steps == src_steps and torch.allclose(sigmas, source, rtol=1e-4, atol=1e-6):
        return None
    if not torch.allclose(sigmas[:1], source[:1], rtol=1e-4, atol=1e-6):
        return (f"start at sigma {float(sigmas[0]):.4g} where the source's started at {float(source[0]):.4g}: use the "
                "same denoise and start_at_step (and sample the source in one pass, not split by SplitSigmas), and the "
                "same ModelSampling node (or none) on both branches")
    if steps != src_steps:
        return (f"({steps} steps) differ from the source's ({src_steps} steps): use the same steps and end_at_step in "
                "both branches (a source split by SplitSigmas must be sampled whole)")
    i = int((~torch.isclose(sigmas, source, rtol=1e-4, atol=1e-6)).nonzero()[0])
    return (f"differ from the source's at step {i} ({float(sigmas[i]):.4g} vs {float(source[i]):.4g}) with the "
            f"same {steps} steps: use the same scheduler in both branches")


INVERSION_SAMPLERS = ("euler", "ddim")  # what an inversion's trajectory can be retraced with


def check_inversion_sampler(sampler, node: str) -> None:
    """An inverted image's branches must take deterministic Euler (= DDIM) steps: the inversion
    walked the schedule backwards with them, and direct inversion's correction is the denoised
    prediction whose Euler step lands on the trajectory. A multistep (dpmpp_2m), two-evaluation
    (heun) or noise-adding (euler_ancestral, SDE) sampler would leave it at every step."""
    name = sampler_name(sampler)
    churn = float(getattr(sampler, "extra_options", {}).get("s_churn", 0.0) or 0.0)
    if name == "euler" and churn == 0.0:
        return
    raise RecordError(f"{node}: a real-image edit (an inversion) samples both branches with sampler euler or ddim "
                      f"(deterministic DDIM steps, as DDIMInvert inverted), not '{name}'"
                      + (" with churn" if name == "euler" else "") + ": set sampler_name to euler or ddim")


@dataclass
class CrossEdit:
    """P2P's cross-attention edit for the target prompt (see inject.cross_edit_jobs)."""
    mapper: torch.Tensor  # (T_src, T_tgt)
    aligned: torch.Tensor  # (T_tgt,) g: 1 where the target token has a source counterpart
    steps: StepRange  # default injection range (P2P's cross rule)
    word_steps: dict[int, StepRange] = field(default_factory=dict)  # target position -> range
    equalizer: torch.Tensor | None = None  # (T_tgt,) re-weighting c, 1 elsewhere
    _windows: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (step, num_steps) -> window
    _weights: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # window -> (ws, wt)

    def window(self, step: int, num_steps: int) -> tuple[float, ...]:
        """t: 1 for the target tokens whose injection window holds this step. Every layer asks at
        every step: made once per step, in plain Python."""
        if (step, num_steps) not in self._windows:
            t = [float(self.steps.active(step, num_steps))] * len(self.aligned)
            for pos, rng in self.word_steps.items():
                t[pos] = float(rng.active(step, num_steps))
            self._windows[(step, num_steps)] = tuple(t)
        return self._windows[(step, num_steps)]

    def weights(self, step: int, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ws, wt): M_new = (M_src A) diag(ws) + M_tgt diag(wt), as P2P's controllers compose it:
        inside the window the aligned tokens take the source's map and every column is re-weighted.
        Computed once per window: the steps that share one share the tensors."""
        window = self.window(step, num_steps)
        if window not in self._weights:
            g = self.aligned
            t = torch.tensor(window, dtype=g.dtype, device=g.device)
            c = self.equalizer if self.equalizer is not None else torch.ones_like(g)
            self._weights[window] = (t * g * c, 1 - t + t * (1 - g) * c)
        return self._weights[window]

    def active(self, step: int, num_steps: int) -> bool:
        return any(self.window(step, num_steps))


COMBINE = ("intersect", "union", "mask only")  # how a local blend's MASK meets the words' mask


@dataclass
class LocalBlend:
    """P2P's local blend: outside the edited words' region the target is the source."""
    source_positions: list[int]
    target_positions: list[int]
    threshold: float = 0.3
    start: float = 0.2  # blend from this fraction of the steps on
    subtract_source: list[int] = field(default_factory=list)
    subtract_target: list[int] = field(default_factory=list)
    dilate: int = 1  # max-pool radius in map cells (P2P: 1, on 16x16 maps)
    region: torch.Tensor | None = None  # a MASK (B or 1, H, W) in [0, 1]: where the image may change
    combine: str = "intersect"  # how `region` meets the words' mask: "intersect" | "union" | "mask only"

    @property
    def needs_target_maps(self) -> bool:
        return self.region is None or self.combine != "mask only" or bool(self.subtract_target)

    def mask(self, source_maps: torch.Tensor, target_maps: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1]: 1 where the target may differ from the source. The words' mask
        meets `region` by `combine`; the subtracted words' region stays the source in any case."""
        out = None
        if self.region is None or self.combine != "mask only":
            out = words_mask(source_maps, target_maps, self.source_positions, self.target_positions, size,
                             self.threshold, self.dilate).float()
        if self.region is not None:
            region = F.interpolate(self.region[:, None].float().to(source_maps.device), size=size, mode="bilinear",
                                   align_corners=False)
            out = region if out is None else (torch.minimum if self.combine == "intersect" else torch.maximum)(out, region)
        if self.subtract_source or self.subtract_target:
            out = out * ~words_mask(source_maps, target_maps, self.subtract_source, self.subtract_target, size,
                                    self.threshold)
        return out


@dataclass
class JointSources:
    """The source's part of one edited flow-transformer call (Editor.joint_sources), as kept (head
    layout, the source's batch and dtype): the image->image part's (queries, keys); the image->text
    part's (queries, keys), the alignment weighted by ws that carries the target's text values to
    the source's columns (A diag(ws); None: the identity), and the target's share of its own map (wt;
    None: not read)."""
    own: tuple[torch.Tensor, torch.Tensor] | None = None
    cross: tuple[torch.Tensor, torch.Tensor] | None = None
    aligned: torch.Tensor | None = None
    target_weight: torch.Tensor | None = None


class Editor(Shared):
    """Target branch: injects the record's maps as the edits ask, and blends with the source."""

    def __init__(self, record: SourceRecord, run_id: str, cross: CrossEdit | None = None,
                 self_layers: frozenset = frozenset(), self_steps: StepRange = StepRange(0, 0),
                 blend: LocalBlend | None = None, target: Prompt | None = None, node: str = "P2P",
                 attention: AttentionFn = sdpa):
        self.record, self.run_id, self.cross, self.blend = record, run_id, cross, blend
        self.self_layers, self.self_steps, self.node, self.attention = self_layers, self_steps, node, attention
        self.target = target  # the target prompt (None: FPE, which has no prompt of its own)
        self.maps: dict[tuple, torch.Tensor] = {}  # (layer, sigma key) -> this run's edited token maps (local blend)
        self.mappers: dict[tuple, torch.Tensor] = {}  # (source layout, target layout) -> expanded mapper
        self.columns: dict[tuple, tuple] = {}  # (layouts, window) -> (ws, wt) over the key columns
        self.sample_sigmas: torch.Tensor | None = None
        self.occurrences = Occurrences()

    # -- checks ---------------------------------------------------------------------------------
    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        if self.record.inversion is not None:  # first: other samplers also change the sigmas (uni_pc)
            check_inversion_sampler(sampler, self.node)
        self.check(sigmas, tuple(noise.shape))
        self.check_settings(run_settings(executor, noise, sampler))
        if self.record.recompute and self.record.has_control:
            raise RecordError(f"{self.node}: the source branch ran with a ControlNet and the attention store "
                              "recomputes the source (AttentionStore's strategy/budget_mb), which cannot reproduce "
                              "it: set strategy 'keep' or raise budget_mb")
        if self.record.inversion is not None:
            check_starts_from_inversion(self.record.inversion, noise, latent_image, sigmas, self.node, executor)
            check_inversion_guidance(executor, self.node)
        self.maps.clear()
        self.occurrences = Occurrences()
        self.sample_sigmas = sigmas.detach().float().cpu()
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            self.maps.clear()
            self.sample_sigmas = None

    def check(self, sigmas: torch.Tensor, shape: tuple[int, ...]) -> None:
        rec, node = self.record, self.node
        if rec.run_id != self.run_id or not rec.complete:
            raise RecordError(f"{node}: the attention store no longer holds the source run this edit was "
                              "built for (the source branch re-ran or was interrupted); queue the prompt again")
        cause = schedule_difference(sigmas.float().cpu(), rec.sample_sigmas)
        if cause:
            raise RecordError(f"{node}: the target sampler's sigmas {cause}")
        src = rec.latent_shape
        if tuple(shape[1:]) != tuple(src[1:]):
            raise RecordError(f"{node}: the target latent is {tuple(shape[1:])} but the source was {tuple(src[1:])}: "
                              "use the same width and height in both branches")
        if shape[0] != src[0] and src[0] != 1:
            raise RecordError(f"{node}: the target batch size {shape[0]} differs from the source's {src[0]}: "
                              "use the same batch size (or a source batch of 1)")

    def check_settings(self, settings: dict) -> None:
        """Seed (the noise), sampler and cfg, where the source's are known: an edit compares two
        samples of the same noise, sampler and guidance."""
        src, node = self.record.settings, self.node
        noise, src_noise = settings.get("noise"), src.get("noise")
        if noise is not None and src_noise is not None:
            n = min(noise.shape[0], src_noise.shape[0])
            if noise.shape[1:] == src_noise.shape[1:] and not torch.allclose(noise[:n], src_noise[:n], atol=1e-6):
                raise RecordError(f"{node}: the target sampler starts from other noise than the source (another seed, "
                                  "or add_noise differs): use the same seed and add_noise in both branches")
        for name, what in (("sampler", "sampler"), ("cfg", "cfg")):
            if src.get(name) is not None and settings.get(name) is not None and src[name] != settings[name]:
                raise RecordError(f"{node}: the target sampler's {what} is {settings[name]} but the source's was "
                                  f"{src[name]}: use the same {what} in both branches")

    def _source(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if t.device != like.device or t.dtype != like.dtype:
            t = t.to(device=like.device, dtype=like.dtype)
        return t.expand(like.shape[0], *t.shape[1:]) if t.shape[0] != like.shape[0] else t

    # -- attention ------------------------------------------------------------------------------
    def needs_source(self, step: int) -> bool:
        n = self.record.num_steps
        cross = self.cross is not None and self.cross.active(step, n)
        return cross or (bool(self.self_layers) and self.self_steps.active(step, n))

    def predict_noise(self, executor, x, timestep, model_options={}, seed=None):
        return predict_noise(self.occurrences, executor, x, timestep, model_options, seed)

    def apply_model(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        """Recompute strategy: while injecting, the source's recorded inputs of the conditional half
        run in the same batch, first, so every patched layer sees the source's queries and keys
        live; the target's rows are returned. Other steps run as they are."""
        rec = self.record
        check_whole_latent(x, rec.latent_shape, self.node)
        sigma = call_sigma(t, transformer_options)
        step = self.occurrences.step(sigma, rec.sample_sigmas) if self.sample_sigmas is not None else None
        transformer_options = joint_layout(transformer_options, x, c_crossattn, sigma, step)
        if self.sample_sigmas is not None and (COND not in transformer_options.get("cond_or_uncond", (COND,)) or (
                self.blend is None and not self.needs_source(step))):  # nothing to edit in this model call
            return executor(x, t, c_concat, c_crossattn, control, without_own_override(transformer_options, self),
                            **kwargs)
        if not rec.recompute or self.sample_sigmas is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        parts = [(cou, rows) for cou, rows in chunks(transformer_options, x.shape[0]) if cou == COND]
        keys = [self.occurrences.key(sigma, "input", cou) for cou, _ in parts]
        if not parts or not self.needs_source(step):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if control is not None:
            raise RecordError(f"{self.node}: the attention store recomputes the source (AttentionStore's strategy/"
                              "budget_mb), which cannot reproduce a ControlNet: set strategy 'keep' or raise budget_mb")
        if any(source_entry(rec.inputs, k) is None for k in keys):
            raise RecordError(f"{self.node}: the attention store has no source input at sigma {sigma:.4g}: sample "
                              "both branches with the same sampler, steps and scheduler")
        conds = dict(kwargs, c_crossattn=c_crossattn, c_concat=c_concat)
        for name, c in conds.items():
            if batched(c, x.shape[0]):
                src = [source_entry(rec.conds, k).get(name) for k in keys]
                if name == "c_crossattn" and all(s is not None for s in src):  # as ComfyUI batches prompts
                    if rec.joint and any(s.shape[1] != c.shape[1] for s in src):  # of different lengths
                        raise RecordError(
                            f"{self.node}: the attention store recomputes the source (AttentionStore's strategy/"
                            f"budget_mb), which on a flow transformer cannot batch the source prompt "
                            f"({src[0].shape[1]} tokens) with a target prompt of {c.shape[1]}: repeated text tokens "
                            "would take more of the joint attention than the source had. Set AttentionStore's "
                            "strategy to 'keep' (or raise budget_mb)")
                    src, c = repeat_to_common_length(src, c)
                if any(s is None or s.shape[1:] != c.shape[1:] for s in src):
                    raise RecordError(f"{self.node}: the source's '{name}' conditioning {tuple(src[0].shape[1:])} "
                                      f"cannot be batched with the target's {tuple(c.shape[1:])}: set AttentionStore's "
                                      "strategy to 'keep'")
                conds[name] = torch.cat([self._source(s, c[rows]) for s, (_, rows) in zip(src, parts)] + [c])
        xs = torch.cat([self._source(source_entry(rec.inputs, k), x[rows]) for k, (_, rows) in zip(keys, parts)] + [x])
        cou_all = [COND] * len(parts) + list(transformer_options["cond_or_uncond"])
        opts = dict(joint_layout(transformer_options, xs, conds["c_crossattn"], sigma, step), cond_or_uncond=cou_all,
                    **{LIVE_SOURCE: len(parts)})
        if "uuids" in opts:
            opts["uuids"] = list(opts["uuids"])[:len(parts)] + list(opts["uuids"])
        per = x.shape[0] // len(transformer_options["cond_or_uncond"])
        ts = torch.cat([t[:per]] * len(parts) + [t]) if t.dim() else t
        out = executor(xs, ts, conds.pop("c_concat"), conds.pop("c_crossattn"), None, opts, **conds)
        return out[len(parts) * per:]

    def _missing_live_source(self, sigma: float) -> None:
        if self.record.recompute:
            raise RecordError(f"{self.node}: at sigma {sigma:.4g} the model was called without the recomputed source "
                              "(another node evaluates the UNet outside ComfyUI's apply_model?): set "
                              "AttentionStore's strategy to 'keep'")

    def _columns(self, lay_s: torch.Tensor, lay_t: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        """The alignment over the key columns of this layout pair (the same at every layer and step),
        the step's weights (ws, wt) over the target's columns (the same at every layer; wt None
        where it is zero, so the target's own map is not read), and the alignment weighted by ws
        (A diag(ws): what carries the target's text values to the source's columns), and whether
        that is the identity (a word swap of as many tokens, inside its window: the source's columns
        take the target's values as they are)."""
        lay_key = (tuple(lay_s.tolist()), tuple(lay_t.tolist()))
        if lay_key not in self.mappers:
            self.mappers[lay_key] = expand_mapper(self.cross.mapper, lay_s, lay_t)
        at = (lay_key, self.cross.window(step, self.record.num_steps))  # steps of one window share theirs
        if at not in self.columns:
            ws, wt = self.cross.weights(step, self.record.num_steps)
            ws, wt = expand_columns(ws, lay_t, 0.0), expand_columns(wt, lay_t, 1.0)
            aligned = self.mappers[lay_key] * ws[..., None, :]
            identity = aligned.dim() == 2 and aligned.shape[0] == aligned.shape[1] and bool(
                torch.equal(aligned, torch.eye(aligned.shape[0], dtype=aligned.dtype)))
            self.columns[at] = (ws, wt if bool((wt != 0).any()) else None, aligned, identity)
        return (self.mappers[lay_key], *self.columns[at])

    def _self_source(self, patch: LayerPatch, sk: str, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's (queries, keys) of a layer's self-attention at this evaluation, as kept."""
        src = source_entry(self.record.self_qk, (patch.layer.key, sk))
        if src is None:
            self._missing_live_source(sigma)
            raise RecordError(f"{self.node}: the attention store has no self-attention of layer "
                              f"{patch.layer} at sigma {sigma:.4g}: record it (AttentionStore's "
                              "self_attention_layers/self_attention_until) or inject fewer layers/steps")
        return src

    def _cross_source(self, patch: LayerPatch, sk: str, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's (queries, keys) of a layer's cross-attention at this evaluation, as kept."""
        rec, key = self.record, patch.layer.key
        q_s, k_s = source_entry(rec.cross_q, (key, sk)), source_entry(rec.cross_k, (key, sk))
        if q_s is None or k_s is None:
            self._missing_live_source(sigma)
            raise RecordError(f"{self.node}: the attention store has no cross-attention of layer "
                              f"{patch.layer} at sigma {sigma:.4g}: record it (AttentionStore's "
                              "cross_attention_until) or inject for fewer steps")
        return q_s, k_s

    def joint_sources(self, cross: LayerPatch | None, own: LayerPatch | None, keys: torch.Tensor, text: int,
                      extra: dict) -> JointSources | None:
        """What one conditional chunk of a flow transformer's edited call takes from the source, looked
        up with the least work per call (dit.py): its parts are those that idle() left. None where the
        call needs plan(): local blend (it keeps the call's token maps) or a recomputed source, which
        attends in the same batch. keys: the chunk's [text; image] keys in head layout, `text` of them text."""
        if self.blend is not None or extra.get(LIVE_SOURCE):
            return None
        rec, call = self.record, extra[JOINT_LAYOUT]
        sigma, step = call.sigma, call.step
        sk = self.occurrences.key(sigma, "joint", (own or cross).layer.key, COND)  # as Recorder.record_joint's
        out = JointSources()
        if own is not None:
            out.own = self._self_source(own, sk, sigma)
        if cross is not None:
            q_s, k_s = out.cross = self._cross_source(cross, sk, sigma)
            lay_s = text_layout(k_s, k_s.shape[2], rec.prompt.length)
            lay_t = text_layout(keys, text, self.target.length)
            _, _, out.target_weight, aligned, identity = self._columns(lay_s, lay_t, step)
            out.aligned = None if identity else aligned
        return out

    def _cross(self, patch: LayerPatch, sk: str, sigma: float, step: int, qc, kc, vc, live_qk, extra) -> list[Job] | None:
        """The cross-attention edit of the conditional chunk, and its edited token maps for local blend."""
        rec, cross, heads = self.record, self.cross, extra["n_heads"]
        active = cross is not None and cross.active(step, rec.num_steps)
        jobs, q_s, k_s = None, None, None
        if active:
            q_s, k_s = live_qk or tuple(map(packed, self._cross_source(patch, sk, sigma)))
            q_s, k_s = self._source(q_s, qc), self._source(k_s, kc)
            ws, wt = cross.weights(step, rec.num_steps)
            lay_s, lay_t = key_layout(k_s, rec.prompt.length), key_layout(kc, self.target.length)
            jobs = cross_edit_jobs(qc, kc, vc, q_s, k_s, *self._columns(lay_s, lay_t, step)[:3])
        if self.blend is not None and patch.layer.level == rec.map_level:
            hw = spatial_hw(extra, qc.shape[1])
            m = token_maps(qc, kc, heads, hw, self.target.length, self.target.map_tokens)
            if active:  # P2P's local blend reads the map after the edit
                src = token_maps(q_s, k_s, heads, hw, rec.prompt.length, rec.prompt.map_tokens)
                m = edited_maps(src, m, cross.mapper, ws, wt)
            self.maps[(patch.layer.key, sk)] = m
        return jobs

    def idle(self, patch: LayerPatch, extra: dict) -> bool:
        """Whether this layer's calls at this model call attend as usual and keep nothing (no
        injection, no token maps for local blend): a caller may then skip plan()."""
        rec, call = self.record, extra.get(JOINT_LAYOUT)
        step = call.step if call is not None else self.occurrences.step(current_sigma(extra), rec.sample_sigmas)
        if patch.kind == "attn1":
            return patch.layer.key not in self.self_layers or not self.self_steps.active(step, rec.num_steps)
        if self.blend is not None and patch.layer.level == rec.map_level:
            return False
        return self.cross is None or not self.cross.active(step, rec.num_steps)

    def attend(self, patch: LayerPatch, q, k, v, extra):
        parts = self.plan(patch, q, k, v, extra)
        if all(jobs is None for jobs, *_ in parts):  # nothing injected here: one call, as unpatched
            return patch.plain(q, k, v, extra, self.attention)
        heads = extra["n_heads"]
        if patch.previous is None:  # every chunk's products in one attention call
            outs = run_jobs([jobs or [(qc, kc, vc)] for jobs, qc, kc, vc in parts], heads, self.attention)
        else:  # another pack's patch computes the plain chunks
            outs = [run_jobs([jobs], heads, self.attention)[0] if jobs else patch.plain(qc, kc, vc, extra, self.attention)
                    for jobs, qc, kc, vc in parts]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def plan(self, patch: LayerPatch, q, k, v, extra) -> list[tuple[list[Job] | None, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per chunk of the batch: (the attention products that make its edited output, or None
        where it attends as usual, and its q, k, v)."""
        rec, key = self.record, patch.layer.key
        sigma = current_sigma(extra)
        step = self.occurrences.step(sigma, rec.sample_sigmas)
        live = int(extra.get(LIVE_SOURCE, 0))  # leading chunks: the source's conditional half, recomputed
        every = chunks(extra, q.shape[0])
        sources, targets = every[:live], every[live:]
        parts = [(None, *(chunk_rows(t, rows) for t in (q, k, v))) for _, rows in sources]  # the source attends as usual
        for cou, rows in targets:
            qc, kc, vc = chunk_rows(q, rows), chunk_rows(k, rows), chunk_rows(v, rows)
            jobs: list[Job] | None = None  # None: this chunk attends as usual
            if cou == COND:  # P2P and FPE edit the conditional half only
                sk = self.occurrences.key(sigma, patch.kind, key, cou)
                live_qk = (q[sources[0][1]], k[sources[0][1]]) if live else None
                if patch.kind == "attn1":
                    if key in self.self_layers and self.self_steps.active(step, rec.num_steps):
                        src = live_qk or tuple(map(packed, self._self_source(patch, sk, sigma)))
                        jobs = [(self._source(src[0], qc), self._source(src[1], kc), vc)]  # the source's map, our values
                else:
                    jobs = self._cross(patch, sk, sigma, step, qc, kc, vc, live_qk, extra)
            parts.append((jobs, qc, kc, vc))
        return parts

    # -- local blend ----------------------------------------------------------------------------
    def post_cfg(self, args):
        denoised = args["denoised"]
        blend, rec = self.blend, self.record
        if self.sample_sigmas is None:
            return denoised
        sigma = current_sigma({"sigmas": args["sigma"]})
        sk = self.occurrences.key(sigma, "denoised")
        step = self.occurrences.step(sigma, rec.sample_sigmas)
        if rec.inversion is not None and rec.correct_target and sk in rec.corrections:
            denoised = denoised + self._source(rec.corrections[sk], denoised)
        if blend is None:
            return denoised
        if step < int(blend.start * rec.num_steps):
            return denoised
        src_denoised, src_maps = rec.denoised.get(sk), rec.cumulative_maps(step)
        tgt = cumulative_maps(by_evaluation(self.maps), rec.sample_sigmas, step)
        if src_denoised is None or src_maps is None or (tgt is None and blend.needs_target_maps):
            raise RecordError(f"{self.node}: local blend needs the source's maps and latents at sigma {sigma:.4g}, "
                              "which the attention store did not keep")
        mask = blend.mask(src_maps.to(denoised.device), tgt, tuple(denoised.shape[-2:])).to(denoised)
        src = self._source(src_denoised, denoised)
        return src + mask * (denoised - src)


def repeat_to_common_length(sources: list[torch.Tensor], target: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Prompts of different token lengths, each repeated to their least common multiple, as
    ComfyUI batches them (a repeated prompt attends exactly as the prompt)."""
    common = math.lcm(target.shape[1], *(s.shape[1] for s in sources))
    grow = lambda c: c.repeat(1, common // c.shape[1], 1) if c.shape[1] != common else c  # noqa: E731
    return [grow(s) for s in sources], grow(target)
