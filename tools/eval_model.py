"""Caption accuracy of TinySD through ComfyUI's own sampler: over held-out seeds and every caption
(colour x shape x background-or-none), the fraction of decoded images whose colour, shape and
(where the caption names one) background the repo's classifier reads as the caption says.

    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_model.py --seeds 5
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import Counter

import numpy as np


import inproc

SEED_BASE = 10_000_000  # training uses seeds < 1e6 for its data; these seeds are held out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5, help="seeds per caption (48 captions)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--median", type=int, default=0,
                    help="diagnostic: median-filter each image (this size) before classifying, to tell residual "
                         "speckle from wrong shapes (the reported target figure uses no filter)")
    ap.add_argument("--ckpt", help="a TinySD checkpoint other than the shipped one (e.g. one being trained)")
    args = ap.parse_args()
    tiny = inproc.Tiny.load(steps=args.steps, cfg=args.cfg)
    import shapes
    if args.ckpt:
        import tinysd
        tiny = inproc.Tiny(*tinysd.load_checkpoint(args.ckpt), steps=args.steps, cfg=args.cfg)

    captions = []
    for colour, shape in itertools.product(shapes.COLOURS, shapes.SHAPES):
        captions.append((colour, shape, None))
        captions += [(colour, shape, bg) for bg in shapes.BACKGROUNDS]
    hits, errors, n, t0 = Counter(), Counter(), 0, time.time()
    bg_n = 0
    for i, (colour, shape, bg) in enumerate(captions):
        text = f"a {colour} {shape}" + (f" on a {bg} background" if bg else "")
        imgs = tiny.images(tiny.sample(tiny.model, tiny.encode(text), seed=SEED_BASE + i, batch=args.seeds))
        for img in imgs:
            if args.median:
                from PIL import Image, ImageFilter
                pil = Image.fromarray((img.clip(0, 1) * 255).astype("uint8")).filter(ImageFilter.MedianFilter(args.median))
                img = np.asarray(pil, dtype=np.float32) / 255
            got = shapes.classify(img)
            n += 1
            hits["colour"] += got.colour == colour
            hits["shape"] += got.shape == shape
            hits["both"] += got.colour == colour and got.shape == shape
            if got.shape != shape:
                errors[f"{shape}->{got.shape}"] += 1
            if bg:
                bg_n += 1
                hits["background"] += got.background == bg
    print(f"TinySD caption accuracy: {n} generations ({len(captions)} captions x {args.seeds} held-out seeds), "
          f"{args.steps} euler steps, cfg {args.cfg}, {time.time() - t0:.0f} s"
          + (f", images median-filtered ({args.median}x{args.median}) before classifying" if args.median else ""))
    print(f"  colour {hits['colour'] / n:.3f}  shape {hits['shape'] / n:.3f}  both {hits['both'] / n:.3f}  "
          f"background {hits['background'] / max(bg_n, 1):.3f} (of {bg_n} captions naming one)")
    print(f"  shape confusions: {dict(errors)}")
    sys.exit(0)


if __name__ == "__main__":
    main()
