"""Edit quality on TinySD through ComfyUI's sampler, per edit kind and method:
- success: the classifier reads the target prompt in the edited image (its colour, its shape and,
  for a refine, its background); "edited" asks only the attribute the edit changes;
- structure preservation: IoU of the source's and the edited image's shape masks, and the median
  shift of the mask's centre in pixels (a shape swap cannot keep the mask, but it can keep the place);
- background preservation: median PSNR outside both masks;
for seed only (no injection), P2P (replace or refine) with the nodes' SD1.5 defaults and with
TinySD's schedule (tools/graphs.py TINYSD_P2P says why they differ), P2P + local blend, and FPE.

    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_edits.py --batch 50
    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_edits.py --model tinyflux --batch 25   # Flux's architecture

On TinyFlux (the flow transformer) "P2P" is TinyFlux's schedule (graphs.TINYFLUX_P2P), the SD1.5
defaults' p2p_16 is every block there, and local blend reads every block's maps.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import edits
import graphs
import inproc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=25, help="samples (noise seeds) per prompt pair; 2 pairs per kind")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--reweight-only", action="store_true", help="only the re-weight sweep")
    ap.add_argument("--real", action="store_true", help="edit inverted rendered images (colour and shape swaps)")
    ap.add_argument("--p2p-blend", action="store_true",
                    help="local blend as P2P sets it up (maps at <= 16x16, threshold 0.3, 3x3 dilation) instead of "
                         "TinySD's (level 1, 0.5, none)")
    ap.add_argument("--kinds", default="colour,shape,refine")
    ap.add_argument("--ckpt", help="a checkpoint of --model other than the shipped one (e.g. a training stage's)")
    ap.add_argument("--sampler", default="euler", help="a ComfyUI sampler name ('ddim' is euler)")
    ap.add_argument("--scheduler", default="normal", help="a ComfyUI scheduler name")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model", choices=["tinysd", "tinyflux"], default="tinysd")
    ap.add_argument("--methods", default=";".join(edits.METHODS), help="';'-separated, of: " + "; ".join(edits.METHODS))
    ap.add_argument("--self-layers", help="a self_attention_layers preset for P2P and FPE instead of their defaults "
                    "(TinyFlux: all, double, single)")
    args = ap.parse_args()
    opts = dict(steps=args.steps, sampler=args.sampler, scheduler=args.scheduler)
    flux = args.model == "tinyflux"
    if flux:
        opts["cfg"] = graphs.TINYFLUX_CFG
        opts["scheduler"] = graphs.TINYFLUX_SCHEDULER if args.scheduler == "normal" else args.scheduler
    if args.ckpt:
        inproc.node_classes()  # puts the demo models' modules on the path
        import tinyflux
        import tinysd
        tiny = inproc.Tiny(*(tinyflux if flux else tinysd).load_checkpoint(args.ckpt), **opts)
    else:
        tiny = inproc.Tiny.load("TinyFluxCheckpointLoader" if flux else "TinySDCheckpointLoader", **opts)
    if args.reweight_only:
        return reweight(tiny)
    results: dict[tuple[str, str], list[dict]] = defaultdict(list)
    t0 = time.time()
    for i, case in enumerate(edits.CASES):
        if (args.real and case.kind == "refine") or case.kind not in args.kinds.split(","):
            continue
        if args.real:
            rows_by_method = edits.run_real_case(tiny, case, args.seed + i, args.batch)
        else:
            blend = {"token_map_level": "auto", "threshold": 0.3, "dilate": 1} if args.p2p_blend else edits.BLEND
            p2p = dict(graphs.TINYFLUX_P2P if flux else graphs.TINYSD_P2P)
            fpe = dict(graphs.FPE_DEFAULTS)
            if args.self_layers:
                p2p["self_attention_layers"] = fpe["layers"] = args.self_layers
            rows_by_method = edits.run_case(tiny, case, args.seed + i, args.batch, tuple(m.strip() for m in args.methods.split(";")),
                                            blend=blend, p2p=p2p, fpe=fpe)
        for method, rows in rows_by_method.items():
            results[(case.kind, method)] += rows
    what = "inverted rendered images (DDIM inversion, direct-inversion source)" if args.real else "samples"
    print(f"Edits on {'TinyFlux' if flux else 'TinySD'}, {what}: {args.batch} x 2 prompt pairs per kind, {tiny.steps} {tiny.sampler} steps "
          f"({tiny.scheduler}), cfg {tiny.cfg}, {time.time() - t0:.0f} s"
          + (f"; self-attention layers {args.self_layers}" if args.self_layers else ""))
    print(f"{'kind':8s} {'method':20s} {'n':>4s} {'success':>8s} {'edited':>7s} {'IoU':>6s} {'shift':>6s} {'bg PSNR':>8s}")
    for (kind, method), rows in results.items():
        s = edits.summarise(rows)
        print(f"{kind:8s} {method:20s} {s['n']:4d} {s['success']:8.2f} {s['edited']:7.2f} {s['iou']:6.2f} "
              f"{s['shift']:6.1f} {s['psnr_bg']:8.1f}")
    swaps = [c for c in edits.CASES if c.kind == "shape" and "shape" in args.kinds.split(",")]
    if swaps:
        print("a perfect shape swap's IoU (both shapes at the same place and size): "
              + ", ".join(f"{c.source} -> {c.target} {edits.ideal_iou(c):.2f}" for c in swaps))
    if not args.real and args.kinds == "colour,shape,refine":
        reweight(tiny)


def reweight(tiny: inproc.Tiny) -> None:
    _, sweep = edits.reweight_sweep(dataclasses.replace(tiny, steps=12), seed=8, batch=8)
    print("re-weight 'a red circle', red=c for c = -2, -1, 0, 1, 2 (8 samples, 12 steps, as in the test): mean redness "
          + ", ".join(f"{r:.3f}" for r, _ in sweep))


if __name__ == "__main__":
    main()
