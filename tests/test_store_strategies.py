"""AttentionStore's two strategies on TinySD through ComfyUI's samplers (in-process): "recompute"
keeps no attention, only latent-sized inputs, and gives the same edits as "keep"; "auto" picks
by the memory budget, also when a run outgrows it half-way."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO, batch_noise_floor

sys.path.insert(0, str(REPO / "tools"))

SOURCE, TARGET = "a red circle", "a blue circle"


@pytest.fixture(scope="module")
def tiny(comfy_nodes):
    import inproc
    return inproc.Tiny.load(steps=10)


def store(tiny, strategy, budget_mb=2048, prompt=SOURCE, layers="all"):
    return tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 1.0, layers, 1.0, "model dtype", True,
                                               None, strategy, budget_mb).result


def assert_same_up_to_batch_rounding(tiny, sampler: str, got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Recompute runs the source's rows in the target's batch, keep does not: the paths are the
    same mathematics, so they may differ by batch-shape rounding only. Bound: 10x the measured
    floor (the edit composes several batched attention calls per layer where a plain sample has
    one), and at least 1e-5 (the sum of a few float32 roundings of latents of magnitude ~3 over
    10-20 steps, where a machine's floor happens to be 0)."""
    bound = max(10 * batch_noise_floor(tiny, sampler, TARGET), 1e-5)
    diff = float((got - expected).abs().max())
    assert diff <= bound, f"{what}: {diff:.3g} > {bound:.3g}"


def edits(tiny, st, src, sampler, only=None, seed=3):
    """P2P replace (+ self-attention), + local blend, + re-weight, and FPE: the target latents."""
    node = tiny.node
    p2p, pos = node("P2PReplace").execute(tiny.model, tiny.clip, st, src, TARGET, 0.8, "", 0.4, "p2p_16").result
    blend = node("P2PLocalBlend").execute(p2p, "circle", "circle", 0.3, 0.2, "").result[0]
    reweight = node("P2PReweight").execute(p2p, tiny.clip, st, src, TARGET, "blue=1.5", 0.8).result[0]
    fpe = node("FPESelfAttnInject").execute(tiny.model, st, src, "fpe", 1.0).result[0]
    return {name: tiny.sample(m, pos, seed=seed, batch=2, sampler=sampler)["samples"]
            for name, m in (("replace", p2p), ("blend", blend), ("reweight", reweight), ("fpe", fpe))
            if only is None or name == only}


@pytest.mark.parametrize("sampler", ["euler_ancestral", "heun", "dpmpp_sde"])  # euler: the real-image test below
def test_recompute_gives_the_edits_that_keep_gives(tiny, sampler):
    results, stores = {}, {}
    for strategy in ("keep", "recompute"):
        m, pos, st = store(tiny, strategy)
        src = tiny.sample(m, pos, seed=3, batch=2, sampler=sampler)
        results[strategy], stores[strategy] = edits(tiny, st, src, sampler), st
        assert st.mode == strategy
    for name, kept in results["keep"].items():
        assert_same_up_to_batch_rounding(tiny, sampler, results["recompute"][name], kept, name)
    seed_only = tiny.sample(tiny.model, tiny.encode(TARGET), seed=3, batch=2, sampler=sampler)["samples"]
    assert (results["recompute"]["replace"] - seed_only).abs().max() > 1e-2  # the injection did something
    keep, recompute = stores["keep"], stores["recompute"]
    assert recompute.attention_nbytes() == 0 and not recompute.cross_q and not recompute.self_qk
    assert recompute.nbytes() < 0.06 * keep.nbytes(), (recompute.nbytes(), keep.nbytes())
    assert not keep.inputs and not keep.conds  # keep drops the inputs it no longer needs


def test_recompute_store_grows_only_by_latent_sized_inputs(tiny):
    sizes = {}
    for steps in (5, 20):
        m, pos, st = store(tiny, "recompute")
        tiny.sample(m, pos, seed=1, steps=steps)
        sizes[steps] = st.nbytes()
    latent = 4 * 16 * 16 * 4  # one latent, fp32
    per_step = (sizes[20] - sizes[5]) / 15
    # per step: the input of cond and uncond, the denoised latent, the 16x16 token maps of the level-0 layers
    assert per_step < 2 * latent + latent + 3 * 4 * 16 * 16 * 77, per_step
    m, pos, st = store(tiny, "keep")
    tiny.sample(m, pos, seed=1, steps=20)
    assert sizes[20] < 0.05 * st.nbytes()


def test_own_maps_through_recompute_reproduce_the_plain_sample(tiny):
    m, pos, st = store(tiny, "recompute", prompt="a green triangle")
    src = tiny.sample(m, pos, seed=5, batch=2, sampler="dpmpp_2m")
    plain = tiny.sample(tiny.model, pos, seed=5, batch=2, sampler="dpmpp_2m")["samples"]
    em, tpos = tiny.node("P2PReplace").execute(tiny.model, tiny.clip, st, src, "a green triangle", 1.0, "", 1.0,
                                               "all").result
    assert_same_up_to_batch_rounding(tiny, "dpmpp_2m", tiny.sample(em, tpos, seed=5, batch=2, sampler="dpmpp_2m")["samples"],
                                     plain, "own maps")


def test_auto_keeps_within_the_budget_and_recomputes_above_it(tiny):
    m, pos, st = store(tiny, "auto", budget_mb=1 << 16)
    src = tiny.sample(m, pos, seed=2, batch=2, sampler="heun")
    assert st.mode == "keep" and st.estimated_bytes > 0 and not st.inputs
    keep_out = edits(tiny, st, src, "heun", only="replace", seed=2)["replace"]
    kept = st.attention_nbytes()
    # heun evaluates twice per step: the first step's estimate is about half of what it keeps
    assert 0.4 * kept < st.estimated_bytes < 0.7 * kept, (st.estimated_bytes, kept)

    m, pos, st = store(tiny, "auto", budget_mb=0)
    tiny.sample(m, pos, seed=2, sampler="heun")
    assert st.mode == "recompute" and st.attention_nbytes() == 0

    budget_mb = (st.estimated_bytes + kept) / 2 / 2**20  # above the estimate, below what heun keeps
    m, pos, st = store(tiny, "auto", budget_mb=int(budget_mb))
    src = tiny.sample(m, pos, seed=2, batch=2, sampler="heun")
    assert st.mode == "recompute" and st.attention_nbytes() == 0, "outgrowing the budget half-way switches"
    assert_same_up_to_batch_rounding(tiny, "heun", edits(tiny, st, src, "heun", only="replace", seed=2)["replace"], keep_out,
                                     "replace")


def test_recompute_with_a_long_target_prompt_equals_keep(tiny):
    """A target prompt of two chunks (154 tokens) against a one-chunk source: ComfyUI's way of
    batching prompts of different lengths (repeating to their common length) lets recompute run
    both in one batch; the edit is the one keep gives."""
    long_target = " ".join(["a blue circle"] * 30)  # 90 tokens: two chunks
    out = {}
    for strategy in ("keep", "recompute"):
        m, pos, st = store(tiny, strategy)
        src = tiny.sample(m, pos, seed=2)
        em, tpos = tiny.node("P2PRefine").execute(tiny.model, tiny.clip, st, src, long_target, 0.8, "", 0.4,
                                                  "p2p_16").result
        assert tpos[0][0].shape[1] == 154
        out[strategy] = tiny.sample(em, tpos, seed=2)["samples"]
    # Besides the batch shape, the paths differ in key count: keep attends the source's 77 keys
    # repeated to 154 beside the target, recompute runs the source on its prompt repeated to 154
    # tokens. The float noise of that alone: a plain sample on a prompt and on the prompt repeated.
    import nodes
    pos = tiny.encode(SOURCE)
    repeated = nodes.ConditioningConcat().concat(pos, pos)[0]
    floor = float((tiny.sample(tiny.model, repeated, seed=2)["samples"] - tiny.sample(tiny.model, pos, seed=2)["samples"])
                  .abs().max())
    diff = float((out["recompute"] - out["keep"]).abs().max())
    assert diff <= max(10 * max(floor, batch_noise_floor(tiny, "euler", TARGET)), 1e-5), (diff, floor)


def test_preview_of_a_recomputing_store_reads_its_token_maps(tiny):
    m, pos, st = store(tiny, "recompute", layers="none")
    src = tiny.sample(m, pos, seed=4)
    image = torch.from_numpy(tiny.images(src)).float()
    preview = tiny.node("AttentionMapPreview")
    overlay, mask, heat = preview.execute(st, src, image, "red", f"level {st.map_level}", 0.0, 1.0, 0.5).result
    assert 0 < mask.mean() < 1
    with pytest.raises(Exception, match="AttentionMapPreview: input 'layers': .*recomputes the source"):
        preview.execute(st, src, image, "red", f"level {st.map_level + 1}", 0.0, 1.0, 0.5)


def test_recompute_edits_a_real_image_as_keep_does(tiny):
    """Direct inversion: the recorded inputs lie on the trajectory, so the recomputed source is the
    reconstruction, and P2P's and FPE's edits equal those of a store that keeps the attention."""
    import edits

    neg = tiny.encode("")
    latent = tiny.encode_images(edits.case_images(edits.CASES[0], seed=9, batch=2))
    noise, inv = tiny.node("DDIMInvert").execute(tiny.model, tiny.encode(SOURCE), neg, latent, tiny.steps,
                                                 tiny.scheduler, 1.0).result[:2]
    out = {}
    for strategy in ("keep", "recompute"):
        m, pos, st = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, SOURCE, 1.0, "fpe", 1.0, "model dtype",
                                                         True, inv, strategy).result
        src = tiny.sample_from(m, pos, noise, neg)
        p2p, tpos = tiny.node("P2PReplace").execute(tiny.model, tiny.clip, st, src, TARGET, 0.8, "", 0.4,
                                                    "p2p_16").result
        fpe = tiny.node("FPESelfAttnInject").execute(tiny.model, st, src, "fpe", 1.0).result[0]
        out[strategy] = [tiny.sample_from(mm, tpos, noise, neg)["samples"] for mm in (p2p, fpe)]
        assert st.mode == strategy
    for kept, recomputed in zip(out["keep"], out["recompute"]):
        assert_same_up_to_batch_rounding(tiny, "euler", recomputed, kept, "real image")
