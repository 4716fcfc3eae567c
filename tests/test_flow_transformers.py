"""Flow transformers: Flux.1- and SD3.5-Medium-layout models (ComfyUI's Flux and SD3 model
configs at their real depth, random weights, reduced width; see tools/random_models.py) with
ComfyUI's own Flux/SD3 tokenizers. The pack's nodes address every joint-attention block, record
the image->text and image->image parts of each, and injecting a sample's own attention into
itself reproduces the plain sample, with euler and with a second-order sampler. Real images: the
flow ODE inverted (first and second order) and reconstructed exactly by direct inversion."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

STEPS = 3


@pytest.fixture(scope="module", params=["flux_small", "sd35_small"])
def dit(request, comfy_nodes):
    import random_models
    return (request.param, *random_models.build(request.param))


def sample(model, positive, negative, sampler="euler", cfg=3.0, seed=5, batch=1):
    import nodes
    latent = {"samples": torch.zeros(batch, 16, 16, 16)}  # 128 px: 8x8 image tokens
    return nodes.common_ksampler(model, seed, STEPS, cfg, sampler, "normal", positive, negative, latent)[0]["samples"]


def encode(clip, text):
    import nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]


def test_blocks_are_addressed_in_forward_order(dit, comfy_nodes):
    kind, model, clip = dit
    _, _, store = comfy_nodes["AttentionStore"].execute(model, clip, "a cat", 1.0, "all", 1.0, "model dtype").result
    layers = sorted(store.layers.values(), key=lambda l: l.index)
    if kind == "flux_small":  # Flux.1: 19 double-stream then 38 single-stream blocks
        assert [(l.block, l.block_id) for l in layers] == [("double", i) for i in range(19)] + [("single", i) for i in range(38)]
        for preset, blocks in (("double", {"double"}), ("single", {"single"})):
            _, _, s = comfy_nodes["AttentionStore"].execute(model, clip, "a cat", 1.0, preset, 1.0, "model dtype").result
            assert {store.layers[k].block for k in s.spec.self_layers} == blocks
    else:  # SD3.5 Medium: 24 joint blocks
        assert [(l.block, l.block_id) for l in layers] == [("joint", i) for i in range(24)]


def test_recorded_parts_have_the_token_counts_of_text_and_image(dit, comfy_nodes):
    kind, model, clip = dit
    m, pos, store = comfy_nodes["AttentionStore"].execute(model, clip, "a red cat.", 1.0, "all", 1.0, "model dtype").result
    sample(m, pos, encode(clip, ""))
    assert store.complete
    text = pos[0][0].shape[1]  # Flux: T5's 256 tokens; SD3 without T5: CLIP's 77
    n_blocks = len(store.layers)
    assert len({key for key, _ in store.self_qk}) == n_blocks and len({key for key, _ in store.cross_k}) == n_blocks
    # the text stream changes with the step: its keys are kept per step
    assert len({id(k) for k in store.cross_k.values()}) == n_blocks * STEPS
    heads = store.layer_hw[next(iter(store.layers))][0]
    for (key, _), (q, k) in store.self_qk.items():  # the image block: image queries over the whole sequence
        # kept in head layout (B, heads, tokens, D), 8x8 image tokens (16x16 latent, patch 2)
        assert q.shape[:3] == (1, heads, 64) and k.shape[:3] == (1, heads, text + 64), key
    for key, k in store.cross_k.items():
        assert k.shape[:3] == (1, heads, text), key
    # both parts read the same image queries: the store holds them once
    assert all(store.cross_q[(key, sk)] is q for (key, sk), (q, _) in store.self_qk.items())
    assert all(hw == (8, 8) for _, hw in store.layer_hw.values())
    # the word's positions are those of the tokens in the context
    cat = store.prompt.positions("cat")
    tokens = clip.tokenize("a red cat.")
    if kind == "flux_small":
        ids = [t for t, _ in tokens["t5xxl"][0]]
        assert [store.prompt.keys[p] for p in cat] == [ids[p] for p in cat] and len(ids) == text
    else:  # SD3's context is CLIP's 77 tokens, then T5's: the word is found in both parts
        ids = [t for t, _ in tokens["l"][0]] + [t for t, _ in tokens["t5xxl"][0]]
        assert cat == [3, 77 + 3] and [store.prompt.keys[p] for p in cat] == [ids[3], ids[80]]


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_the_store_owns_exactly_what_it_keeps(dit, comfy_nodes, cfg):
    """Every kept tensor owns exactly its data: no view of ComfyUI's queries and keys, of the whole
    sequence or of the unconditional half (cfg 3 batches both halves, cfg 1 runs the conditional
    one alone). The copies the adapter makes are kept as made, the rest copied."""
    _, model, clip = dit
    m, pos, store = comfy_nodes["AttentionStore"].execute(model, clip, "a red cat.", 1.0, "all", 1.0, "model dtype").result
    sample(m, pos, encode(clip, ""), cfg=cfg)
    kept = [t for pair in store.self_qk.values() for t in pair] + [*store.cross_k.values(), *store.map_k.values()]
    assert kept and all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in kept)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_injecting_own_attention_reproduces_the_plain_sample(dit, comfy_nodes, sampler):
    """Replace with target = source, and FPE on every block, each for all steps: the joint attention
    rebuilt from its parts equals the plain one to float rounding."""
    kind, model, clip = dit
    prompt = "a cat riding a bicycle"
    neg = encode(clip, "")
    m, pos, store = comfy_nodes["AttentionStore"].execute(model, clip, prompt, 1.0, "all", 1.0, "model dtype").result
    plain = sample(model, pos, neg, sampler)
    src = sample(m, pos, neg, sampler)
    assert torch.equal(src, plain)  # recording changes nothing
    edited_model, tgt_pos = comfy_nodes["P2PReplace"].execute(model, clip, store, {"samples": src}, prompt, 1.0, "", 1.0,
                                                              "all").result
    edited = sample(edited_model, tgt_pos, neg, sampler)
    fpe = comfy_nodes["FPESelfAttnInject"].execute(model, store, {"samples": src}, "all", 1.0).result[0]
    injected = sample(fpe, pos, neg, sampler)
    # float32 rounding through 57 blocks: the parts recombined differ from the one joint softmax in
    # the last bits (measured: 2e-5 at a sample scale of 28); 1e-4 of the scale leaves room for other CPUs
    scale = float(plain.abs().max())
    tol = 1e-4 * scale
    for out in (edited, injected):
        torch.testing.assert_close(out, plain, rtol=1e-4, atol=tol)
    # not vacuous: another prompt moves the sample far more than the tolerance, and the edit to it
    # is neither that prompt's plain sample nor the source
    other_prompt = "a dog riding a bicycle"
    other = sample(model, encode(clip, other_prompt), neg, sampler)
    assert (other - plain).abs().max() > 100 * tol
    swap_model, swap_pos = comfy_nodes["P2PReplace"].execute(model, clip, store, {"samples": src}, other_prompt, 1.0, "",
                                                             1.0, "all").result
    swapped = sample(swap_model, swap_pos, neg, sampler)
    # (random weights: the pooled text vector's modulation moves a sample more than its attention does)
    assert (swapped - other).abs().max() > 20 * tol and (swapped - plain).abs().max() > 20 * tol


def branch(comfy_nodes, model, positive, negative, inverted, sampler="euler", cfg=3.0):
    """SamplerCustomAdvanced from DDIMInvert's (LATENT, inversion, noise), as the flow workflows wire it."""
    guider = comfy_nodes["CFGGuider"].execute(model, positive, negative, cfg).result[0]
    sigmas = comfy_nodes["BasicScheduler"].execute(model, "normal", STEPS, 1.0).result[0]
    sampler = comfy_nodes["KSamplerSelect"].execute(sampler).result[0]
    return comfy_nodes["SamplerCustomAdvanced"].execute(inverted[2], guider, sampler, sigmas, inverted[0]).result[0]["samples"]


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_real_image_inversion_and_direct_reconstruction(dit, comfy_nodes, solver):
    """DDIMInvert walks the flow ODE back from an image latent to sigma 1 (the trajectory ends at the
    image), and the source branch re-anchored to it (direct inversion) gives the image back exactly,
    while the target branch (FPE, another prompt) samples an edit from the same inverted noise."""
    kind, model, clip = dit
    pos, neg = encode(clip, "a red cat"), encode(clip, "")
    image = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    inverted = comfy_nodes["DDIMInvert"].execute(model, pos, neg, {"samples": image}, STEPS, "normal", 1.0,
                                                 solver).result
    inv = inverted[1]
    assert inv.latents.shape[0] == STEPS + 1 and inv.solver == solver
    model_space = model.model.process_latent_in(image)
    assert torch.equal(inv.latents[-1], model_space)
    assert (inv.latents[0] - model_space).abs().max() > 0.5  # walked to the noise end
    m, src_pos, store = comfy_nodes["AttentionStore"].execute(model, clip, "a red cat", 1.0, "all", 1.0,
                                                              "model dtype", inversion=inv).result
    cfg = 1.0 if kind == "flux_small" else 3.0  # Flux.1-dev's guidance is distilled: cfg 1
    source = branch(comfy_nodes, m, src_pos, neg, inverted, cfg=cfg)
    # exact up to the latent format's scaling there and back (float32 rounding of a few ulps)
    assert (source - image).abs().max() < 1e-5 * float(image.abs().max())
    edited_model = comfy_nodes["FPESelfAttnInject"].execute(model, store, {"samples": source}, "all", 1.0).result[0]
    edited = branch(comfy_nodes, edited_model, encode(clip, "a dog riding a bicycle"), neg, inverted, cfg=cfg)
    assert (edited - image).abs().max() > 1e-2


def test_flow_branches_must_start_from_the_inverted_noise(dit, comfy_nodes):
    """KSamplerAdvanced with add_noise off starts a flow model at (1 - sigma) x latent, 0 at sigma 1:
    the branch is refused with the wiring that works."""
    import nodes
    kind, model, clip = dit
    pos, neg = encode(clip, "a red cat"), encode(clip, "")
    image = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    latent, inv, _ = comfy_nodes["DDIMInvert"].execute(model, pos, neg, {"samples": image}, STEPS, "normal", 1.0).result
    m, src_pos, _ = comfy_nodes["AttentionStore"].execute(model, clip, "a red cat", 1.0, "all", 1.0, "model dtype",
                                                          inversion=inv).result
    with pytest.raises(Exception, match="flow model.*SamplerCustomAdvanced, noise = DDIMInvert's noise"):
        nodes.common_ksampler(m, 0, STEPS, 3.0, "euler", "normal", src_pos, neg, latent, disable_noise=True)


def test_inversions_that_need_guidance_are_refused_on_distilled_guidance(comfy_nodes):
    """Flux.1-dev's guidance is an input (sampled at cfg 1): there is no negative branch for null-text
    or negative-prompt inversion to act on, and DDIMInvert inverts at cfg 1."""
    import random_models
    model, clip = random_models.build("flux_small")
    pos = encode(clip, "a cat")
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    with pytest.raises(ValueError, match="DDIMInvert: input 'cfg': .*distilled guidance.*invert at cfg 1"):
        comfy_nodes["DDIMInvert"].execute(model, pos, pos, latent, 2, "normal", 3.5)
    inverted = comfy_nodes["DDIMInvert"].execute(model, pos, pos, latent, 2, "normal", 1.0).result
    with pytest.raises(ValueError, match="NullTextInversion: input 'model': .*distilled guidance.*direct inversion"):
        comfy_nodes["NullTextInversion"].execute(model, inverted[1], pos, pos, 3.5, 2, 0.01, 1e-5)
    m, src_pos, _ = comfy_nodes["AttentionStore"].execute(model, clip, "a cat", 1.0, "all", 1.0, "model dtype",
                                                          inversion=inverted[1]).result
    with pytest.raises(Exception, match="guidance is distilled.*cfg 1, not 3.5"):  # negative-prompt inversion
        guider = comfy_nodes["CFGGuider"].execute(m, src_pos, pos, 3.5).result[0]
        sigmas = comfy_nodes["BasicScheduler"].execute(model, "normal", 2, 1.0).result[0]
        sampler = comfy_nodes["KSamplerSelect"].execute("euler").result[0]
        comfy_nodes["SamplerCustomAdvanced"].execute(inverted[2], guider, sampler, sigmas, inverted[0])


def test_local_blend_and_map_preview_on_joint_attention(dit, comfy_nodes):
    """Local blend reads the joint layers' image->text maps: with a MASK alone ('mask only') the
    edit changes the masked half and leaves the other half the source's; the preview draws the
    word's image->text map at the image-token grid."""
    kind, model, clip = dit
    neg = encode(clip, "")
    m, pos, store = comfy_nodes["AttentionStore"].execute(model, clip, "a red cat", 1.0, "all", 1.0, "model dtype").result
    src = sample(m, pos, neg)
    em, tpos = comfy_nodes["P2PReplace"].execute(model, clip, store, {"samples": src}, "a blue cat", 0.5, "", 0.0,
                                                 "none").result
    region = torch.zeros(1, 128, 128)
    region[:, :, 64:] = 1.0  # the right half may change
    bm = comfy_nodes["P2PLocalBlend"].execute(em, "red", "blue", 0.3, 0.0, "", 1, region, "mask only").result[0]
    out = sample(bm, tpos, neg)
    left, right = (out - src)[..., :8], (out - src)[..., 8:]
    assert left.abs().max() < 1e-5 * float(src.abs().max()) < right.abs().max()
    image = torch.rand(1, 128, 128, 3)
    heat = comfy_nodes["AttentionMapPreview"].execute(store, {"samples": src}, image, "cat", "all", 0.0, 1.0, 0.0).result[0]
    assert heat.shape[1:3] == (128, 128) and float(heat.std()) > 0
