"""Real images on TinySD through ComfyUI's own sampler (in-process): DDIMInvert, reconstruction by
direct, negative-prompt and null-text inversion, a real-image FPE edit, and the errors a wrongly
wired real-image graph gets."""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

STEPS = 12


@pytest.fixture(scope="module")
def tiny(comfy_nodes):
    import inproc
    return inproc.Tiny.load(steps=STEPS)


@pytest.fixture(scope="module")
def image(tiny):
    """Two rendered shapes (not model samples) as VAEEncode gives them, their caption, the inversion."""
    import eval_inversion
    images, captions = eval_inversion.synthetic_images(2, seed=5)
    latent = tiny.encode_images(images)
    prompt = captions[0]
    noise, inv = tiny.node("DDIMInvert").execute(tiny.model, tiny.encode(prompt), tiny.encode(""), latent, STEPS,
                                                 "normal", 1.0).result[:2]
    return latent, prompt, noise, inv


def psnr(tiny, a, b) -> float:
    import eval_inversion
    return eval_inversion.psnr(tiny.images(a), tiny.images(b))


def test_inversion_trajectory_runs_from_the_noise_to_the_image(tiny, image):
    latent, _, noise, inv = image
    scale = tiny.model.model.latent_format.scale_factor
    assert inv.latents.shape == (STEPS + 1, *latent["samples"].shape)
    torch.testing.assert_close(inv.latents[-1], latent["samples"] * scale)
    torch.testing.assert_close(inv.latents[0], noise["samples"] * scale)
    assert float(inv.sigmas[0]) == pytest.approx(14.6146, rel=1e-3) and float(inv.sigmas[-1]) == 0.0
    # the noise is noise-like: about unit variance per sigma_max, not the image
    assert 0.7 < float(inv.latents[0].std() / inv.sigmas[0]) < 1.3


def test_direct_inversion_reconstructs_exactly(tiny, image):
    latent, prompt, noise, inv = image
    m, pos, store = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 1.0, "fpe", 1.0, "model dtype",
                                                        inversion=inv).result
    out = tiny.sample_from(m, pos, noise, cfg=5.0)
    torch.testing.assert_close(out["samples"], latent["samples"], rtol=0, atol=1e-5)
    assert psnr(tiny, out, latent) >= 30.0
    assert len(store.corrections) == STEPS  # one correction per step, for the target branch


def test_null_text_and_negative_prompt_beat_plain_ddim_under_guidance(tiny, image):
    """At cfg 5, plain DDIM inversion drifts; null-text inversion optimises the negative so it does not."""
    latent, prompt, noise, inv = image
    pos, neg = tiny.encode(prompt), tiny.encode("")
    ddim = psnr(tiny, tiny.sample_from(tiny.model, pos, noise, neg, cfg=5.0), latent)
    negative_prompt = psnr(tiny, tiny.sample_from(tiny.model, pos, noise, pos, cfg=5.0), latent)
    null = tiny.node("NullTextInversion").execute(tiny.model, inv, pos, neg, 5.0, 10, 0.1, 1e-5).result[0]
    assert len(null) == STEPS
    null_text = psnr(tiny, tiny.sample_from(tiny.model, pos, noise, null, cfg=5.0), latent)
    assert negative_prompt > ddim + 3.0, (ddim, negative_prompt)
    assert null_text > ddim + 10.0 and null_text >= 25.0, (ddim, null_text)


def test_fpe_edits_an_inverted_image_keeping_its_layout(tiny):
    import edits
    case = edits.CASES[0]  # a red circle -> a blue circle
    rows = edits.run_real_case(dataclasses.replace(tiny, steps=STEPS), case, seed=11, batch=4)
    seed_iou = np.mean([r["iou"] for r in rows["seed only"]])
    fpe_iou = np.mean([r["iou"] for r in rows["FPE"]])
    assert np.mean([r["success"] for r in rows["FPE"]]) >= 0.75
    assert fpe_iou > seed_iou + 0.07, (seed_iou, fpe_iou)  # measured 0.55 -> 0.69 here


def test_branch_with_added_noise_is_refused(tiny, image):
    _, prompt, noise, inv = image
    m, pos, _ = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 1.0, "none", 1.0, "model dtype",
                                                    inversion=inv).result
    import nodes
    with pytest.raises(Exception, match="add_noise 'disable'"):
        nodes.common_ksampler(m, 0, STEPS, 5.0, "euler", "normal", pos, tiny.encode(""), noise)
    with pytest.raises(Exception, match="differ from DDIMInvert"):
        tiny.sample_from(m, pos, noise, steps=STEPS + 1)


def test_trajectory_of_another_image_size_is_refused(tiny, image):
    _, prompt, noise, inv = image
    m, pos, _ = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 1.0, "none", 1.0, "model dtype",
                                                    inversion=inv).result
    bigger = {"samples": torch.zeros(2, 4, 24, 24)}
    with pytest.raises(Exception, match="another image size"):
        tiny.sample_from(m, pos, bigger)


def test_invert_refuses_a_patched_model(tiny, image):
    latent, prompt, _, _ = image
    m, pos, _ = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 1.0, "none", 1.0,
                                                    "model dtype").result
    with pytest.raises(Exception, match="DDIMInvert: input 'model'"):
        tiny.node("DDIMInvert").execute(m, pos, tiny.encode(""), latent, STEPS, "normal", 1.0)


def test_store_and_inversion_of_different_prompts_are_refused(tiny, image):
    """The store's source prompt must be the one the image was inverted with (before, the mismatch
    surfaced later as a word error of P2PLocalBlend)."""
    _, prompt, _, inv = image
    store = tiny.node("AttentionStore")
    store.execute(tiny.model, tiny.clip, prompt, 1.0, "none", 1.0, "model dtype", True, inv)  # the same prompt: fine
    with pytest.raises(Exception, match=r"AttentionStore: input 'source_prompt': differs from the prompt DDIMInvert"):
        store.execute(tiny.model, tiny.clip, "a purple hexagon", 1.0, "none", 1.0, "model dtype", True, inv)
