"""The pack's patches with other attention patches on the same model (ComfyUI's own PAG, which
replaces a self-attention layer in an extra model call, and the attention-multiply nodes, which
patch weights): injecting a sample's own attention into itself still reproduces that sample, and
the other patch still acts."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO, batch_noise_floor

sys.path.insert(0, str(REPO / "tools"))

STEPS = 8
PROMPT = "a yellow square"


@pytest.fixture(scope="module")
def tiny(comfy_nodes):
    import inproc
    return inproc.Tiny.load(steps=STEPS)


def pag(model):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    return PerturbedAttentionGuidance.execute(model, 3.0).result[0]


def multiply(model):
    from comfy_extras.nodes_attention_multiply import UNetCrossAttentionMultiply, UNetSelfAttentionMultiply
    model = UNetSelfAttentionMultiply.execute(model, 1.3, 0.8, 1.0, 1.0).result[0]
    return UNetCrossAttentionMultiply.execute(model, 1.0, 1.2, 0.9, 1.0).result[0]


def own_attention_round_trip(tiny, before, after):
    """(plain sample of before(model), source through the store, P2P target, FPE target), where
    `after` wraps each branch's patched model."""
    node = tiny.node
    base = before(tiny.model)
    pos = tiny.encode(PROMPT)
    plain = tiny.sample(after(base), pos, seed=4)
    m, src_pos, store = node("AttentionStore").execute(base, tiny.clip, PROMPT, 1.0, "all", 1.0, "model dtype").result
    source = tiny.sample(after(m), src_pos, seed=4)
    p2p, tgt_pos = node("P2PReplace").execute(base, tiny.clip, store, source, PROMPT, 1.0, "", 1.0, "all").result
    fpe = node("FPESelfAttnInject").execute(base, store, source, "all", 1.0).result[0]
    return (plain["samples"], source["samples"], tiny.sample(after(p2p), tgt_pos, seed=4)["samples"],
            tiny.sample(after(fpe), pos, seed=4)["samples"])


@pytest.mark.parametrize("before,after", [(pag, lambda m: m), (lambda m: m, pag), (multiply, lambda m: m)],
                         ids=["PAG before the pack", "PAG after the pack", "attention multiply before"])
def test_other_attention_patches_compose(tiny, before, after):
    plain, source, p2p, fpe = own_attention_round_trip(tiny, before, after)
    assert torch.equal(source, plain)
    torch.testing.assert_close(p2p, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(fpe, plain, rtol=0, atol=1e-5)
    # and the other patch acts: without it the sample differs. (PAG perturbs TinySD's 2x2 middle
    # block: a small effect, 3e-4, but 30x the tolerance above; a pack patch that shadowed PAG's
    # block patch made the source differ from the plain PAG sample by exactly that much.)
    untouched = tiny.sample(tiny.model, tiny.encode(PROMPT), seed=4)["samples"]
    assert (untouched - plain).abs().max() > 1e-4


@pytest.mark.parametrize("per_layer", [False, True], ids=["per-block patch", "per-layer patch"])
def test_another_packs_replace_patch_is_chained(tiny, per_layer):
    """A replace patch that another pack put on a block (ComfyUI key (block, id)) or on one layer
    (block, id, index) before ours still runs wherever we do not inject, and the source branch
    equals the sample with that patch alone."""
    import comfy.ldm.modules.attention as attention
    calls = []

    def halve_values(q, k, v, extra):
        calls.append(extra["block"])
        return attention.optimized_attention(q, k, 0.5 * v, extra["n_heads"])

    foreign = tiny.model.clone()
    key = ("output", 4, 0) if per_layer else ("output", 4)
    foreign.set_model_attn1_replace(halve_values, *key)
    pos = tiny.encode(PROMPT)
    alone = tiny.sample(foreign, pos, seed=4)["samples"]
    n_alone = len(calls)
    m, src_pos, store = tiny.node("AttentionStore").execute(foreign, tiny.clip, PROMPT, 1.0, "none", 1.0,
                                                            "model dtype").result
    source = tiny.sample(m, src_pos, seed=4)["samples"]
    assert len(calls) == 2 * n_alone > 0
    assert torch.equal(source, alone)
    assert (alone - tiny.sample(tiny.model, pos, seed=4)["samples"]).abs().max() > 1e-3


def test_pag_on_the_target_branch_only(tiny):
    """PAG evaluates the model a second time inside each evaluation of the target; that pass reads
    the source's step (before, it asked the store for a source evaluation that never was)."""
    node = tiny.node
    m, src_pos, store = node("AttentionStore").execute(tiny.model, tiny.clip, "a red circle", 1.0, "all", 1.0,
                                                       "model dtype").result
    source = tiny.sample(m, src_pos, seed=4)
    p2p, tgt_pos = node("P2PReplace").execute(tiny.model, tiny.clip, store, source, "a blue circle", 0.6, "", 0.8,
                                              "p2p_32").result
    without = tiny.sample(p2p, tgt_pos, seed=4)["samples"]
    with_pag = tiny.sample(pag(p2p), tgt_pos, seed=4)["samples"]
    assert (with_pag - without).abs().max() > 1e-4  # PAG acts on the edit (3e-4 on a plain TinySD sample)


def test_conditioning_combine_on_the_target(tiny):
    """ConditioningCombine of the target prompt with itself averages two equal predictions: the
    edit is the one of the prompt alone (each of the target's positives is edited)."""
    import nodes

    node = tiny.node
    m, src_pos, store = node("AttentionStore").execute(tiny.model, tiny.clip, "a red circle", 1.0, "all", 1.0,
                                                       "model dtype").result
    source = tiny.sample(m, src_pos, seed=4)
    p2p, tgt_pos = node("P2PReplace").execute(tiny.model, tiny.clip, store, source, "a blue circle", 0.8, "", 0.4,
                                              "p2p_16").result
    combined = nodes.ConditioningCombine().combine(tgt_pos, tgt_pos)[0]
    diff = (tiny.sample(p2p, combined, seed=4)["samples"] - tiny.sample(p2p, tgt_pos, seed=4)["samples"]).abs().max()
    # the two positives run in one batch of 3 rows instead of 2: they may differ by the float
    # rounding of that batch shape (10x the floor measured here, at least 1e-5; see conftest)
    assert float(diff) <= max(10 * batch_noise_floor(tiny, "euler", "a blue circle", rows=1, batches=(2, 3)), 1e-5)
