"""SDXL: an SDXL-layout UNet (ComfyUI's SDXL model config, random weights, a fifth of the width; see
tools/random_models.py) and ComfyUI's SDXL tokenizer with two small encoders. The patches attach to
all 70 attention layers under ComfyUI's keys, recorded maps have the shapes of their levels, and
injecting a sample's own attention into itself changes nothing."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

STEPS = 3


@pytest.fixture(scope="module")
def sdxl(comfy_nodes):
    import random_models
    return random_models.build("sdxl_small")


def sample(model, positive, negative, seed=5, batch=1, size=128):
    import nodes
    latent = nodes.EmptyLatentImage().generate(size, size, batch)[0]
    return nodes.common_ksampler(model, seed, STEPS, 5.0, "euler", "normal", positive, negative, latent)[0]


def encode(clip, text):
    import nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]


def test_sdxl_layers_keys_and_presets(sdxl, comfy_nodes):
    model, _ = sdxl
    store_model, _, store = comfy_nodes["AttentionStore"].execute(model, sdxl[1], "a cat", 1.0, "all", 1.0,
                                                                  "model dtype").result
    layers = list(store.layers.values())
    assert len(layers) == 70  # SDXL: input 4,5 (2 each), input 7,8 (10 each), middle 10, output 0-5 (10/2 each)
    per_block = {}
    for l in layers:
        per_block[(l.block, l.block_id)] = per_block.get((l.block, l.block_id), 0) + 1
    assert per_block == {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10,
                         ("output", 0): 10, ("output", 1): 10, ("output", 2): 10, ("output", 3): 2,
                         ("output", 4): 2, ("output", 5): 2}
    patched = store_model.model_options["transformer_options"]["patches_replace"]
    # one patch per block (ComfyUI's key (block, id)), dispatching to each transformer index
    dispatched = {(*block, idx): p.layer.key for block, bp in patched["attn1"].items() for idx, p in bp.layers.items()}
    assert set(patched["attn1"]) == set(patched["attn2"]) == set(per_block)
    assert dispatched == {l.key: l.key for l in layers}
    assert {l.level for l in layers} == {1, 2}  # SDXL has no attention at the full latent resolution


def test_sdxl_fpe_presets(sdxl, comfy_nodes):
    """fpe (FPE's code: maps of <= 32² positions at 512 px, i.e. level >= 1) covers all of SDXL's
    attention, which starts at level 1; fpe_4_14 is the paper's band scaled to 70 layers."""
    model, clip = sdxl
    for preset, expected in (("fpe", list(range(70))), ("fpe_4_14", list(range(18, 62)))):  # ceil(4*70/16)..floor(14*70/16)
        _, _, store = comfy_nodes["AttentionStore"].execute(model, clip, "a cat", 1.0, preset, 1.0, "model dtype").result
        assert sorted(store.layers[k].index for k in store.spec.self_layers) == expected, preset


def test_sdxl_token_positions_follow_both_encoders(sdxl, comfy_nodes):
    """SDXL's CLIP-L and bigG share the BPE: a word's positions are the same in both; the pooled
    output and the 2048-wide context come from ComfyUI's own SDXL encoding."""
    model, clip = sdxl
    _, positive, store = comfy_nodes["AttentionStore"].execute(model, clip, "a photograph of an astronaut", 1.0,
                                                               "none", 1.0, "model dtype").result
    assert positive[0][0].shape == (1, 77, 2048) and positive[0][1]["pooled_output"].shape == (1, 1280)
    tokens = clip.tokenize("a photograph of an astronaut")
    ids_l = [t for t, _ in tokens["l"][0]]
    ids_g = [t for t, _ in tokens["g"][0]]
    end = store.prompt.tails[0][0]
    assert end == 6 and ids_l[:end + 1] == ids_g[:end + 1] == list(store.prompt.keys[:end + 1])
    astronaut = store.prompt.positions("astronaut")
    assert astronaut == [5] and [store.prompt.keys[p] for p in astronaut] == [ids_l[5]]


def test_sdxl_recorded_maps_have_the_shapes_of_their_levels(sdxl, comfy_nodes):
    model, clip = sdxl
    m, pos, store = comfy_nodes["AttentionStore"].execute(model, clip, "a cat", 1.0, "all", 1.0,
                                                          "model dtype").result
    sample(m, pos, encode(clip, ""), batch=2)
    assert store.complete
    for (key, _), (q, k) in store.self_qk.items():
        level = store.layers[key].level
        positions = (16 // 2**level) ** 2  # latent 16x16 at 128 px
        assert q.shape[:2] == k.shape[:2] == (2, positions), key
    heads, hw = store.layer_hw[("middle", 0, 9)]
    assert hw == (4, 4) and heads == 4  # 256 channels / 64 per head
    for key_sk, q in store.cross_q.items():
        assert store.cross_k[key_sk].shape[:2] == (2, 77)
    # a UNet's text keys are the same at every step: one tensor per layer, shared by the steps
    assert len({id(k) for k in store.cross_k.values()}) == len({key for key, _ in store.cross_k})


def test_sdxl_injecting_own_attention_reproduces_the_plain_sample(sdxl, comfy_nodes):
    model, clip = sdxl
    prompt = "a cat riding a bicycle"
    neg = encode(clip, "")
    m, pos, store = comfy_nodes["AttentionStore"].execute(model, clip, prompt, 1.0, "all", 1.0, "model dtype").result
    plain = sample(model, pos, neg)
    src = sample(m, pos, neg)
    assert torch.equal(src["samples"], plain["samples"])
    edited_model, tgt_pos = comfy_nodes["P2PReplace"].execute(model, clip, store, src, prompt, 1.0, "", 1.0,
                                                              "all").result
    torch.testing.assert_close(sample(edited_model, tgt_pos, neg)["samples"], plain["samples"], rtol=1e-4, atol=1e-3)
    fpe = comfy_nodes["FPESelfAttnInject"].execute(model, store, src, "all", 1.0).result[0]
    torch.testing.assert_close(sample(fpe, pos, neg)["samples"], plain["samples"], rtol=1e-4, atol=1e-3)
    # the comparison is not vacuous: another prompt without injection moves the sample far more
    other = sample(model, encode(clip, "a dog riding a car"), neg)["samples"]
    assert (other - plain["samples"]).abs().max() > 100 * (1e-3 + 1e-4 * plain["samples"].abs().max())
