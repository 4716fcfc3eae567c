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


def test_the_shape_words_map_sits_on_the_shape(tiny, source):
    import shapes
    store, latent, image = source
    overlay, mask, heat = tiny.node("AttentionMapPreview").execute(store, latent, image, "circle", "all", 0.0, 1.0,
                                                                   0.5).result
    assert overlay.shape == image.shape and heat.shape == image.shape and mask.shape == image.shape[:3]
    assert float(mask.min()) >= 0 and float(mask.max()) <= 1
    ratios, ious = [], []
    for img, m, h in zip(image.numpy(), mask.numpy(), heat.numpy()):
        shape = shapes.classify(img).mask
        inside, outside = h[shape].mean(), h[~shape].mean()
        ratios.append(inside / max(outside, 1e-6))
        ious.append(shapes.iou(shape, m > 0.5))
    assert np.median(ratios) > 1.5, ratios
    assert np.mean(ious) > 0.3, ious


def test_words_and_steps_select_the_map(tiny, source):
    store, latent, image = source
    node = tiny.node("AttentionMapPreview")
    circle = node.execute(store, latent, image, "circle", "all", 0.0, 1.0, 0.5).result[2]
    gray = node.execute(store, latent, image, "gray", "all", 0.0, 1.0, 0.5).result[2]
    early = node.execute(store, latent, image, "circle", "all", 0.0, 0.3, 0.5).result[2]
    assert (circle - gray).abs().mean() > 0.02 and (circle - early).abs().mean() > 0.005
    with pytest.raises(Exception, match="AttentionMapPreview: input 'words'.*square"):
        node.execute(store, latent, image, "square", "all", 0.0, 1.0, 0.5)
