"""The synthetic domain of the demo model: one coloured shape on a plain background.

Rendering (for training data) and a small rule-based classifier (for measuring what the model
and the edits produce) live together so that both agree on palette and geometry.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128)}


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    background: str
    cx: float  # centre, pixels
    cy: float
    radius: float  # half the extent, pixels

    def caption(self, with_background: bool) -> str:
        text = f"a {self.colour} {self.shape}"
        return f"{text} on a {self.background} background" if with_background else text


def random_spec(rng: np.random.Generator, size: int = IMAGE_SIZE) -> ShapeSpec:
    radius = rng.uniform(0.21, 0.36) * size
    margin = radius + size / 32
    return ShapeSpec(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        background=str(rng.choice(list(BACKGROUNDS))),
        cx=float(rng.uniform(margin, size - margin)),
        cy=float(rng.uniform(margin, size - margin)),
        radius=float(radius),
    )


def render(spec: ShapeSpec, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """HxWx3 float32 image in [0, 1], anti-aliased by supersampling."""
    s = supersample
    img = Image.new("RGB", (size * s, size * s), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(img)
    cx, cy, r = spec.cx * s, spec.cy * s, spec.radius * s
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif spec.shape == "square":
        h = r * 0.886  # same area as the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class Classified:
    colour: str | None
    shape: str | None
    background: str
    mask: np.ndarray  # HxW bool: the shape's pixels

    def matches(self, colour: str | None = None, shape: str | None = None) -> bool:
        return (colour is None or self.colour == colour) and (shape is None or self.shape == shape)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dist = [np.linalg.norm(rgb * 255 - np.array(palette[n])) for n in names]
    return names[int(np.argmin(dist))]


def classify(image: np.ndarray) -> Classified:
    """Background from the border, shape mask by distance to it, colour and shape by simple rules.

    Shape: the ideal circle, square or upright triangle drawn in the mask's bounding box that
    overlaps the mask best.
    """
    img = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    dist = np.linalg.norm(img - bg_rgb, axis=-1)
    mask = dist > 0.25
    if mask.sum() < img.shape[0] * img.shape[1] * 0.005:
        return Classified(None, None, background, mask)
    colour = _nearest(np.median(img[mask], axis=0), COLOURS)
    scores = {name: iou(mask, template) for name, template in _templates(mask).items()}
    shape = max(scores, key=scores.get)
    return Classified(colour, shape, background, mask)


def _templates(mask: np.ndarray) -> dict[str, np.ndarray]:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
    inside = (yy >= y0) & (yy <= y1) & (xx >= x0) & (xx <= x1)
    half_width = rx * (yy - y0) / max(y1 - y0, 1)  # apex at the top, base at the bottom
    return {
        "circle": ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1,
        "square": inside,
        "triangle": inside & (np.abs(xx - cx) <= half_width),
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
