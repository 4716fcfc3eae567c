"""Real-image edits keep what the prompts do not name (tools/eval_real.py has the full table), and
an inverted image's branches refuse the samplers that cannot retrace its inversion."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))


@pytest.fixture(scope="module")
def tiny(comfy_nodes):
    import graphs
    import inproc
    d = graphs.REAL_IMAGE
    return inproc.Tiny.load(steps=d["steps"], cfg=d["cfg"], sampler=d["sampler_name"], scheduler=d["scheduler"])


@pytest.fixture(scope="module")
def defaults(tiny):
    """The defaults (direct inversion, no target correction) on 6 rendered red circles, two each on
    white, black and gray, edited to 'a blue circle' by FPE and by P2P + local blend."""
    import edits
    import eval_real
    return eval_real.run(tiny, edits.CASES[0], seed=16, batch=6, inversions=("direct without target correction",),
                         methods=("FPE", "P2P + local blend"))


def test_p2p_with_local_blend_keeps_every_background(defaults):
    """P2P + local blend, the real-image P2P default: background PSNR outside both shapes, against the
    image, >= 25 dB (the bar of docs/real-images.md) on every one of the 6 images (the table's
    per-background medians are 33-36 dB); the colour swap reads as the target on all of them."""
    import eval_real
    rows = defaults[("direct without target correction", "P2P + local blend")]
    assert eval_real.summary(rows)["success"] == 1.0, rows
    assert min(r["psnr_bg"] for r in rows) >= 25.0, rows


def test_fpe_edits_inverted_images_and_keeps_a_black_background(defaults):
    """FPE under the defaults: the colour swap reads as the target on at least 5 of 6 images and both
    black backgrounds stay (>= 25 dB; the table's median 30 dB). White and gray are not asserted: at
    cfg 5 their medians are 19 and 23 dB (docs/real-images.md)."""
    import eval_real
    rows = defaults[("direct without target correction", "FPE")]
    assert eval_real.summary(rows)["success"] >= 5 / 6, rows
    assert min(r["psnr_bg"] for r in rows if r["background"] == "black") >= 25.0, rows


def test_target_correction_is_off_by_default(comfy_nodes):
    import graphs
    schema = comfy_nodes["AttentionStore"].define_schema()
    default = {i.id: i.default for i in schema.inputs if hasattr(i, "default")}
    assert default["correct_target"] is False and graphs.REAL_IMAGE["correct_target"] is False


@pytest.fixture(scope="module")
def inverted(tiny):
    import eval_inversion
    images, captions = eval_inversion.synthetic_images(1, seed=3)
    latent = tiny.encode_images(images)
    noise, inv = tiny.node("DDIMInvert").execute(tiny.model, tiny.encode(captions[0]), tiny.encode(""), latent,
                                                 8, "normal", 1.0).result[:2]
    return captions[0], noise, inv


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "euler_ancestral", "uni_pc", "dpmpp_2m_sde"])
def test_samplers_that_cannot_retrace_an_inversion_are_refused(tiny, inverted, sampler):
    prompt, noise, inv = inverted
    m, pos, _ = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 1.0, "none", 1.0, "model dtype",
                                                    inversion=inv).result
    with pytest.raises(Exception, match=f"sampler euler or ddim .*not '{sampler.replace('uni_pc', 'unipc')}'"):
        tiny.sample_from(m, pos, noise, steps=8, sampler=sampler)


def test_edit_branch_refuses_another_sampler_and_ddim_is_accepted(tiny, inverted):
    prompt, noise, inv = inverted
    m, pos, store = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 1.0, "fpe", 1.0,
                                                        "model dtype", inversion=inv).result
    source = tiny.sample_from(m, pos, noise, steps=8, sampler="ddim")  # ComfyUI's ddim is euler: accepted
    edited = tiny.node("FPESelfAttnInject").execute(tiny.model, store, source, "fpe", 1.0).result[0]
    with pytest.raises(Exception, match="FPESelfAttnInject: a real-image edit .* not 'dpmpp_2m'"):
        tiny.sample_from(edited, pos, noise, steps=8, sampler="dpmpp_2m")
    # the same edit with euler runs, and the source (ddim) reconstructed the image exactly (tolerance:
    # float32 round-off of 8 re-anchored steps, as in test_inversion's 1e-5)
    assert np.isfinite(tiny.sample_from(edited, pos, noise, steps=8)["samples"].numpy()).all()
    assert float((source["samples"] * tiny.model.model.latent_format.scale_factor - inv.latents[-1]).abs().max()) < 1e-5
