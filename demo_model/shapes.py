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


def random_spec(rng: np.random.Generator, size: int = IMAGE_SIZE, shape_p: tuple[float, ...] | None = None) -> ShapeSpec:
    """`shape_p`: probabilities of SHAPES (default uniform, drawn as before so old data seeds repeat)."""
    radius = rng.uniform(0.21, 0.36) * size
    margin = radius + size / 32
    return ShapeSpec(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES) if shape_p is None else rng.choice(SHAPES, p=shape_p)),
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

    The mask is the largest 4-connected region: a stray off-background cell elsewhere (a sample's
    speckle) is not part of the shape.

    Shape: the ideal circle, square or upright triangle, placed by the mask's moments, that overlaps
    the mask best.
    """
    img = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    dist = np.linalg.norm(img - bg_rgb, axis=-1)
    mask = largest_component(dist > 0.25)
    if mask.sum() < img.shape[0] * img.shape[1] * 0.005:
        return Classified(None, None, background, mask)
    colour = _nearest(np.median(img[mask], axis=0), COLOURS)
    scores = {name: iou(mask, template) for name, template in _templates(mask).items()}
    shape = max(scores, key=scores.get)
    return Classified(colour, shape, background, mask)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (label propagation, numpy only)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        grown = labels.copy()
        grown[1:] = np.maximum(grown[1:], labels[:-1])
        grown[:-1] = np.maximum(grown[:-1], labels[1:])
        grown[:, 1:] = np.maximum(grown[:, 1:], labels[:, :-1])
        grown[:, :-1] = np.maximum(grown[:, :-1], labels[:, 1:])
        grown *= mask
        if np.array_equal(grown, labels):
            break
        labels = grown
    if not mask.any():
        return mask
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _templates(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Each candidate placed by the mask's moments (centre and spread), not its bounding box, so that
    a one-cell spur at a corner barely moves it. Uniform shapes: an ellipse of semi-axis a has
    variance a²/4, a rectangle of half-width h has h²/3, an upright triangle of base W and height H
    has W²/24 across and H²/18 down, its centroid a third of H above the base."""
    ys, xs = np.nonzero(mask)
    ys, xs = ys + 0.5, xs + 0.5
    cy, cx, sy, sx = ys.mean(), xs.mean(), max(ys.std(), 0.5), max(xs.std(), 0.5)
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    height, width = np.sqrt(18) * sy, np.sqrt(24) * sx
    apex = cy - 2 * height / 3
    return {
        "circle": ((yy - cy) / (2 * sy)) ** 2 + ((xx - cx) / (2 * sx)) ** 2 <= 1,
        "square": (np.abs(yy - cy) <= np.sqrt(3) * sy) & (np.abs(xx - cx) <= np.sqrt(3) * sx),
        "triangle": (yy >= apex) & (yy <= apex + height) & (np.abs(xx - cx) <= width / 2 * (yy - apex) / height),
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
