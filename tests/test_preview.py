"""AttentionMapPreview on TinySD (in-process): the shape word's map sits on the shape, the MASK
is that region, and the overlay is the image with the map over it."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))


@pytest.fixture(scope="module")
def tiny(comfy_nodes):
    import inproc
    return inproc.Tiny.load(steps=12)


@pytest.fixture(scope="module")
def source(tiny):
    prompt = "a red circle on a gray background"
    m, pos, store = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 1.0, "none", 1.0,
                                                        "model dtype").result
    latent = tiny.sample(m, pos, seed=31, batch=6)
    with torch.no_grad():
        image = tiny.vae.decode(latent["samples"]).float()
    return store, latent, image


def inside_outside(image, maps) -> list[float]:
    import shapes
    out = []
    for img, h in zip(image.numpy(), maps.numpy()):
        shape = shapes.classify(img).mask
        out.append(float(h[shape].mean() / max(h[~shape].mean(), 1e-6)))
    return out


def test_the_colour_word_sits_on_the_shape_and_the_background_word_off_it(tiny, source):
    """At TinySD's 8x8 layers (level 1) 'red' attends inside the shape (tools/eval_attention.py) and
    'background' outside it; the MASK of 'red' is the shape's region."""
    import shapes
    store, latent, image = source
    node = tiny.node("AttentionMapPreview")
    overlay, mask, heat = node.execute(store, latent, image, "red", "level 1", 0.0, 1.0, 0.5).result
    assert overlay.shape == image.shape and heat.shape == image.shape and mask.shape == image.shape[:3]
    assert set(np.unique(mask.numpy())) <= {0.0, 1.0}
    heat_red = heat.mean(-1)
    heat_bg = node.execute(store, latent, image, "background", "level 1", 0.0, 1.0, 0.5).result[2].mean(-1)
    assert np.median(inside_outside(image, heat_red)) > 1.5
    assert np.median(inside_outside(image, heat_bg)) < 0.8
    ious = [shapes.iou(shapes.classify(img).mask, m > 0.5) for img, m in zip(image.numpy(), mask.numpy())]
    assert np.mean(ious) > 0.3, ious


def test_words_and_steps_select_the_map(tiny, source):
    store, latent, image = source
    node = tiny.node("AttentionMapPreview")
    circle = node.execute(store, latent, image, "circle", "all", 0.0, 1.0, 0.5).result[2]
    assert (node.execute(store, latent, image, "circle", "level 1", 0.0, 1.0, 0.5).result[2] - circle).abs().mean() > 0.005
    gray = node.execute(store, latent, image, "gray", "all", 0.0, 1.0, 0.5).result[2]
    early = node.execute(store, latent, image, "circle", "all", 0.0, 0.3, 0.5).result[2]
    assert (circle - gray).abs().mean() > 0.02 and (circle - early).abs().mean() > 0.005
    with pytest.raises(Exception, match="AttentionMapPreview: input 'words'.*square"):
        node.execute(store, latent, image, "square", "all", 0.0, 1.0, 0.5)
