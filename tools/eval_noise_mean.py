"""Does TinySD read the background from the mean of its starting noise? SD's schedule leaves 6.8% of
the image at t = 999, so a model trained on images with large mean colours can learn to. This
samples every colour x shape caption (4 seeds each) through ComfyUI's sampler twice, from the
same noise with and without its per-channel mean, and prints the caption accuracy of both.

    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_noise_mean.py
"""
from __future__ import annotations

import itertools

import torch

import inproc


def main() -> None:
    tiny = inproc.Tiny.load(steps=20)
    import comfy.sample
    import shapes

    combos = list(itertools.product(shapes.COLOURS, shapes.SHAPES))
    negative = tiny.encode("")
    for remove_mean in (False, True):
        colour = shape = n = 0
        for i, (c, s) in enumerate(combos):
            noise = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(100 + i))
            if remove_mean:
                noise = noise - noise.mean((2, 3), keepdim=True)
            out = comfy.sample.sample(tiny.model, noise, tiny.steps, tiny.cfg, "euler", "normal",
                                      tiny.encode(f"a {c} {s}"), negative, torch.zeros_like(noise), seed=0)
            for img in tiny.images({"samples": out}):
                got = shapes.classify(img)
                colour, shape, n = colour + (got.colour == c), shape + (got.shape == s), n + 1
        label = "noise without its mean" if remove_mean else "plain noise"
        print(f"{label:24s}: colour {colour / n:.2f}, shape {shape / n:.2f} ({n} samples, 20 euler steps, cfg {tiny.cfg})")


if __name__ == "__main__":
    main()
