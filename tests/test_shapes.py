"""The repo's shape classifier (demo_model/shapes.py), which every caption-accuracy and edit figure
rests on: exact on the rendered training domain, and not fooled by a sample's one-cell flaws."""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "demo_model"))
import shapes  # noqa: E402

CELL = shapes.IMAGE_SIZE // 16  # one latent cell of TinySD, in pixels


def test_reads_every_rendered_shape():
    rng = np.random.default_rng(2024)
    specs = [shapes.random_spec(rng) for _ in range(300)]
    wrong = [s for s in specs if (c := shapes.classify(shapes.render(s))).shape != s.shape
             or c.colour != s.colour or c.background != s.background]
    assert not wrong, wrong[:3]


def test_largest_component_is_four_connected():
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True
    mask[3, 1] = True  # touches the block: kept
    mask[4, 0] = True  # only diagonal to it: dropped
    mask[5, 5] = True
    expected = np.zeros((6, 6), bool)
    expected[1:3, 1:3] = True
    expected[3, 1] = True
    assert np.array_equal(shapes.largest_component(mask), expected)


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_one_cell_spur_and_speckle_do_not_change_the_shape(shape):
    """TinySD's misdrawn samples: a one-cell spur off a corner, a stray cell in the background.
    Either stretched the old bounding-box templates enough to read a square as a circle."""
    spec = shapes.ShapeSpec("blue", shape, "white", cx=64, cy=64, radius=32)
    img = shapes.render(spec)
    clean = shapes.classify(img)
    top = int(np.nonzero(clean.mask.any(axis=1))[0][0])
    left = int(np.nonzero(clean.mask[top])[0][0])
    img[top - 2 * CELL: top, left: left + CELL] = img[top, left]  # spur: two cells up from the top-left
    img[2 * CELL: 3 * CELL, 120 - CELL: 120] = img[top, left]  # speckle far away
    got = shapes.classify(img)
    assert clean.shape == shape
    assert got.shape == shape
    assert not got.mask[2 * CELL: 3 * CELL, 120 - CELL: 120].any()
