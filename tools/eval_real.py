"""Edits of real (rendered, not sampled) images on TinySD, per inversion, over backgrounds the prompts
do not name: every image is one shape on a white, black or gray background (a third each), the
prompts name only colour and shape ("a red circle" -> "a blue circle"). Per edit kind (colour swap,
shape swap; two prompt pairs each), cfg and inversion, for the seed alone (the inverted noise and the
target prompt, no injection), P2P replace (TinySD's schedule), P2P + local blend and FPE (empty source
prompt): success (the classifier reads the target prompt), IoU of the image's and the edit's shape
masks, median centre shift (px), and median background PSNR (dB) outside both masks against the
image itself (its VAE round trip), with the per-background medians.

Inversions (graphs.REAL_INVERSIONS), each DDIMInvert at cfg 1 with the source prompt (FPE: empty):
- ddim: both branches sample the inverted noise as it is (negative: empty prompt);
- direct: AttentionStore gets the inversion (the source re-anchored every step, exact) and the target
  gets the source's per-step corrections (correct_target on);
- direct without target correction: the same, correct_target off (the default, graphs.REAL_IMAGE);
- negative-prompt: the source prompt as the negative of both branches (FPE: empty, so = ddim);
- null-text: NullTextInversion's per-step negatives in both branches.

    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_real.py --batch 12 --cfg 5 7
    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_real.py --model tinyflux --batch 12 --cfg 4 --solver euler midpoint

On TinyFlux (Flux's architecture) both branches sample with SamplerCustomAdvanced from DDIMInvert's
noise, P2P is TinyFlux's schedule (graphs.TINYFLUX_P2P) and --solver adds DDIMInvert's second-order
inversion ("midpoint") to the first-order one.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import numpy as np

import edits
import graphs
import inproc

BACKGROUNDS = ("white", "black", "gray")
METHODS = ("seed only", "P2P", "P2P + local blend", "FPE")
PLAIN_NEGATIVE = ("ddim", "direct", "direct without target correction")  # an empty prompt's negative


def real_images(case: edits.EditCase, seed: int, batch: int) -> np.ndarray:
    """Rendered shapes of the case's source colour and shape at random places and sizes, the
    backgrounds cycling white, black, gray."""
    import shapes

    colour, shape = case.source.split()[1:3]
    rng = np.random.default_rng([seed, 16])
    specs = [dataclasses.replace(shapes.random_spec(rng), colour=colour, shape=shape, background=BACKGROUNDS[i % 3])
             for i in range(batch)]
    return np.stack([shapes.render(s) for s in specs])


def branches(tiny: inproc.Tiny, inversion: str, source_prompt: str, latent: dict, null_opts: dict, cache: dict,
             solver: str = "euler"):
    """(DDIMInvert's outputs, negative of both branches, AttentionStore's inversion input, correct_target)
    for one inversion kind of a batch of image latents (the inversion of a prompt is made once, in `cache`)."""
    node, empty = tiny.node, tiny.encode("")
    pos = tiny.encode(source_prompt)
    if (source_prompt, solver) not in cache:
        cache[(source_prompt, solver)] = node("DDIMInvert").execute(
            tiny.model, pos, empty, latent, tiny.steps, tiny.scheduler, graphs.REAL_IMAGE["invert_cfg"], solver).result
    inverted = cache[(source_prompt, solver)]
    inv = inverted[1]
    if inversion == "ddim":
        return inverted, empty, None, False
    if inversion in ("direct", "direct without target correction"):
        return inverted, empty, inv, inversion == "direct"
    if inversion == "negative-prompt":
        return inverted, pos, None, False
    if inversion == "null-text":
        null = node("NullTextInversion").execute(tiny.model, inv, pos, empty, tiny.cfg, null_opts["inner_steps"],
                                                 null_opts["lr"], 1e-5).result[0]
        return inverted, null, None, False
    raise ValueError(inversion)


def run(tiny: inproc.Tiny, case: edits.EditCase, seed: int, batch: int, inversions=graphs.REAL_INVERSIONS,
        methods=METHODS, null_opts: dict | None = None, solver: str = "euler",
        p2p_settings: dict = graphs.TINYSD_P2P) -> dict[tuple[str, str], list[dict]]:
    """(inversion, method) -> per-image measures (edits._measure plus the image's background)."""
    import shapes

    null_opts = null_opts or {"inner_steps": 5, "lr": 0.1}
    node = tiny.node
    images = real_images(case, seed, batch)
    latent = tiny.encode_images(images)
    ref = tiny.images(latent)
    tgt_pos = tiny.encode(case.target)
    s_words, _, t_words = case.blend_words.partition("|")
    out: dict[tuple[str, str], list[dict]] = {}
    made, sources, seed_rows = {}, {}, None
    for inversion in inversions:
        for prompt_kind in ("source", "empty"):
            wanted = [m for m in methods if (m == "FPE") == (prompt_kind == "empty")]
            if not wanted:
                continue
            source_prompt = case.source if prompt_kind == "source" else ""
            inverted, negative, inv, correct = branches(tiny, inversion, source_prompt, latent, null_opts, made, solver)
            key = (source_prompt, inversion)  # each its own store: an edit reads the store's run as it finished
            if key not in sources:
                src_model, src_pos, store = node("AttentionStore").execute(
                    tiny.model, tiny.clip, source_prompt, 1.0, "all", 1.0, "model dtype", correct_target=correct,
                    inversion=inv, token_map_level=edits.BLEND["token_map_level"]).result
                sources[key] = (store, tiny.sample_branch(src_model, src_pos, inverted, negative))
            store, source = sources[key]
            models = {}
            for m in wanted:
                if m == "seed only" and inversion in PLAIN_NEGATIVE and seed_rows is not None:
                    out[(inversion, m)] = seed_rows  # the same noise and negative: the same samples
                elif m == "seed only":
                    models[m] = tiny.model
                elif m == "FPE":
                    models[m] = node("FPESelfAttnInject").execute(tiny.model, store, source, "fpe", 1.0).result[0]
                else:
                    p2p = node("P2PReplace").execute(tiny.model, tiny.clip, store, source, case.target,
                                                     word_schedules="", **p2p_settings).result[0]
                    models[m] = p2p if m == "P2P" else node("P2PLocalBlend").execute(
                        p2p, s_words, t_words, edits.BLEND["threshold"], 0.2, "", edits.BLEND["dilate"]).result[0]
            for m, model in models.items():
                edited = tiny.images(tiny.sample_branch(model, tgt_pos, inverted, negative))
                out[(inversion, m)] = [dict(edits._measure(shapes, case, r, e), background=BACKGROUNDS[i % 3])
                                       for i, (r, e) in enumerate(zip(ref, edited))]
                if m == "seed only" and inversion in PLAIN_NEGATIVE:
                    seed_rows = out[(inversion, m)]
    return out


def summary(rows: list[dict]) -> dict[str, float]:
    s = edits.summarise(rows)
    for bg in BACKGROUNDS:
        ps = [r["psnr_bg"] for r in rows if r["background"] == bg and np.isfinite(r["psnr_bg"])]
        s[bg] = float(np.median(ps)) if ps else float("nan")
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=12, help="images per prompt pair (2 pairs per kind)")
    ap.add_argument("--cfg", type=float, nargs="+", default=[5.0, 7.0])
    ap.add_argument("--steps", type=int, default=graphs.REAL_IMAGE["steps"])
    ap.add_argument("--sampler", default=graphs.REAL_IMAGE["sampler_name"])
    ap.add_argument("--scheduler", nargs="+", default=[graphs.REAL_IMAGE["scheduler"]],
                    help="ComfyUI scheduler names (DDIMInvert and both branches use the same)")
    ap.add_argument("--kinds", default="colour,shape")
    ap.add_argument("--inversions", default=",".join(graphs.REAL_INVERSIONS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--null-inner-steps", type=int, default=5)
    ap.add_argument("--null-lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1600)
    ap.add_argument("--model", choices=("tinysd", "tinyflux"), default="tinysd")
    ap.add_argument("--solver", nargs="+", default=["euler"], help="DDIMInvert's solvers (euler, midpoint)")
    args = ap.parse_args()
    kinds, methods = args.kinds.split(","), tuple(args.methods.split(","))
    inversions = tuple(args.inversions.split(","))
    null_opts = {"inner_steps": args.null_inner_steps, "lr": args.null_lr}
    flux = args.model == "tinyflux"
    if flux and args.scheduler == [graphs.REAL_IMAGE["scheduler"]]:
        args.scheduler = [graphs.TINYFLUX_SCHEDULER]
    print(f"Real-image edits on {'TinyFlux' if flux else 'TinySD'}: rendered images on white/black/gray backgrounds the prompts do not name, "
          f"{args.batch} x 2 prompt pairs per kind, {args.steps} {args.sampler} steps ({', '.join(args.scheduler)}); DDIMInvert "
          f"cfg {graphs.REAL_IMAGE['invert_cfg']}; null-text {args.null_inner_steps} evals/step, lr {args.null_lr}. "
          "bg PSNR: median dB outside both masks against the image (per background: W/B/G)", flush=True)
    print(f"{'cfg':>4s} {'kind':7s} {'inversion':32s} {'method':18s} {'n':>3s} {'success':>7s} {'IoU':>5s} "
          f"{'shift':>5s} {'bg PSNR':>7s} {'W':>5s} {'B':>5s} {'G':>5s}", flush=True)
    t0 = time.time()
    for scheduler, cfg in ((sch, c) for sch in args.scheduler for c in args.cfg):
        if len(args.scheduler) > 1:
            print(f"scheduler {scheduler}", flush=True)
        tiny = inproc.Tiny.load("TinyFluxCheckpointLoader" if flux else "TinySDCheckpointLoader", steps=args.steps,
                                cfg=cfg, sampler=args.sampler, scheduler=scheduler)
        for kind, solver in ((k, s) for k in kinds for s in args.solver):
            results: dict[tuple[str, str], list[dict]] = defaultdict(list)
            for i, case in enumerate(edits.CASES):
                if case.kind == kind:
                    for key, rows in run(tiny, case, args.seed + i, args.batch, inversions, methods, null_opts, solver,
                                         graphs.TINYFLUX_P2P if flux else graphs.TINYSD_P2P).items():
                        results[key] += rows
            for (inversion, method), rows in results.items():
                s = summary(rows)
                inversion = inversion if solver == "euler" else f"{inversion} ({solver})"
                print(f"{cfg:4.1f} {kind:7s} {inversion:32s} {method:18s} {s['n']:3d} {s['success']:7.2f} {s['iou']:5.2f} "
                      f"{s['shift']:5.1f} {s['psnr_bg']:7.1f} {s['white']:5.1f} {s['black']:5.1f} {s['gray']:5.1f}",
                      flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
