"""Edit quality on TinySD through ComfyUI's sampler, per edit kind and method:
edit success (classifier reads the target's colour/shape/background), structure preservation
(IoU of source and edited shape masks) and background preservation (median PSNR outside both
masks), for seed only (no injection), P2P (replace or refine), P2P + local blend, and FPE.

    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_edits.py --batch 25
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import edits
import inproc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=25, help="samples (noise seeds) per prompt pair; 2 pairs per kind")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--reweight-only", action="store_true", help="only the re-weight sweep")
    ap.add_argument("--real", action="store_true", help="edit inverted rendered images (colour and shape swaps)")
    args = ap.parse_args()
    tiny = inproc.Tiny.load()
    if args.reweight_only:
        return reweight(tiny)
    results: dict[tuple[str, str], list[dict]] = defaultdict(list)
    t0 = time.time()
    for i, case in enumerate(edits.CASES):
        if args.real and case.kind == "refine":
            continue
        run = edits.run_real_case if args.real else edits.run_case
        for method, rows in run(tiny, case, args.seed + i, args.batch).items():
            results[(case.kind, method)] += rows
    what = "inverted rendered images (DDIM inversion, direct-inversion source)" if args.real else "samples"
    print(f"Edits on TinySD, {what}: {args.batch} x 2 prompt pairs per kind, {tiny.steps} euler steps, cfg {tiny.cfg}, "
          f"{time.time() - t0:.0f} s")
    print(f"{'kind':8s} {'method':20s} {'n':>4s} {'success':>8s} {'IoU':>6s} {'bg PSNR':>8s}")
    for (kind, method), rows in results.items():
        s = edits.summarise(rows)
        print(f"{kind:8s} {method:20s} {s['n']:4d} {s['success']:8.2f} {s['iou']:6.2f} {s['psnr_bg']:8.1f}")
    if not args.real:
        reweight(tiny)


def reweight(tiny: inproc.Tiny) -> None:
    _, sweep = edits.reweight_sweep(dataclasses.replace(tiny, steps=12), seed=8, batch=8)
    print("re-weight 'a red circle', red=c for c = -2, -1, 0, 1, 2 (8 samples, 12 steps, as in the test): mean redness "
          + ", ".join(f"{r:.3f}" for r, _ in sweep))


if __name__ == "__main__":
    main()
