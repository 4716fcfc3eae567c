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
    ap.add_argument("--sampler", default="euler", help="a ComfyUI sampler name")
    ap.add_argument("--scheduler", default="normal", help="a ComfyUI scheduler name")
    ap.add_argument("--ckpt", help="a TinySD checkpoint other than the shipped one (e.g. one being trained)")
    ap.add_argument("--misses", help="write the misread generations here (PNG grid, 'asked -> read' under each) to "
                                     "check the classifier by eye")
    args = ap.parse_args()
    opts = dict(steps=args.steps, cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler)
    tiny = inproc.Tiny.load(**opts)
    import shapes
    if args.ckpt:
        import tinysd
        tiny = inproc.Tiny(*tinysd.load_checkpoint(args.ckpt), **opts)

    captions = []
    for colour, shape in itertools.product(shapes.COLOURS, shapes.SHAPES):
        captions.append((colour, shape, None))
        captions += [(colour, shape, bg) for bg in shapes.BACKGROUNDS]
    hits, errors, n, t0 = Counter(), Counter(), 0, time.time()
    bg_n, misses = 0, []
    for i, (colour, shape, bg) in enumerate(captions):
        text = f"a {colour} {shape}" + (f" on a {bg} background" if bg else "")
        imgs = tiny.images(tiny.sample(tiny.model, tiny.encode(text), seed=SEED_BASE + i, batch=args.seeds))
        for img in imgs:
            got = shapes.classify(img)
            n += 1
            hits["colour"] += got.colour == colour
            hits["shape"] += got.shape == shape
            hits["both"] += got.colour == colour and got.shape == shape
            if got.shape != shape:
                errors[f"{shape}->{got.shape}"] += 1
            if got.shape != shape or got.colour != colour:
                misses.append((img, f"{colour} {shape} -> {got.colour} {got.shape}"))
            if bg:
                bg_n += 1
                hits["background"] += got.background == bg
    print(f"TinySD caption accuracy: {n} generations ({len(captions)} captions x {args.seeds} held-out seeds), "
          f"{args.steps} {args.sampler} steps ({args.scheduler}), cfg {args.cfg}, {time.time() - t0:.0f} s")
    print(f"  colour {hits['colour'] / n:.3f}  shape {hits['shape'] / n:.3f}  both {hits['both'] / n:.3f}  "
          f"background {hits['background'] / max(bg_n, 1):.3f} (of {bg_n} captions naming one)")
    print(f"  shape confusions: {dict(errors)}")
    if args.misses:
        write_grid(misses, args.misses)
        print(f"  {len(misses)} misread generations: {args.misses}")
    sys.exit(0)


def write_grid(tiles: list, path: str, columns: int = 8) -> None:
    from PIL import Image, ImageDraw

    size, label = 128, 14
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * size, rows * (size + label)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, text) in enumerate(tiles):
        x, y = i % columns * size, i // columns * (size + label)
        sheet.paste(Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).resize((size, size)), (x, y))
        draw.text((x + 2, y + size + 1), text, fill=(0, 0, 0))
    sheet.save(path)


if __name__ == "__main__":
    main()
