"""The edit nodes on TinySD through ComfyUI's own samplers (in-process): exactness where the
maths says exact, and the papers' effects where the model can show them."""
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


def store(tiny, prompt, layers="all", cross=1.0):
    return tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, cross, layers, 1.0, "model dtype").result


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpmpp_2m"])
def test_injecting_own_maps_reproduces_plain_sample(tiny, sampler):
    """source == target, every layer's self and cross maps injected for every step: same latent."""
    prompt = "a green triangle"
    src_model, pos, st = store(tiny, prompt)
    plain = tiny.sample(tiny.model, pos, seed=3, batch=2, sampler=sampler)
    src = tiny.sample(src_model, pos, seed=3, batch=2, sampler=sampler)
    assert torch.equal(src["samples"], plain["samples"]), "recording changed the source sample"
    edited_model, tgt_pos = tiny.node("P2PReplace").execute(tiny.model, tiny.clip, st, src, prompt, 1.0, "", 1.0,
                                                            "all").result
    edited = tiny.sample(edited_model, tgt_pos, seed=3, batch=2, sampler=sampler)
    torch.testing.assert_close(edited["samples"], plain["samples"], rtol=0, atol=1e-5)
    fpe_model = tiny.node("FPESelfAttnInject").execute(tiny.model, st, src, "all", 1.0).result[0]
    torch.testing.assert_close(tiny.sample(fpe_model, pos, seed=3, batch=2, sampler=sampler)["samples"],
                               plain["samples"], rtol=0, atol=1e-5)


def test_injection_changes_the_target(tiny):
    """Not a no-op: the edited sample differs from the seed-only target and from the source."""
    src_model, pos, st = store(tiny, "a red circle")
    src = tiny.sample(src_model, pos, seed=4)
    edited_model, tgt_pos = tiny.node("P2PReplace").execute(tiny.model, tiny.clip, st, src, "a blue circle", 0.8, "",
                                                            0.4, "p2p_16").result
    edited = tiny.sample(edited_model, tgt_pos, seed=4)["samples"]
    seed_only = tiny.sample(tiny.model, tgt_pos, seed=4)["samples"]
    assert (edited - seed_only).abs().max() > 1e-2
    assert (edited - src["samples"]).abs().max() > 1e-2
