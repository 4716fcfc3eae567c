"""Reconstruction of real images by inversion, through ComfyUI's own samplers (in-process): PSNR
of the decoded reconstruction against the image for plain DDIM inversion, direct inversion
(AttentionStore re-anchored to the trajectory), negative-prompt inversion (the source prompt as the
negative) and null-text inversion, at several step counts; and the time of each relative to one
plain generation of the same steps. With --solver midpoint also DDIMInvert's second-order inversion,
retraced by ComfyUI's dpm_2 sampler (plain) or re-anchored (direct).

    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_inversion.py --images 8 --steps 10 20 50
    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_inversion.py --model tinyflux --cfg 1 4 --solver euler midpoint
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import graphs
import inproc


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def synthetic_images(n: int, seed: int = 2024) -> tuple[np.ndarray, list[str]]:
    import shapes  # demo_model/, on sys.path once ComfyUI is set up
    rng = np.random.default_rng(seed)
    specs = [shapes.random_spec(rng) for _ in range(n)]
    return np.stack([shapes.render(s) for s in specs]), [s.caption(with_background=True) for s in specs]


RETRACING_SAMPLER = {"euler": "euler", "midpoint": "dpm_2"}  # the ComfyUI sampler that retraces each inversion


def reconstruct(tiny: inproc.Tiny, image: np.ndarray, prompt: str, steps: int, cfg: float,
                inner_steps: list[int], lr: float, solvers=("euler",)) -> dict[str, tuple[float, float]]:
    """method -> (PSNR dB, seconds) for one image. PSNR is against the VAE's own reconstruction
    decode(encode(image)): what an exact inversion can give back (TinySD's VAE is 8x8 pixel art)."""
    node = tiny.node
    latent = tiny.encode_images(image[None])
    image = tiny.images(latent)[0]
    pos, neg = tiny.encode(prompt), tiny.encode("")
    out: dict[str, tuple[float, float]] = {}

    def score(lat):
        return psnr(tiny.images(lat)[0], image)

    t = time.perf_counter()
    tiny.sample(tiny.model, pos, seed=1, steps=steps, cfg=cfg)
    plain_s = time.perf_counter() - t
    out["plain generation"] = (float("nan"), plain_s)

    for solver in solvers:
        name = "ddim" if solver == "euler" else f"{solver} inversion"
        t = time.perf_counter()
        inverted = node("DDIMInvert").execute(tiny.model, pos, neg, latent, steps, tiny.scheduler, 1.0, solver).result
        invert_s = time.perf_counter() - t
        out[f"{name} only"] = (float("nan"), invert_s)
        t = time.perf_counter()
        rec = tiny.sample_branch(tiny.model, pos, inverted, neg, steps=steps, cfg=cfg, sampler=RETRACING_SAMPLER[solver])
        out[name if solver == "euler" else f"{name} + {RETRACING_SAMPLER[solver]}"] = (score(rec), invert_s + time.perf_counter() - t)
        t = time.perf_counter()
        m, src_pos, _ = node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 1.0, "fpe", 1.0, "model dtype",
                                                       inversion=inverted[1]).result
        out["direct" if solver == "euler" else f"direct ({solver})"] = (
            score(tiny.sample_branch(m, src_pos, inverted, neg, steps=steps, cfg=cfg)), invert_s + time.perf_counter() - t)
        if solver != "euler":
            continue
        t = time.perf_counter()
        out["negative-prompt"] = (score(tiny.sample_branch(tiny.model, pos, inverted, pos, steps=steps, cfg=cfg)),
                                  invert_s + time.perf_counter() - t)
        for inner in inner_steps if cfg > 1 else ():
            t = time.perf_counter()
            null = node("NullTextInversion").execute(tiny.model, inverted[1], pos, neg, cfg, inner, lr, 1e-5).result[0]
            null_s = time.perf_counter() - t
            out[f"null-text ({inner} evals/step)"] = (
                score(tiny.sample_branch(tiny.model, pos, inverted, null, steps=steps, cfg=cfg)), invert_s + time.perf_counter() - t)
            out[f"null-text ({inner}) optimisation only"] = (float("nan"), null_s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--model", choices=("tinysd", "tinyflux"), default="tinysd")
    ap.add_argument("--cfg", type=float, nargs="+", default=[5.0], help="guidance of the reconstructing branch")
    ap.add_argument("--solver", nargs="+", default=["euler"], choices=sorted(RETRACING_SAMPLER),
                    help="DDIMInvert's solvers to measure")
    ap.add_argument("--inner-steps", type=int, nargs="+", default=[2, 10],
                    help="null-text evaluations per step (each but the last followed by an Adam update)")
    ap.add_argument("--image", nargs="*", default=[],
                    help="other images to reconstruct instead (scaled to 128x128; empty prompt), e.g. ComfyUI's "
                         "input/example.png")
    ap.add_argument("--lr", type=float, default=0.1, help="null-text learning rate (TinySD's 64-wide embedding "
                    "needs more than the paper's 0.01 for SD)")
    args = ap.parse_args()
    tiny = (inproc.Tiny.load() if args.model == "tinysd" else
            inproc.Tiny.load("TinyFluxCheckpointLoader", scheduler=graphs.TINYFLUX_SCHEDULER))
    images, captions = synthetic_images(args.images)
    if args.image:
        from PIL import Image
        images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((128, 128), Image.LANCZOS),
                                      dtype=np.float32) / 255 for p in args.image])
        captions = [""] * len(images)
    for cfg, steps in ((c, s) for c in args.cfg for s in args.steps):
        print(f"reconstruction of {len(images)} {'given' if args.image else 'synthetic'} images ({args.model}, "
              f"{tiny.scheduler}, inversion at cfg 1, reconstruction at cfg {cfg}); PSNR of the decoded image in dB "
              "against the VAE round trip (mean, min; 99 = exact); time relative to one plain generation of the same steps",
              flush=True)
        rows: dict[str, list[tuple[float, float]]] = {}
        for img, cap in zip(images, captions):
            for k, v in reconstruct(tiny, img, cap, steps, cfg, args.inner_steps, args.lr, args.solver).items():
                rows.setdefault(k, []).append(v)
        plain = np.mean([s for _, s in rows["plain generation"]])
        for k, v in rows.items():
            p = np.array([x for x, _ in v])
            ps = "" if np.isnan(p).all() else f"PSNR {np.mean(np.minimum(p, 99)):6.2f} dB (min {np.min(p):6.2f})  "
            print(f"  {steps:3d} steps  {k:28s} {ps}time {np.mean([s for _, s in v]) / plain:5.2f}x", flush=True)
        ddim_s = np.mean([s for _, s in rows["ddim only"]])
        for inner in args.inner_steps if cfg > 1 else ():
            ratio = np.mean([s for _, s in rows[f"null-text ({inner}) optimisation only"]]) / ddim_s
            print(f"  {steps:3d} steps  null-text ({inner} evals/step) optimisation / DDIM inversion: {ratio:.2f}x")


if __name__ == "__main__":
    main()
