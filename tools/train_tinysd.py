"""Train TinySD (demo_model/tinysd.py) on synthetic coloured shapes. Deterministic given --seed,
resumable (state in .train/), and it writes the checkpoint that ships, with caption accuracy
measured as it goes: the loss falls long before the model follows its captions.

    OMP_NUM_THREADS=2 .venv/bin/python tools/train_tinysd.py --steps 6000
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import comfyui_env  # noqa: E402

comfyui_env.setup(cpu=True)
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
import safetensors.torch  # noqa: E402
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

import shapes  # noqa: E402
import tinysd  # noqa: E402
import training  # noqa: E402

REPO = comfyui_env.REPO
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled-linear
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0).float()


def all_captions() -> list[str]:
    out = [""]
    for c, s in itertools.product(shapes.COLOURS, shapes.SHAPES):
        out.append(f"a {c} {s}")
        out += [f"a {c} {s} on a {b} background" for b in shapes.BACKGROUNDS]
    return out


def caption_embeddings(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Embeddings of every caption through ComfyUI's own CLIP code (the frozen encoder)."""
    te = tinysd.text_encoder_state_dict(seed)
    config = tinysd.TinySD15(tinysd.UNET_CONFIG)
    clip_sd = config.process_clip_state_dict(dict(te))
    clip = comfy.sd.CLIP(config.clip_target(), tokenizer_data=clip_sd)
    clip.load_sd(clip_sd, full_model=True)
    with torch.no_grad():
        emb = {c: clip.encode_from_tokens(clip.tokenize(c)).float()[0] for c in all_captions()}
    return emb, te


def build_unet(seed: int) -> UNetModel:
    torch.manual_seed(seed)
    cfg = dict(tinysd.UNET_CONFIG, **tinysd.TinySD15.unet_extra_config)
    unet = UNetModel(**cfg, operations=comfy.ops.disable_weight_init)
    for name, m in unet.named_modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, base):
                base.reset_parameters(m)  # ComfyUI's ops skip initialisation
        if name == "out.2" or name.endswith("out_layers.3") or name.endswith("proj_out"):
            torch.nn.init.zeros_(m.weight)
            torch.nn.init.zeros_(m.bias)
    return unet


def batch(seed: int, step: int, size: int, emb: dict[str, torch.Tensor], offset_noise: float = 0.0,
          high_t: float = 0.0):
    rng = np.random.default_rng([seed, step])
    specs = [shapes.random_spec(rng) for _ in range(size)]
    x0 = torch.from_numpy(tinysd.encode_images(np.stack([shapes.render(s) for s in specs])))
    captions = [s.caption(with_background=rng.random() < 0.5) for s in specs]
    captions = ["" if rng.random() < 0.1 else c for c in captions]  # for classifier-free guidance
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    t = torch.randint(0, 1000, (size,), generator=g)
    if high_t:  # colour and shape are decided at t ~ 700-950 (16x16 latents): sample there more often
        high = torch.rand(size, generator=g) < high_t
        t = torch.where(high, torch.randint(600, 1000, (size,), generator=g), t)
    noise = torch.randn(x0.shape, generator=g)
    if offset_noise:  # per-image, per-channel constant: the model may not read the colour of the
        # background from the mean of pure noise (SD's schedule leaves 6.8% of the image at t=999)
        noise = noise + offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=g)
    a = ALPHAS_CUMPROD[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # = ComfyUI's (x0 + sigma*eps) / sqrt(sigma^2 + 1)
    return xt, t.float(), torch.stack([emb[c] for c in captions]), noise


@torch.no_grad()
def sample(unet, context, uncond, steps=15, cfg=5.0, seed=0) -> torch.Tensor:
    """Plain DDIM (eta 0) on SD's schedule; only for the accuracy log while training."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(context.shape[0], 4, tinysd.LATENT_SIZE, tinysd.LATENT_SIZE, generator=g)
    ts = torch.linspace(999, 0, steps).round().long()
    for i, t in enumerate(ts):
        a = ALPHAS_CUMPROD[t]
        eps_c, eps_u = unet(torch.cat([x, x]), t.float().repeat(2 * len(x)), torch.cat([context, uncond])).chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        a_next = ALPHAS_CUMPROD[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def caption_accuracy(unet, emb, n=36, seed=12345) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(shapes.COLOURS, shapes.SHAPES))
    picks = [combos[i % len(combos)] for i in range(n)]
    ctx = torch.stack([emb[f"a {c} {s}"] for c, s in picks])
    lat = sample(unet, ctx, emb[""].expand_as(ctx), seed=int(rng.integers(1 << 30)))
    got = [shapes.classify(img) for img in tinysd.decode_latents(lat.numpy())]
    colour = np.mean([g.colour == c for g, (c, _) in zip(got, picks)])
    shape = np.mean([g.shape == s for g, (_, s) in zip(got, picks)])
    return float(colour), float(shape)


def export(ema: dict[str, torch.Tensor], te: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    sd = {"model.diffusion_model." + k: v.half() for k, v in ema.items()}
    sd.update({k: v.half() for k, v in te.items()})
    sd.update({"first_stage_model." + k: v for k, v in tinysd.taesd_state_dict().items()})
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
                                metadata={"model": "TinySD (comfyui-attention-edit demo model)"})
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000, help="total optimiser steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", default=str(REPO / ".train" / "tinysd_state.pt"), help="resume state (git-ignored)")
    ap.add_argument("--out", default=str(REPO / "demo_model" / "tinysd.safetensors"))
    ap.add_argument("--offset-noise", type=float, default=0.0, help="per-channel offset noise (0.1 is usual)")
    ap.add_argument("--high-t", type=float, default=0.0, help="fraction of samples drawn from t in [600, 1000)")
    ap.add_argument("--init-from", help="start a new run from a TinySD checkpoint's UNet (e.g. the shipped one)")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--eval-every", type=int, default=500, help="caption-accuracy check every N steps (0: never)")
    args = ap.parse_args()

    emb, te = caption_embeddings(args.seed)
    unet = build_unet(args.seed)

    def loss_at(step: int) -> torch.Tensor:
        xt, t, ctx, noise = batch(args.seed, step, args.batch, emb, args.offset_noise, args.high_t)
        return torch.nn.functional.mse_loss(unet(xt, t, ctx), noise)

    run = training.Run(unet, "unet", pathlib.Path(args.state), "train_log.txt", args.save_every, args.eval_every,
                       init_from=args.init_from)
    training.train(run, training.Schedule(args.lr, args.steps), loss_at,
                   lambda ema: export(ema, te, pathlib.Path(args.out)),
                   training.caption_check(lambda: build_unet(args.seed), lambda net: caption_accuracy(net, emb),
                                          "36 samples, 15 DDIM steps, cfg 5"))


if __name__ == "__main__":
    main()
