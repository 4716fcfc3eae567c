"""Train TinyFlux (demo_model/tinyflux.py) on TinySD's synthetic coloured shapes with rectified flow.
Deterministic given --seed, resumable (state in .train/), and it writes the checkpoint that ships,
with caption accuracy measured as it goes (the loss falls long before the model follows its captions).

    OMP_NUM_THREADS=1 .venv/bin/python tools/train_tinyflux.py --steps 6000
    OMP_NUM_THREADS=1 .venv/bin/python tools/train_tinyflux.py --evaluate   # ComfyUI sampler + attention checks

ComfyUI's Flux blocks add to their inputs in place (`img += ...`), which autograd rejects when the
input was saved for the backward pass; the forward runs under a saved-tensors hook that stores a
copy of what it saves, so ComfyUI's own code trains unchanged.
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import comfyui_env  # noqa: E402

comfyui_env.setup(cpu=True)
import comfy.model_sampling  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
import safetensors.torch  # noqa: E402
from comfy.ldm.flux.model import Flux  # noqa: E402

import shapes  # noqa: E402
import tinyflux  # noqa: E402
import tinysd  # noqa: E402
import training  # noqa: E402
from train_tinysd import all_captions  # noqa: E402

REPO = comfyui_env.REPO
SHIFT = 1.15  # ModelSamplingFlux's default (Flux's mu); TinyFluxConfig keeps it
EVAL_SEED_BASE = 10_000_000  # held out: training data uses seeds < 1e6


def sigma_of(u: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ModelSamplingFlux.sigma: Flux's time shift of a uniform time u in (0, 1]."""
    return comfy.model_sampling.flux_time_shift(SHIFT, 1.0, u)


def caption_embeddings(seed: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """(T5 tokens, pooled) of every caption through ComfyUI's own CLIP code (the frozen encoder),
    from the fp16-rounded weights that ship. The pooled vector is zeros: TinyFlux's text reaches the
    image only through the joint attention."""
    te = {k: v.half() for k, v in tinyflux.text_encoder_state_dict(seed).items()}
    config = tinyflux.TinyFluxConfig(tinyflux.FLUX_CONFIG)
    clip = comfy.sd.CLIP(config.clip_target())
    clip.load_sd(comfy.utils.state_dict_prefix_replace(dict(te), {tinyflux.T5_PREFIX: ""}, filter_keys=True))
    emb = {}
    with torch.no_grad():
        for c in all_captions():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(c), return_pooled=True)
            emb[c] = (cond.float()[0], pooled.float()[0])
    return emb, te


def build_flux(seed: int) -> Flux:
    """ComfyUI's Flux with DiT's initialisation: PyTorch defaults for the linears, zero modulation
    (every block starts as the identity) and a zero output layer."""
    torch.manual_seed(seed)
    cfg = {k: v for k, v in tinyflux.FLUX_CONFIG.items() if k != "image_model"}
    flux = Flux(**cfg, operations=comfy.ops.disable_weight_init)
    for name, m in flux.named_modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.Linear.reset_parameters(m)  # ComfyUI's ops skip initialisation
            if name.endswith(("mod.lin", "modulation.lin", "adaLN_modulation.1")) or name == "final_layer.linear":
                torch.nn.init.zeros_(m.weight)
                torch.nn.init.zeros_(m.bias)
    for name, p in flux.named_parameters():
        if name.endswith("norm.scale"):
            torch.nn.init.ones_(p)
    return flux


def forward(flux: Flux, x: torch.Tensor, sigma: torch.Tensor, ctx: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The velocity as ComfyUI asks for it (timestep = sigma, pooled vector, zeros, as y)."""
    if not torch.is_grad_enabled():
        return flux(x, sigma, ctx, y=pooled)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        return flux(x, sigma, ctx, y=pooled)


def shape_weights(text: str | None) -> tuple[float, ...] | None:
    """'1,1,2' -> probabilities of shapes.SHAPES."""
    if not text:
        return None
    w = [float(x) for x in text.split(",")]
    if len(w) != len(shapes.SHAPES) or min(w) < 0 or sum(w) <= 0:
        raise SystemExit(f"--shape-weights wants {len(shapes.SHAPES)} non-negative numbers ({','.join(shapes.SHAPES)}), got {text!r}")
    return tuple(x / sum(w) for x in w)


def batch(seed: int, step: int, size: int, logit_normal: float, logit_mean: float = 0.0,
          shape_p: tuple[float, ...] | None = None):
    """Noisy latents on ComfyUI's flow (x_t = (1 - s) x0 + s noise), their velocity target and captions.

    Times: a fraction `logit_normal` from SD3's logit-normal with mean `logit_mean` (positive: towards
    high noise, where layout and shape are decided), the rest uniform, both through Flux's shift as
    the sampler's schedule is."""
    rng = np.random.default_rng([seed, step])
    specs = [shapes.random_spec(rng, shape_p=shape_p) for _ in range(size)]
    x0 = torch.from_numpy(tinysd.encode_images(np.stack([shapes.render(s) for s in specs])))
    captions = [s.caption(with_background=rng.random() < 0.5) for s in specs]
    captions = ["" if rng.random() < 0.1 else c for c in captions]  # for classifier-free guidance
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    u = torch.where(torch.rand(size, generator=g) < logit_normal, torch.sigmoid(logit_mean + torch.randn(size, generator=g)),
                    torch.rand(size, generator=g)).clamp(1e-4, 1.0)
    s = sigma_of(u)
    noise = torch.randn(x0.shape, generator=g)
    xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
    return xt, s, captions, noise - x0


def grouped(captions: list[str], emb) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Rows with the same caption length, batched: the sampler runs each prompt at its own token
    count (no padding tokens reach the attention), so training does the same."""
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(captions):
        by_len.setdefault(emb[c][0].shape[0], []).append(i)
    return [(rows, torch.stack([emb[captions[i]][0] for i in rows]), torch.stack([emb[captions[i]][1] for i in rows]))
            for _, rows in sorted(by_len.items())]


@torch.no_grad()
def sample(flux, ctx, pooled, uctx, upooled, steps=16, cfg=4.0, seed=0) -> torch.Tensor:
    """Euler on ComfyUI's flux sigmas (the 'simple' schedule); only for the accuracy log while training."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ctx.shape[0], 4, tinyflux.LATENT_SIZE, tinyflux.LATENT_SIZE, generator=g)
    sig = torch.cat([sigma_of(torch.linspace(1, 0, steps + 1)[:-1]), torch.zeros(1)])
    n = len(x)
    for i in range(steps):
        s = sig[i].repeat(n)
        v_c = forward(flux, x, s, ctx, pooled)
        v_u = forward(flux, x, s, uctx.expand(n, -1, -1), upooled.expand(n, -1))
        x = x + (sig[i + 1] - sig[i]) * (v_u + cfg * (v_c - v_u))
    return x


def caption_accuracy(flux, emb, n=36, seed=12345, cfg=4.0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(shapes.COLOURS, shapes.SHAPES))
    picks = [combos[i % len(combos)] for i in range(n)]
    ctx = torch.stack([emb[f"a {c} {s}"][0] for c, s in picks])
    pooled = torch.stack([emb[f"a {c} {s}"][1] for c, s in picks])
    lat = sample(flux, ctx, pooled, emb[""][0][None], emb[""][1][None], cfg=cfg, seed=int(rng.integers(1 << 30)))
    got = [shapes.classify(img) for img in tinysd.decode_latents(lat.numpy())]
    colour = np.mean([g.colour == c for g, (c, _) in zip(got, picks)])
    shape = np.mean([g.shape == s for g, (_, s) in zip(got, picks)])
    return float(colour), float(shape)


def export(ema: dict[str, torch.Tensor], te: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    sd = {"model.diffusion_model." + k: v.half() for k, v in ema.items()}
    sd.update({k: v.half() for k, v in te.items()})
    sd.update({"vae." + k: v for k, v in tinysd.taesd_state_dict().items()})
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
                                metadata={"model": "TinyFlux (comfyui-attention-edit demo model)"})
    tmp.replace(path)


def train(args) -> None:
    emb, te = caption_embeddings(args.seed)
    flux = build_flux(args.seed)

    def loss_at(step: int) -> torch.Tensor:
        xt, s, captions, target = batch(args.data_seed if args.data_seed is not None else args.seed, step, args.batch, args.logit_normal, args.logit_mean,
                                        shape_weights(args.shape_weights))
        loss = torch.zeros(())
        for rows, ctx, pooled in grouped(captions, emb):
            v = forward(flux, xt[rows], s[rows], ctx, pooled)
            loss = loss + torch.nn.functional.mse_loss(v, target[rows], reduction="sum") / target.numel()
        return loss

    run = training.Run(flux, "flux", pathlib.Path(args.state), "tinyflux_log.txt", args.save_every, args.eval_every,
                       ema_decay=args.ema, init_from=args.init_from)
    training.train(run, training.Schedule(args.lr, args.steps, floor=args.lr_floor), loss_at,
                   lambda ema: export(ema, te, pathlib.Path(args.out)),
                   training.caption_check(lambda: build_flux(args.seed), lambda net: caption_accuracy(net, emb),
                                          "36 samples, 16 euler steps, cfg 4"), stop=args.stop_at)


# ---- evaluation through ComfyUI ----------------------------------------------------------------
def evaluate(args) -> None:
    """Caption accuracy of the exported checkpoint through ComfyUI's KSampler, and whether joint
    attention's image->image part carries the layout (via transformer_options'
    optimized_attention_override, which ComfyUI's attention functions call)."""
    import nodes

    torch.set_num_threads(1)
    model, clip, vae = tinyflux.load_checkpoint(args.out)

    def encode(text: str):
        return nodes.CLIPTextEncode().encode(clip, text)[0]

    def images(m, text: str, seeds: list[int]) -> np.ndarray:
        out = []
        for seed in seeds:
            lat = nodes.EmptyLatentImage().generate(128, 128, 1)[0]
            s = nodes.common_ksampler(m, seed, args.eval_steps, args.cfg, "euler", "simple", encode(text),
                                      encode(""), lat)[0]
            with torch.no_grad():
                out.append(vae.decode(s["samples"]).float().cpu().numpy()[0])
        return np.stack(out)

    captions = [(c, s, bg) for c, s in itertools.product(shapes.COLOURS, shapes.SHAPES)
                for bg in (None, *shapes.BACKGROUNDS)]  # 48 captions
    hits, n, t0 = {"colour": 0, "shape": 0, "both": 0}, 0, time.time()
    per_shape = {s: [0, 0] for s in shapes.SHAPES}  # right, asked
    for i, (colour, shape, bg) in enumerate(captions):
        text = f"a {colour} {shape}" + (f" on a {bg} background" if bg else "")
        for img in images(model, text, [EVAL_SEED_BASE + 100 * i + j for j in range(args.eval_seeds)]):
            got = shapes.classify(img)
            n += 1
            hits["colour"] += got.colour == colour
            hits["shape"] += got.shape == shape
            hits["both"] += got.colour == colour and got.shape == shape
            per_shape[shape][0] += got.shape == shape
            per_shape[shape][1] += 1
    print(f"ComfyUI KSampler euler/simple, {args.eval_steps} steps, cfg {args.cfg}, {n} samples: "
          + " ".join(f"{k} {v / n:.3f}" for k, v in hits.items()) + f" ({time.time() - t0:.0f}s)", flush=True)
    print("  shape by the caption's shape: " + ", ".join(f"{s} {r / max(a, 1):.2f}" for s, (r, a) in per_shape.items()),
          flush=True)
    attention_checks(model, images, args.attn_pairs)


def attention_checks(model, images, pairs: int) -> None:
    """Three overrides of joint attention's image->image scores (text rows/columns untouched):
    the sample's own q/k recorded and replayed (must change nothing), a uniform map, and another
    seed's image q/k. IoU of the classifier's shape masks against the plain samples."""
    n_img = (tinyflux.LATENT_SIZE // tinyflux.FLUX_CONFIG["patch_size"]) ** 2
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    state = {"mode": "plain", "call": 0}

    def override(func, q, k, v, heads, skip_reshape=False, transformer_options=None, **kw):
        mode = state["mode"]
        if mode == "plain":
            return func(q, k, v, heads, skip_reshape=skip_reshape, transformer_options=transformer_options, **kw)
        assert skip_reshape, "Flux calls attention with (B, heads, L, dim)"
        txt = q.shape[2] - n_img
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if mode == "record":
            recorded.append((q[:, :, txt:].clone(), k[:, :, txt:].clone()))
        elif mode == "replay":
            qb, kb = recorded[state["call"]]
            scores[:, :, txt:, txt:] = qb @ kb.transpose(-1, -2) * q.shape[-1] ** -0.5
        state["call"] += 1
        probs = scores.softmax(-1)
        if mode == "uniform":  # the image rows keep their mass on the image keys, spread evenly
            probs[:, :, txt:, txt:] = probs[:, :, txt:, txt:].sum(-1, keepdim=True) / n_img
        out = probs @ v
        return out.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])

    m = model.clone()
    m.model_options = dict(m.model_options)
    m.model_options["transformer_options"] = dict(m.model_options.get("transformer_options", {}),
                                                  optimized_attention_override=override)
    text = "a red circle"
    seeds_a = [EVAL_SEED_BASE + 7000 + i for i in range(pairs)]
    seeds_b = [EVAL_SEED_BASE + 8000 + i for i in range(pairs)]

    def run(mode: str, seeds: list[int]) -> np.ndarray:
        state.update(mode=mode, call=0)
        return images(m, text, seeds)

    def masks(imgs: np.ndarray) -> list[np.ndarray]:
        return [shapes.classify(img).mask for img in imgs]

    plain_a, plain_b = run("plain", seeds_a), run("plain", seeds_b)
    ma, mb = masks(plain_a), masks(plain_b)
    uniform = masks(run("uniform", seeds_a))
    self_delta = []
    injected = []
    for sa, sb in zip(seeds_a, seeds_b):
        recorded.clear()
        own = run("record", [sa])
        self_delta.append(float(np.abs(run("replay", [sa]) - own).max()))
        recorded.clear()
        run("record", [sb])
        injected.append(masks(run("replay", [sa]))[0])
    iou = lambda xs, ys: float(np.mean([shapes.iou(x, y) for x, y in zip(xs, ys)]))  # noqa: E731
    print(f"attention checks ('{text}', {pairs} seed pairs, mask IoU):", flush=True)
    print(f"  own image q/k replayed: max |delta| {max(self_delta):.2e}", flush=True)
    print(f"  uniform image->image attention vs plain sample: IoU {iou(uniform, ma):.3f}", flush=True)
    print(f"  seed B's image q/k in seed A: IoU with B {iou(ma, mb):.3f} (plain A) -> {iou(injected, mb):.3f}, "
          f"IoU with A {iou(injected, ma):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000, help="total optimiser steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--seed", type=int, default=0, help="initialisation and the frozen text encoder's weights")
    ap.add_argument("--data-seed", type=int, help="seed of the training images (default --seed); a later stage "
                    "given a new one sees images the earlier stages did not")
    ap.add_argument("--shape-weights", help="relative frequency of circle,square,triangle in the training images "
                    "(default equal); a later stage can weight the shape the model draws worst")
    ap.add_argument("--lr-floor", type=float, default=0.1, help="fraction of --lr the cosine decays to")
    ap.add_argument("--logit-normal", type=float, default=0.75, help="fraction of times drawn logit-normal")
    ap.add_argument("--logit-mean", type=float, default=0.0,
                    help="mean of the logit-normal times (SD3's m; positive: more high-noise steps)")
    ap.add_argument("--state", default=str(REPO / ".train" / "tinyflux_state.pt"), help="resume state (git-ignored)")
    ap.add_argument("--out", default=str(REPO / "demo_model" / "tinyflux.safetensors"))
    ap.add_argument("--init-from", help="start a new run from a TinyFlux checkpoint's transformer (e.g. the shipped one)")
    ap.add_argument("--stop-at", type=int, help="stop after this step (the schedule still runs to --steps)")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported weights")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--eval-every", type=int, default=500, help="caption-accuracy check every N steps (0: never)")
    ap.add_argument("--evaluate", action="store_true", help="evaluate --out through ComfyUI instead of training")
    ap.add_argument("--eval-seeds", type=int, default=1, help="--evaluate: seeds per caption (48 captions)")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--attn-pairs", type=int, default=8, help="--evaluate: seed pairs for the attention checks")
    args = ap.parse_args()
    evaluate(args) if args.evaluate else train(args)


if __name__ == "__main__":
    main()
