"""attention/controllers.py driven the way ComfyUI's attention replace patches call it, with plain
tensors and hand-built extra_options."""
from __future__ import annotations

import copy
import pathlib
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attention.controllers import (CrossEdit, Editor, LayerPatch, LocalBlend, Occurrences, Recorder,  # noqa: E402
                                   chunks, key_sigma, spatial_hw)
from attention.inject import edit_cross_attention, sdpa, token_maps  # noqa: E402
from attention.layers import AttentionLayer  # noqa: E402
from attention.record import COND, UNCOND, RecordError, RecordSpec, SourceRecord  # noqa: E402
from attention.schedule import StepRange, sigma_key  # noqa: E402
from attention.tokens import parse_prompt  # noqa: E402

HEADS, C, T = 2, 16, 77
H = W = 16  # latent; the layer below is at level 2: 4x4 = 16 query tokens
NQ = 16
SIGMAS = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])  # 4 steps
LAYER = AttentionLayer("input", 7, 0, 4, 2)
OTHER = AttentionLayer("output", 3, 0, 7, 2)
VOCAB = {"a": [1], "red": [2], "circle": [3], "blue": [4], "square": [5]}


def P(text):
    return parse_prompt(text, lambda w: VOCAB[w])


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def extra(sigma, cond_or_uncond=(1, 0), batch=1):
    return {"cond_or_uncond": list(cond_or_uncond), "sigmas": torch.tensor([sigma]), "sample_sigmas": SIGMAS,
            "n_heads": HEADS, "original_shape": [batch, 4, H, W]}


def K(sigma, n=0):
    """Record key of the n-th evaluation at this sigma."""
    return f"{sigma_key(sigma)}#{n}"


def make_record(cross_steps=StepRange(0, 1), self_steps=StepRange(0, 1), map_positions=16, dtype=None,
                layers=(LAYER,)):
    """map_positions 16 on the 16x16 latent: token maps at level 2 (4x4), LAYER's level."""
    keys = frozenset(l.key for l in layers)
    spec = RecordSpec(cross_layers=keys, cross_steps=cross_steps, self_layers=keys, self_steps=self_steps,
                      map_positions=map_positions, storage_dtype=dtype)
    return SourceRecord(spec, P("a red circle"), "model", {l.key: l for l in layers})


def tensors(seed, batch=1):
    """(uncond, cond) batched tensors for a cross (attn2) and a self (attn1) call."""
    n = 2 * batch
    cross = (rand(n, NQ, C, seed=seed), rand(n, T, C, seed=seed + 1), rand(n, T, C, seed=seed + 2))
    self_ = (rand(n, NQ, C, seed=seed + 3), rand(n, NQ, C, seed=seed + 4), rand(n, NQ, C, seed=seed + 5))
    return cross, self_


def run_source(record, calls, latent=(1, 4, H, W), sigmas=SIGMAS):
    """A source sampler run through Recorder.outer_sample; `calls(recorder)` makes the model calls."""
    recorder = Recorder(record)
    noise = torch.zeros(latent)
    result = recorder.outer_sample(lambda n, li, s, sg: (calls(recorder), torch.ones(latent))[1],
                                   noise, noise, None, sigmas)
    return recorder, result


def in_run(editor, calls, latent=(1, 4, H, W)):
    """One target sampler run through Editor.outer_sample (evaluation counts start afresh)."""
    return editor.outer_sample(lambda *a: calls(), torch.zeros(latent), None, None, SIGMAS)


def full_editor(record, **kw):
    cross = CrossEdit(torch.eye(T), torch.ones(T), StepRange(0, 1))
    kw = {"cross": cross, "self_layers": frozenset({LAYER.key}), "self_steps": StepRange(0, 1),
          "target": P("a red circle"), **kw}
    editor = Editor(record, record.run_id, **kw)
    editor.check(SIGMAS, (1, 4, H, W))
    return editor


# ------------------------------------------------------------------ helpers
def test_chunks_and_spatial_hw():
    assert chunks({"cond_or_uncond": [1, 0]}, 4) == [(1, slice(0, 2)), (0, slice(2, 4))]
    assert chunks({"cond_or_uncond": [0]}, 3) == [(0, slice(0, 3))]
    assert spatial_hw({"original_shape": [1, 4, 64, 64]}, 64 * 64) == (64, 64)
    assert spatial_hw({"original_shape": [1, 4, 64, 64]}, 16 * 16) == (16, 16)
    assert spatial_hw({"original_shape": [2, 4, 64, 96]}, 16 * 24) == (16, 24)
    assert spatial_hw({"original_shape": [2, 4, 96, 64]}, 12 * 8) == (12, 8)
    assert (COND, UNCOND) == (0, 1)  # ComfyUI's cond_or_uncond values


def test_spatial_hw_for_latents_not_divisible_by_the_downsampling():
    # ComfyUI's Downsample (3x3 conv, stride 2, padding 1) gives ceil(n / 2): a 520 px image has a
    # 65x65 latent and 33x33 / 17x17 grids at levels 1 / 2 (its Upsample restores the skip's size)
    assert spatial_hw({"original_shape": [1, 4, 65, 65]}, 33 * 33) == (33, 33)
    assert spatial_hw({"original_shape": [1, 4, 65, 65]}, 17 * 17) == (17, 17)
    assert spatial_hw({"original_shape": [1, 4, 66, 64]}, 17 * 16) == (17, 16)


# ------------------------------------------------------------------ Recorder
def test_recorder_token_maps_at_a_520px_latent():
    # 65x65 latent, maps kept at <= 16x16 positions: level 2, where ComfyUI's UNet has a 17x17 grid
    # of 289 queries (tools-free check: ceil(65/2)=33, ceil(33/2)=17); recording must not fail
    record = make_record(map_positions=16 * 16)
    q, k, v = rand(2, 17 * 17, C, seed=0), rand(2, T, C, seed=1), rand(2, T, C, seed=2)
    ex = dict(extra(5.0), original_shape=[1, 4, 65, 65])
    run_source(record, lambda r: LayerPatch(r, "attn2", LAYER)(q, k, v, ex), latent=(1, 4, 65, 65))
    assert record.map_level == 2
    assert record.maps[K(5.0)].shape == (1, record.prompt.map_tokens, 17, 17)  # up to the prompt's last word


def test_recorder_keeps_the_cond_chunk_only():
    (q, k, v), (qs, ks, vs) = tensors(0)
    record = make_record()
    outs = {}

    def calls(recorder):
        outs["x"] = LayerPatch(recorder, "attn2", LAYER)(q, k, v, extra(5.0))
        outs["s"] = LayerPatch(recorder, "attn1", LAYER)(qs, ks, vs, extra(5.0))

    recorder, result = run_source(record, calls)
    assert torch.equal(outs["x"], sdpa(q, k, v, HEADS)) and torch.equal(outs["s"], sdpa(qs, ks, vs, HEADS))
    sk = K(5.0)
    # cond_or_uncond [1, 0]: rows 0 = uncond, rows 1 = cond
    assert set(record.cross_q) == {(LAYER.key, sk)}
    assert torch.equal(record.cross_q[(LAYER.key, sk)], q[1:2])
    assert [torch.equal(t, k[1:2]) for t in record.cross_k.values()] == [True]
    # self-attention of the cond half only (P2P and FPE edit the conditional half), keyed (layer, sigma key)
    assert set(record.self_qk) == {(LAYER.key, sk)}
    assert torch.equal(record.self_qk[(LAYER.key, sk)][0], qs[1:2])
    assert torch.equal(record.self_qk[(LAYER.key, sk)][1], ks[1:2])
    # token maps of the cond half at the map level, up to the prompt's last word, on a 4x4 grid
    n = record.prompt.map_tokens
    assert record.maps[sk].shape == (1, n, 4, 4)
    torch.testing.assert_close(record.maps[sk], token_maps(q[1:2], k[1:2], HEADS, (4, 4), T)[:, :n])
    assert record.complete and record.run_id and record.latent_shape == (1, 4, H, W)
    assert torch.equal(result, torch.ones(1, 4, H, W)) and torch.equal(record.result, result)
    assert record.nbytes() > 0


def test_recorder_keeps_copies_and_storage_dtype():
    (q, k, v), _ = tensors(0)
    record = make_record(dtype=torch.float16)

    def calls(recorder):
        LayerPatch(recorder, "attn2", LAYER)(q, k, v, extra(5.0))

    run_source(record, calls)
    kept = record.cross_q[(LAYER.key, K(5.0))]
    assert kept.dtype == torch.float16 and torch.equal(kept, q[1:2].half())
    record2 = make_record()
    q2 = q.clone()
    run_source(record2, lambda r: LayerPatch(r, "attn2", LAYER)(q2, k, v, extra(5.0)))
    q2.zero_()
    assert torch.equal(record2.cross_q[(LAYER.key, K(5.0))], q[1:2])


def test_recorder_respects_step_ranges_layers_and_map_level():
    (q, k, v), (qs, ks, vs) = tensors(0)
    record = make_record(cross_steps=StepRange(0, 0.5), self_steps=StepRange(0, 0.25), map_positions=64)

    def calls(recorder):
        for sigma in (10.0, 7.0, 5.0, 2.0, 1.0):  # steps 0, 0 (midpoint), 1, 2, 3
            LayerPatch(recorder, "attn2", LAYER)(q, k, v, extra(sigma))
            LayerPatch(recorder, "attn1", LAYER)(qs, ks, vs, extra(sigma))
            LayerPatch(recorder, "attn2", OTHER)(q, k, v, extra(sigma))  # not in the spec

    run_source(record, calls)
    assert {s for _, s in record.cross_q} == {K(10.0), K(7.0), K(5.0)}
    assert {s for _, s in record.self_qk} == {K(10.0), K(7.0)}
    assert all(key == LAYER.key for key, _ in record.cross_q)
    assert record.map_level == 1  # 8x8 = 64 positions
    assert record.maps == {}  # the layer is at level 2


def test_recorder_outside_a_sampler_run_keeps_nothing():
    (q, k, v), _ = tensors(0)
    record = make_record()
    out = LayerPatch(Recorder(record), "attn2", LAYER)(q, k, v, extra(5.0))
    assert torch.equal(out, sdpa(q, k, v, HEADS))
    assert record.cross_q == {} and record.cross_k == {} and record.maps == {}


def test_layer_patch_calls_the_previous_patch():
    (q, k, v), _ = tensors(0)
    seen = []

    def previous(q_, k_, v_, extra_):
        seen.append(q_.shape[0])
        return torch.full_like(q_, 3.0)

    record = make_record()
    out = LayerPatch(Recorder(record), "attn2", LAYER, previous)(q, k, v, extra(5.0))
    assert seen == [2] and torch.equal(out, torch.full_like(q, 3.0))


def test_recorder_post_cfg_keeps_denoised():
    record = make_record()
    recorder = Recorder(record)
    d = torch.randn(1, 4, H, W)
    assert recorder.post_cfg({"sigma": torch.tensor([5.0]), "denoised": d}) is d and record.denoised == {}
    record.begin(SIGMAS, (1, 4, H, W))
    assert recorder.post_cfg({"sigma": torch.tensor([5.0]), "denoised": d}) is d
    assert torch.equal(record.denoised[K(5.0)], d)
    d2 = torch.randn(1, 4, H, W)
    recorder.post_cfg({"sigma": torch.tensor([5.0]), "denoised": d2})  # heun: the same sigma again
    assert torch.equal(record.denoised[K(5.0, 1)], d2) and torch.equal(record.denoised[K(5.0)], d)


# ------------------------------------------------------------------ Editor
def record_of(cross, self_, sigmas=(10.0, 5.0), batch=1):
    record = make_record()

    def calls(recorder):
        for s in sigmas:
            LayerPatch(recorder, "attn2", LAYER)(*cross, extra(s, batch=batch))
            LayerPatch(recorder, "attn1", LAYER)(*self_, extra(s, batch=batch))

    run_source(record, calls, latent=(batch, 4, H, W))
    return record


def test_editor_with_its_own_record_reproduces_plain_attention():
    cross, self_ = tensors(0)
    editor = full_editor(record_of(cross, self_))

    def calls():
        for s in (10.0, 5.0):
            assert torch.equal(LayerPatch(editor, "attn2", LAYER)(*cross, extra(s)), sdpa(*cross, HEADS))
            assert torch.equal(LayerPatch(editor, "attn1", LAYER)(*self_, extra(s)), sdpa(*self_, HEADS))
        return "ok"

    assert in_run(editor, calls) == "ok"
    assert in_run(editor, calls) == "ok"  # a second target run reads the same record


def test_editor_injects_into_the_cond_half_only():
    (q1, k1, v1), (qs1, ks1, vs1) = tensors(0)
    (q2, k2, v2), (qs2, ks2, vs2) = tensors(100)
    record = record_of((q1, k1, v1), (qs1, ks1, vs1))
    aligned = torch.ones(T)
    aligned[3] = 0
    eq = torch.ones(T)
    eq[2] = 2.0
    cross = CrossEdit(torch.eye(T), aligned, StepRange(0, 1), equalizer=eq)
    editor = full_editor(record, cross=cross)
    out = LayerPatch(editor, "attn2", LAYER)(q2, k2, v2, extra(5.0))
    plain = sdpa(q2, k2, v2, HEADS)
    assert torch.equal(out[0:1], plain[0:1])  # uncond untouched
    ws, wt = cross.weights(1, 4)  # sigma 5 = step 1 of 4
    want = edit_cross_attention(q2[1:2], k2[1:2], v2[1:2], q1[1:2], k1[1:2], torch.eye(T), ws, wt, HEADS)
    # the same fused products computed in a batch of 2 vs of 1: float32 rounding only
    torch.testing.assert_close(out[1:2], want, atol=1e-6, rtol=0)
    assert not torch.allclose(out[1:2], plain[1:2], atol=1e-3)
    # (f) self-attention: the cond chunk reads its values through the source's cond map; the
    # uncond chunk attends as usual (both reference implementations edit only the conditional half)
    out = LayerPatch(editor, "attn1", LAYER)(qs2, ks2, vs2, extra(5.0))
    assert torch.equal(out[0:1], sdpa(qs2, ks2, vs2, HEADS)[0:1])
    torch.testing.assert_close(out[1:2], sdpa(qs1[1:2], ks1[1:2], vs2[1:2], HEADS), atol=1e-6, rtol=0)
    assert not torch.allclose(out[0:1], sdpa(qs1[0:1], ks1[0:1], vs2[0:1], HEADS), atol=1e-3)


def test_editor_step_ranges():
    (q1, k1, v1), self1 = tensors(0)
    (q2, k2, v2), (qs2, ks2, vs2) = tensors(100)
    record = record_of((q1, k1, v1), self1)
    cross = CrossEdit(torch.eye(T), torch.ones(T), StepRange(0, 0.25))  # step 0 only
    editor = full_editor(record, cross=cross, self_steps=StepRange(0.25, 1.0))  # steps 1..
    x = LayerPatch(editor, "attn2", LAYER)
    s = LayerPatch(editor, "attn1", LAYER)
    assert not torch.allclose(x(q2, k2, v2, extra(10.0)), sdpa(q2, k2, v2, HEADS), atol=1e-3)
    assert torch.equal(x(q2, k2, v2, extra(5.0)), sdpa(q2, k2, v2, HEADS))  # step 1: no injection
    assert torch.equal(s(qs2, ks2, vs2, extra(10.0)), sdpa(qs2, ks2, vs2, HEADS))  # step 0: none
    assert not torch.allclose(s(qs2, ks2, vs2, extra(5.0)), sdpa(qs2, ks2, vs2, HEADS), atol=1e-3)


def test_editor_split_calls_equal_batched():
    (q1, k1, v1), (qs1, ks1, vs1) = tensors(0)
    (q2, k2, v2), (qs2, ks2, vs2) = tensors(100)
    aligned = torch.ones(T)
    aligned[2] = 0
    cross = CrossEdit(torch.eye(T), aligned, StepRange(0, 1))
    # records from batched and from split source calls are the same
    rec_b = record_of((q1, k1, v1), (qs1, ks1, vs1))
    rec_s = make_record()

    def split_calls(recorder):
        for s in (10.0, 5.0):
            for cou, rows in ((0, slice(1, 2)), (1, slice(0, 1))):
                LayerPatch(recorder, "attn2", LAYER)(q1[rows], k1[rows], v1[rows], extra(s, (cou,)))
                LayerPatch(recorder, "attn1", LAYER)(qs1[rows], ks1[rows], vs1[rows], extra(s, (cou,)))

    run_source(rec_s, split_calls)
    assert rec_b.cross_q.keys() == rec_s.cross_q.keys() and rec_b.self_qk.keys() == rec_s.self_qk.keys()
    for key in rec_b.cross_q:
        assert torch.equal(rec_b.cross_q[key], rec_s.cross_q[key])
    for key in rec_b.self_qk:
        assert all(torch.equal(a, b) for a, b in zip(rec_b.self_qk[key], rec_s.self_qk[key]))
    for key in rec_b.maps:
        torch.testing.assert_close(rec_b.maps[key], rec_s.maps[key])

    editor = full_editor(rec_b, cross=cross)
    for kind, (q, k, v) in (("attn2", (q2, k2, v2)), ("attn1", (qs2, ks2, vs2))):
        patch = LayerPatch(editor, kind, LAYER)
        batched = in_run(editor, lambda: patch(q, k, v, extra(5.0, (1, 0))))
        cond, uncond = in_run(editor, lambda: (patch(q[1:2], k[1:2], v[1:2], extra(5.0, (0,))),
                                               patch(q[0:1], k[0:1], v[0:1], extra(5.0, (1,)))))
        torch.testing.assert_close(torch.cat([uncond, cond]), batched, atol=1e-6, rtol=0)
        # and with the other order of chunks in one call
        swapped = in_run(editor, lambda: patch(torch.cat([q[1:2], q[0:1]]), torch.cat([k[1:2], k[0:1]]),
                                               torch.cat([v[1:2], v[0:1]]), extra(5.0, (0, 1))))
        torch.testing.assert_close(swapped, torch.cat([cond, uncond]), atol=1e-6, rtol=0)
        assert not torch.allclose(batched, sdpa(q, k, v, HEADS), atol=1e-3)  # an edit did happen


def test_editor_expands_a_source_batch_of_one():
    cross, self_ = tensors(0)
    record = record_of(cross, self_)
    (q2, k2, v2), _ = tensors(100, batch=2)  # rows: uncond, uncond, cond, cond
    editor = Editor(record, record.run_id, cross=CrossEdit(torch.eye(T), torch.ones(T), StepRange(0, 1)),
                    target=P("a red circle"))
    editor.check(SIGMAS, (2, 4, H, W))
    out = LayerPatch(editor, "attn2", LAYER)(q2, k2, v2, extra(5.0, batch=2))
    for r in (2, 3):
        want = edit_cross_attention(q2[r:r + 1], k2[r:r + 1], v2[r:r + 1], cross[0][1:2], cross[1][1:2],
                                    torch.eye(T), torch.ones(T), torch.zeros(T), HEADS)
        torch.testing.assert_close(out[r:r + 1], want, atol=1e-6, rtol=0)
    assert torch.equal(out[0:2], sdpa(q2[0:2], k2[0:2], v2[0:2], HEADS))


def test_editor_missing_record_is_a_helpful_error():
    cross, self_ = tensors(0)
    editor = full_editor(record_of(cross, self_, sigmas=(10.0,)))
    with pytest.raises(RecordError, match="cross-attention of layer input 7.0"):
        LayerPatch(editor, "attn2", LAYER)(*cross, extra(5.0))
    with pytest.raises(RecordError, match="self-attention of layer input 7.0"):
        LayerPatch(editor, "attn1", LAYER)(*self_, extra(5.0))
    # one evaluation at sigma 10 was recorded: a second one (heun's correction) has no counterpart
    LayerPatch(editor, "attn2", LAYER)(*cross, extra(10.0))
    with pytest.raises(RecordError, match="sigma 10"):
        LayerPatch(editor, "attn2", LAYER)(*cross, extra(10.0))


def test_repeated_sigmas_pair_the_nth_source_and_target_evaluations():
    # heun-like: 10, then 5 twice (correction of step 0, then step 1), then 2
    src = {s: tensors(seed) for s, seed in ((10.0, 0), ("5a", 10), ("5b", 20), (2.0, 30))}
    text_k = src[10.0][0][1]  # the prompt's keys are the same at every step (kept once per layer)
    src = {name: ((x[0], text_k, x[2]), self_) for name, (x, self_) in src.items()}
    order = [(10.0, 10.0), (5.0, "5a"), (5.0, "5b"), (2.0, 2.0)]
    record = make_record()

    def calls(recorder):
        for sigma, name in order:
            LayerPatch(recorder, "attn2", LAYER)(*src[name][0], extra(sigma))
            LayerPatch(recorder, "attn1", LAYER)(*src[name][1], extra(sigma))

    run_source(record, calls)
    assert {s for _, s in record.cross_q} == {K(10.0), K(5.0), K(5.0, 1), K(2.0)}
    assert torch.equal(record.cross_q[(LAYER.key, K(5.0, 1))], src["5b"][0][0][1:2])
    assert torch.equal(record.self_qk[(LAYER.key, K(5.0, 1))][0], src["5b"][1][0][1:2])
    editor = full_editor(record)
    (q2, k2, v2), (qs2, ks2, vs2) = tensors(100)
    got = {}

    def target():
        for sigma, name in order:
            got[name] = (LayerPatch(editor, "attn2", LAYER)(q2, k2, v2, extra(sigma)),
                         LayerPatch(editor, "attn1", LAYER)(qs2, ks2, vs2, extra(sigma)))

    in_run(editor, target)
    for name, ((q1, k1, _), (qs1, ks1, _)) in src.items():
        want_x = edit_cross_attention(q2[1:2], k2[1:2], v2[1:2], q1[1:2], k1[1:2], torch.eye(T), torch.ones(T),
                                      torch.zeros(T), HEADS)
        torch.testing.assert_close(got[name][0][1:2], want_x, atol=1e-6, rtol=0)
        torch.testing.assert_close(got[name][1][1:2], sdpa(qs1[1:2], ks1[1:2], vs2[1:2], HEADS), atol=1e-6, rtol=0)
        assert torch.equal(got[name][1][0:1], sdpa(qs2, ks2, vs2, HEADS)[0:1])  # uncond: plain
    assert not torch.allclose(got["5a"][0], got["5b"][0], atol=1e-3)


def test_occurrences():
    occ = Occurrences()
    assert occ.key(5.0, "attn2", ("input", 1, 0), 0) == "5#0"
    assert occ.key(5.0, "attn2", ("input", 1, 0), 1) == "5#0"  # counted per chunk
    assert occ.key(5.0, "attn2", ("input", 1, 0), 0) == "5#1"
    assert occ.key(2.5, "attn2", ("input", 1, 0), 0) == "2.5#0"
    assert key_sigma("2.5#3") == 2.5 and key_sigma(K(14.6146, 2)) == pytest.approx(14.6146)


def test_cross_edit_window_and_weights_per_word_schedules():
    aligned = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    ce = CrossEdit(torch.eye(5), aligned, StepRange(0, 0.5), word_steps={2: StepRange(0, 1), 3: StepRange(0, 1),
                                                                         4: StepRange(0, 0.25)})
    assert ce.window(0, 4) == (1, 1, 1, 1, 1)
    assert ce.window(1, 4) == (1, 1, 1, 1, 0)
    assert ce.window(3, 4) == (0, 0, 1, 1, 0)
    ws, wt = ce.weights(3, 4)
    assert ws.tolist() == [0, 0, 1, 0, 0]  # unaligned token 3 never takes the source
    assert wt.tolist() == [1, 1, 0, 1, 1]
    ws, wt = ce.weights(0, 4)
    assert ws.tolist() == [1, 1, 1, 0, 1] and wt.tolist() == [0, 0, 0, 1, 0]
    assert ce.active(3, 4) and ce.active(0, 4)
    assert aligned.tolist() == [1, 1, 1, 0, 1]  # not modified in place
    # the window of every token closed: no edit
    idle = CrossEdit(torch.eye(5), aligned, StepRange(0, 0.25))
    assert not idle.active(2, 4) and idle.weights(2, 4)[1].tolist() == [1] * 5


def test_cross_edit_weights_with_an_equalizer():
    # ws = t g c, wt = 1 - t + t (1 - g) c: inside the window a new word's own column is scaled too
    aligned = torch.tensor([1.0, 1.0, 0.0, 0.0])
    c = torch.tensor([1.0, 2.0, 3.0, 1.0])
    ce = CrossEdit(torch.eye(4), aligned, StepRange(0, 0.5), equalizer=c)
    ws, wt = ce.weights(0, 4)
    assert ws.tolist() == [1, 2, 0, 0] and wt.tolist() == [0, 0, 3, 1]
    ws, wt = ce.weights(3, 4)  # outside the window: the target's own maps, not re-weighted
    assert ws.tolist() == [0, 0, 0, 0] and wt.tolist() == [1, 1, 1, 1]


# ------------------------------------------------------------------ Editor.check
@pytest.fixture
def finished_record():
    cross, self_ = tensors(0)
    return record_of(cross, self_)


def test_check_accepts_matching_runs(finished_record):
    editor = Editor(finished_record, finished_record.run_id)
    editor.check(SIGMAS.clone(), (1, 4, H, W))
    editor.check(SIGMAS.double() * (1 + 1e-7), (3, 4, H, W))  # a source batch of one serves any batch


def test_check_sigmas_count(finished_record):
    editor = Editor(finished_record, finished_record.run_id, node="P2PReplace")
    with pytest.raises(RecordError) as e:
        editor.check(torch.tensor([10.0, 5.0, 1.0, 0.0]), (1, 4, H, W))
    msg = str(e.value)
    assert msg.startswith("P2PReplace:") and "(3 steps)" in msg and "(4 steps)" in msg and "same steps" in msg


def test_check_sigmas_values(finished_record):
    editor = Editor(finished_record, finished_record.run_id)
    with pytest.raises(RecordError, match="sigmas"):
        editor.check(torch.tensor([10.0, 5.0, 2.5, 1.0, 0.0]), (1, 4, H, W))


def test_check_latent_size(finished_record):
    editor = Editor(finished_record, finished_record.run_id)
    with pytest.raises(RecordError) as e:
        editor.check(SIGMAS, (1, 4, H, W + 8))
    assert "(4, 16, 24)" in str(e.value) and "(4, 16, 16)" in str(e.value) and "width and height" in str(e.value)


def test_check_batch_size():
    cross, self_ = tensors(0, batch=2)
    record = record_of(cross, self_, batch=2)
    editor = Editor(record, record.run_id)
    editor.check(SIGMAS, (2, 4, H, W))
    with pytest.raises(RecordError, match="batch size 3 differs from the source's 2"):
        editor.check(SIGMAS, (3, 4, H, W))


def test_check_run_id_and_completion(finished_record):
    editor = Editor(finished_record, finished_record.run_id)
    finished_record.begin(SIGMAS, (1, 4, H, W))  # the source re-ran (and has not finished)
    with pytest.raises(RecordError, match="queue the prompt again"):
        editor.check(SIGMAS, (1, 4, H, W))
    finished_record.finish(torch.zeros(1, 4, H, W))
    with pytest.raises(RecordError, match="queue the prompt again"):  # finished, but another run
        editor.check(SIGMAS, (1, 4, H, W))
    Editor(finished_record, finished_record.run_id).check(SIGMAS, (1, 4, H, W))


def test_editor_outer_sample_checks_before_sampling(finished_record):
    editor = Editor(finished_record, "another run")
    ran = []
    with pytest.raises(RecordError):
        editor.outer_sample(lambda *a: ran.append(1), torch.zeros(1, 4, H, W), None, None, SIGMAS)
    assert ran == []
    editor = Editor(finished_record, finished_record.run_id)

    def executor(noise, latent, sampler, sigmas):
        assert torch.equal(editor.sample_sigmas, SIGMAS)
        return "done"

    assert editor.outer_sample(executor, torch.zeros(1, 4, H, W), None, None, SIGMAS) == "done"
    assert editor.sample_sigmas is None and editor.maps == {}


# ------------------------------------------------------------------ local blend
def peaked(seed, pixel, token=2):
    """Cross tensors whose cond row attends to `token` (almost) only at one pixel of the 4x4 grid."""
    (q, k, v), _ = tensors(seed)
    q[1], k[1] = 0.0, 0.0
    u = torch.zeros(C)
    u[0] = u[C // HEADS] = 10.0  # the same direction in both heads
    q[1, pixel], k[1, token] = u, u
    return q, k, v


def test_editor_local_blend_post_cfg():
    q1, k1, v1 = peaked(0, pixel=15)  # source's word at (3, 3)
    _, self1 = tensors(0)
    record = record_of((q1, k1, v1), self1, sigmas=(10.0, 5.0, 2.0))
    src_d = {s: torch.full((1, 4, H, W), s) for s in (10.0, 5.0, 2.0)}
    for s, d in src_d.items():
        record.denoised[K(s)] = d
    blend = LocalBlend(source_positions=[2], target_positions=[2], threshold=0.3, start=0.5)
    editor = Editor(record, record.run_id, blend=blend, target=P("a red circle"))
    q2, k2, v2 = peaked(100, pixel=0)  # target's word at (0, 0)
    seen, outs = {}, {}

    def executor(noise, latent, sampler, sigmas):
        patch = LayerPatch(editor, "attn2", LAYER)
        for s in (10.0, 5.0, 2.0):
            outs[s] = patch(q2, k2, v2, extra(s))
            seen[s] = editor.post_cfg({"sigma": torch.tensor([s]), "denoised": torch.full((1, 4, H, W), -1.0)})
        return None

    editor.outer_sample(executor, torch.zeros(1, 4, H, W), None, None, SIGMAS)
    assert torch.equal(outs[5.0], sdpa(q2, k2, v2, HEADS))  # no cross edit: plain attention
    # before the blend's start (step 2 of 4) the target is untouched
    assert torch.equal(seen[10.0], torch.full((1, 4, H, W), -1.0))
    assert torch.equal(seen[5.0], torch.full((1, 4, H, W), -1.0))
    # at step 2 the mask is the union of both words' dilated blobs, x4 up to the latent:
    # target (0, 0) -> rows/cols 0..1 -> 0..7; source (3, 3) -> rows/cols 2..3 -> 8..15
    mask = torch.zeros(1, 1, H, W)
    mask[..., :8, :8] = 1
    mask[..., 8:, 8:] = 1
    want = src_d[2.0] + mask * (torch.full((1, 4, H, W), -1.0) - src_d[2.0])
    assert torch.equal(seen[2.0], want)
    # a post_cfg outside a sampler run passes the latent through
    d = torch.zeros(1, 4, H, W)
    assert editor.post_cfg({"sigma": torch.tensor([2.0]), "denoised": d}) is d


# ------------------------------------------------------------------ deepcopy
def test_deepcopy_returns_the_same_controllers(finished_record):
    recorder = Recorder(finished_record)
    editor = Editor(finished_record, finished_record.run_id)
    patch = LayerPatch(recorder, "attn2", LAYER)
    assert copy.deepcopy(recorder) is recorder and copy.copy(recorder) is recorder
    assert copy.deepcopy(editor) is editor and copy.copy(editor) is editor
    assert copy.deepcopy(patch) is patch and copy.copy(patch) is patch
    # as ComfyUI does with model_options on clone
    options = {"transformer_options": {"patches_replace": {"attn2": {LAYER.key: patch}}},
               "sampler_cfg_function": None}
    cloned = copy.deepcopy(options)
    assert cloned is not options
    assert cloned["transformer_options"]["patches_replace"]["attn2"][LAYER.key] is patch
    assert patch.controller is recorder and recorder.record is finished_record


# ------------------------------------------------------------------ P2P's re-weighting after a refine
def ref_maps64(q, k, heads):
    """softmax(q kᵀ/√d) per head in float64: (B, heads, Nq, L)."""
    d = q.shape[-1] // heads
    split = lambda t: t.double().reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    return torch.softmax(split(q) @ split(k).transpose(-1, -2) / d**0.5, dim=-1)


def apply_maps64(M, v, heads):
    """M (B, heads, Nq, L) times v (B, L, heads * d), float64, back to (B, Nq, heads * d)."""
    d = v.shape[-1] // heads
    out = M @ v.double().reshape(v.shape[0], v.shape[1], heads, d).transpose(1, 2)
    return out.transpose(1, 2).reshape(v.shape[0], M.shape[2], -1)


def test_reweighting_a_target_added_word_doubles_its_column_inside_the_window():
    # (b) refine "soup" -> "pea soup with croutons", then re-weight 'croutons' by 2 (P2P's
    # AttentionReweight with an AttentionRefine as prev_controller)
    from attention.align import refine_mapper
    vocab = {"soup": [15], "pea": [16], "with": [13], "croutons": [17, 18]}
    src = parse_prompt("soup", lambda w: vocab[w])
    tgt = parse_prompt("pea soup with croutons", lambda w: vocab[w])
    croutons = tgt.positions("croutons")
    assert croutons == [4, 5]
    A, aligned = refine_mapper(src, tgt)
    c = torch.ones(T)
    c[croutons] = 2.0
    ce = CrossEdit(A, aligned, StepRange(0, 0.5, cross=True), equalizer=c)
    q_t, k_t, v_t = rand(1, NQ, C, seed=81), rand(1, T, C, seed=82), rand(1, T, C, seed=83)
    q_s, k_s = rand(1, NQ, C, seed=84), rand(1, T, C, seed=85)
    Ms, Mt = ref_maps64(q_s, k_s, HEADS), ref_maps64(q_t, k_t, HEADS)
    g, A64, c64 = aligned.double(), A.double(), c.double()
    for step, inside in ((0, True), (1, True), (2, False), (3, False)):  # int(0.5 * 5) = 2 steps at 4 steps
        assert ce.active(step, 4) == inside
        # P2P's composition, step by step in float64: refine (the source's map through the mapper
        # where aligned, the target's own elsewhere), re-weight every column, then the time window
        refined = (Ms @ A64) * g + Mt * (1 - g)
        t = 1.0 if inside else 0.0
        M_new = t * (refined * c64) + (1 - t) * Mt
        if inside:
            torch.testing.assert_close(M_new[..., croutons], 2 * Mt[..., croutons], atol=1e-15, rtol=0)
        else:
            assert torch.equal(M_new, Mt)
        ws, wt = ce.weights(step, 4)
        got = edit_cross_attention(q_t, k_t, v_t, q_s, k_s, A, ws, wt, HEADS)
        # float32 fused attention vs explicit float64 maps (|v| ~ 3, weights <= 2, 77 keys): ~100 ulp
        torch.testing.assert_close(got.double(), apply_maps64(M_new, v_t, HEADS), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ local blend
def test_local_blend_mask_subtracts_the_unpooled_union_and_meets_a_region():
    # (c) as inject.blend_mask: the words' pooled union less the subtracted words' unpooled union
    src = torch.zeros(1, 4, 8, 8)
    tgt = torch.zeros(1, 4, 8, 8)
    src[0, 1, 3, 3] = src[0, 1, 3, 4] = 1.0  # pooled: rows 2..4, cols 2..5
    src[0, 3, 2, 2] = 1.0
    tgt[0, 1, 2, 3] = 1.0  # pooled: rows 1..3, cols 2..4
    tgt[0, 3, 4, 5] = 1.0
    words = torch.zeros(1, 1, 8, 8)
    words[..., 2:5, 2:6] = 1
    words[..., 1:4, 2:5] = 1
    blend = LocalBlend([1], [1], threshold=0.3, subtract_source=[3], subtract_target=[3], dilate=1)
    want = words.clone()
    want[..., 2, 2] = want[..., 4, 5] = 0
    assert torch.equal(blend.mask(src, tgt, (8, 8)), want)
    # a MASK region (left half) meets the words' mask; the subtracted words stay the source anyway
    region = torch.zeros(1, 8, 8)
    region[:, :, :4] = 1.0
    left = torch.zeros(1, 1, 8, 8)
    left[..., :4] = 1
    inter = LocalBlend([1], [1], subtract_source=[3], subtract_target=[3], region=region, combine="intersect")
    assert torch.equal(inter.mask(src, tgt, (8, 8)), want * left)
    union = LocalBlend([1], [1], subtract_source=[3], subtract_target=[3], region=region, combine="union")
    both = torch.maximum(words, left)
    both[..., 2, 2] = both[..., 4, 5] = 0
    assert torch.equal(union.mask(src, tgt, (8, 8)), both)
    only = LocalBlend([1], [1], subtract_source=[3], region=region, combine="mask only")
    region_less = left.clone()
    region_less[..., 2, 2] = 0
    assert torch.equal(only.mask(src, None, (8, 8)), region_less)
    assert not only.needs_target_maps and blend.needs_target_maps


def test_editor_local_blend_reads_the_target_map_after_the_cross_edit():
    # P2P stores the target's cross-attention after editing it in place: with a full injection
    # (identity mapper, every token aligned) the target's blend map is the source's, so the mask
    # is the source word's blob only, not the union with the target's own blob
    q1, k1, v1 = peaked(0, pixel=15)  # source's word at (3, 3)
    _, self1 = tensors(0)
    record = record_of((q1, k1, v1), self1, sigmas=(10.0, 5.0, 2.0))
    src_d = {s: torch.full((1, 4, H, W), s) for s in (10.0, 5.0, 2.0)}
    for s, d in src_d.items():
        record.denoised[K(s)] = d
    blend = LocalBlend(source_positions=[2], target_positions=[2], threshold=0.3, start=0.5)
    cross = CrossEdit(torch.eye(T), torch.ones(T), StepRange(0, 1, cross=True))
    editor = Editor(record, record.run_id, cross=cross, blend=blend, target=P("a red circle"))
    q2, k2, v2 = peaked(100, pixel=0)  # target's word at (0, 0)
    seen = {}

    def executor(noise, latent, sampler, sigmas):
        patch = LayerPatch(editor, "attn2", LAYER)
        for s in (10.0, 5.0, 2.0):
            patch(q2, k2, v2, extra(s))
            seen[s] = editor.post_cfg({"sigma": torch.tensor([s]), "denoised": torch.full((1, 4, H, W), -1.0)})
        return None

    editor.outer_sample(executor, torch.zeros(1, 4, H, W), None, None, SIGMAS)
    mask = torch.zeros(1, 1, H, W)
    mask[..., 8:, 8:] = 1  # the source's (3, 3) blob dilated to rows/cols 2..3, x4 up to the latent
    want = src_d[2.0] + mask * (torch.full((1, 4, H, W), -1.0) - src_d[2.0])
    assert torch.equal(seen[2.0], want)


# ------------------------------------------------------------------ recompute strategy
def recompute_record():
    keys = frozenset({LAYER.key})
    spec = RecordSpec(cross_layers=keys, cross_steps=StepRange(0, 1), self_layers=keys, self_steps=StepRange(0, 1),
                      map_positions=16, strategy="recompute")
    return SourceRecord(spec, P("a red circle"), "model", {LAYER.key: LAYER})


def test_recorder_keeps_the_inputs_of_the_cond_half_only():
    record = recompute_record()
    x, c = rand(2, 4, H, W, seed=91), rand(2, T, C, seed=92)  # rows: uncond, cond
    y = rand(2, 8, seed=93)

    def calls(recorder):
        for s in (10.0, 5.0):
            recorder.apply_model(lambda *a, **kw: "out", x * s, torch.tensor([s, s]), None, c, None,
                                 {"cond_or_uncond": [1, 0]}, y=y)

    run_source(record, calls)
    assert record.recompute
    assert set(record.inputs) == {K(10.0), K(5.0)} and set(record.conds) == {K(10.0), K(5.0)}
    assert torch.equal(record.inputs[K(5.0)], x[1:2] * 5.0)
    assert set(record.conds[K(5.0)]) == {"c_crossattn", "y"}
    assert torch.equal(record.conds[K(5.0)]["c_crossattn"], c[1:2]) and torch.equal(record.conds[K(5.0)]["y"], y[1:2])
    assert record.conds[K(5.0)] is record.conds[K(10.0)]  # an unchanged prompt is kept once


def test_editor_recompute_batches_the_cond_source_rows_first():
    from attention.controllers import LIVE_SOURCE
    record = recompute_record()
    x_src, c_src = rand(2, 4, H, W, seed=94), rand(2, T, C, seed=95)
    run_source(record, lambda r: r.apply_model(lambda *a, **kw: None, x_src, torch.tensor([5.0, 5.0]), None, c_src,
                                               None, {"cond_or_uncond": [1, 0]}))
    editor = Editor(record, record.run_id, cross=CrossEdit(torch.eye(T), torch.ones(T), StepRange(0, 1)),
                    target=P("a red circle"))
    # a two-chunk target conditioning: the source's 77 tokens are repeated to 154, as ComfyUI batches
    x, c = rand(2, 4, H, W, seed=96), rand(2, 2 * T, C, seed=97)
    seen = {}

    def executor(xs, ts, c_concat, c_crossattn, control, opts, **kw):
        seen.update(xs=xs, ts=ts, c=c_crossattn, opts=opts)
        return xs * 2

    out = in_run(editor, lambda: editor.apply_model(executor, x, torch.tensor([5.0, 5.0]), None, c, None,
                                                    {"cond_or_uncond": [1, 0]}))
    assert torch.equal(seen["xs"], torch.cat([x_src[1:2], x]))  # the source's cond row, then the target's
    assert torch.equal(seen["ts"], torch.tensor([5.0, 5.0, 5.0]))
    assert torch.equal(seen["c"], torch.cat([c_src[1:2].repeat(1, 2, 1), c]))
    assert seen["opts"]["cond_or_uncond"] == [COND, 1, 0] and seen["opts"][LIVE_SOURCE] == 1
    assert torch.equal(out, x * 2)  # the target's rows only


def test_area_conditioning_is_refused():
    record = recompute_record()
    crop = rand(2, 4, H // 2, W // 2, seed=98)

    def calls(recorder):
        recorder.apply_model(lambda *a, **kw: None, crop, torch.tensor([5.0, 5.0]), None, rand(2, T, C, seed=99),
                             None, {"cond_or_uncond": [1, 0]})

    with pytest.raises(RecordError, match="crop"):
        run_source(record, calls)
    cross, self_ = tensors(0)
    finished = record_of(cross, self_)
    editor = full_editor(finished)
    with pytest.raises(RecordError, match="ConditioningSetArea"):
        in_run(editor, lambda: editor.apply_model(lambda *a, **kw: None, crop, torch.tensor([5.0, 5.0]), None,
                                                  rand(2, T, C, seed=99), None, {"cond_or_uncond": [1, 0]}))


# ------------------------------------------------------------------ several chunks
def test_editor_two_chunk_target_against_a_one_chunk_kept_source():
    # (e) keep strategy: the source's cond keys were kept at 77 tokens; the target's prompt is two
    # chunks (154 keys; ComfyUI repeated the 77-token negative to 154 in the same batch)
    from attention.align import refine_mapper
    from attention.tokens import prompt_from_tokens
    (q1, k1, v1), self1 = tensors(0)
    record = record_of((q1, k1, v1), self1)
    pieces = {1: "a</w>", 2: "red</w>", 3: "circle</w>"}
    text = " ".join(["a"] * 75 + ["circle"])
    body = lambda entries: ([(49406, 1.0, 0)] + [(t, 1.0, w) for t, w in entries]  # noqa: E731
                            + [(49407, 1.0, 0)] * (T - 1 - len(entries)))
    tgt = prompt_from_tokens(text, [body([(1, i + 1) for i in range(75)]), body([(3, 76)])], pieces.get, text)
    assert tgt.length == 2 * T
    A, aligned = refine_mapper(record.prompt, tgt)
    cross = CrossEdit(A, aligned, StepRange(0, 1))
    editor = Editor(record, record.run_id, cross=cross, target=tgt)
    editor.check(SIGMAS, (1, 4, H, W))
    q2, v2 = rand(2, NQ, C, seed=101), rand(2, 2 * T, C, seed=102)
    k2 = rand(2, 2 * T, C, seed=103)
    k2[0, T:] = k2[0, :T]  # the uncond row: a 77-token negative repeated
    out = LayerPatch(editor, "attn2", LAYER)(q2, k2, v2, extra(5.0))
    ws, wt = cross.weights(1, 4)
    M_new = ((ref_maps64(q1[1:2], k1[1:2], HEADS) @ A.double()) * ws.double()
             + ref_maps64(q2[1:2], k2[1:2], HEADS) * wt.double())
    # float32 fused attention vs explicit float64 maps over 154 keys: as above, ~100 ulp
    torch.testing.assert_close(out[1:2].double(), apply_maps64(M_new, v2[1:2], HEADS), atol=1e-5, rtol=0)
    assert torch.equal(out[0:1], sdpa(q2, k2, v2, HEADS)[0:1])  # uncond: plain
