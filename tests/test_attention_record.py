"""attention/record.py: map level choice, run bookkeeping, storage, cumulative maps."""
from __future__ import annotations

import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attention.layers import AttentionLayer  # noqa: E402
from attention.record import RecordSpec, SourceRecord, cumulative_maps, map_level  # noqa: E402
from attention.schedule import StepRange  # noqa: E402
from attention.tokens import parse_prompt  # noqa: E402

SIGMAS = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
LAYERS = [AttentionLayer("input", 1, 0, 0, 0), AttentionLayer("input", 4, 0, 2, 1),
          AttentionLayer("input", 7, 0, 4, 2), AttentionLayer("middle", 0, 0, 6, 3)]


def record(dtype=None, map_positions=256):
    spec = RecordSpec(frozenset(), StepRange(), frozenset(), StepRange(), map_positions=map_positions,
                      storage_dtype=dtype)
    return SourceRecord(spec, parse_prompt("a b", lambda w: [ord(w)]), "m", {l.key: l for l in LAYERS})


def test_map_level():
    assert map_level((1, 4, 64, 64), 256, 3) == 2  # SD1.5 at 512 px: P2P's 16x16 maps
    assert map_level((1, 4, 16, 16), 256, 3) == 0  # TinySD
    assert map_level((1, 4, 32, 32), 256, 3) == 1
    assert map_level((1, 4, 128, 128), 256, 3) == 3
    assert map_level((1, 4, 64, 96), 256, 3) == 3  # 16x24 = 384 > 256; 8x12 = 96
    assert map_level((1, 4, 256, 256), 256, 3) == 3  # nothing small enough: the deepest
    assert map_level((1, 4, 64, 64), 256, 1) == 1
    assert map_level((64, 64), 64, 3) == 3


def test_begin_finish_and_map_level_from_the_latent():
    r = record()
    assert r.run_id is None and not r.complete
    r.cross_q[("input", 1, 0), "x"] = torch.ones(1)
    r.begin(SIGMAS, (1, 4, 32, 32))
    first = r.run_id
    assert r.cross_q == {} and not r.complete and r.num_steps == 4 and r.latent_shape == (1, 4, 32, 32)
    assert r.map_level == 1
    r.finish(torch.ones(1, 4, 32, 32, dtype=torch.float16))
    assert r.complete and r.result.dtype == torch.float32
    r.begin(SIGMAS, (1, 4, 64, 64))
    assert r.run_id != first and not r.complete and r.result is None and r.map_level == 2
    record_small = record(map_positions=16)
    record_small.begin(SIGMAS, (1, 4, 64, 64))
    assert record_small.map_level == 3  # 8x8 = 64 > 16: the deepest level


def test_keep_copies_or_casts_and_nbytes():
    r = record()
    t = torch.ones(2, 3)
    kept = r.keep(t)
    t.zero_()
    assert torch.equal(kept, torch.ones(2, 3)) and kept.dtype == torch.float32
    r16 = record(dtype=torch.float16)
    assert r16.keep(torch.ones(2, 3)).dtype == torch.float16
    r.begin(SIGMAS, (1, 4, 16, 16))
    r.cross_q[("k", "s")] = torch.zeros(2, 3)  # 24 bytes
    r.self_qk[("k", "s")] = (torch.zeros(4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16))  # 16
    r.denoised["s"] = torch.zeros(1)  # 4
    assert r.nbytes() == 24 + 16 + 4


def test_cumulative_maps_sum_every_evaluation_up_to_the_step():
    maps = {"10#0": torch.full((1, 2, 2, 2), 1.0), "7#0": torch.full((1, 2, 2, 2), 2.0),  # step 0
              "5#0": torch.full((1, 2, 2, 2), 4.0), "5#1": torch.full((1, 2, 2, 2), 8.0),  # step 1
              "2#0": torch.full((1, 2, 2, 2), 16.0)}  # step 2
    assert torch.equal(cumulative_maps(maps, SIGMAS, 0), torch.full((1, 2, 2, 2), 3.0))
    assert torch.equal(cumulative_maps(maps, SIGMAS, 1), torch.full((1, 2, 2, 2), 15.0))
    assert torch.equal(cumulative_maps(maps, SIGMAS, 3), torch.full((1, 2, 2, 2), 31.0))
    assert cumulative_maps({}, SIGMAS, 2) is None


def strategy_record(strategy: str, budget: int, cross_until: float = 0.5) -> SourceRecord:
    spec = RecordSpec(frozenset(l.key for l in LAYERS), StepRange(0, cross_until), frozenset(), StepRange(),
                      strategy=strategy, budget_bytes=budget)
    r = SourceRecord(spec, parse_prompt("a b", lambda w: [ord(w)]), "m", {l.key: l for l in LAYERS})
    r.begin(SIGMAS, (1, 4, 8, 8))
    return r


def first_step(r: SourceRecord) -> None:
    """What a first step leaves: one cross query (1 KiB), the keys (0.5 KiB), the cond half's input."""
    key, sk = ("input", 1, 0), "10#0"
    r.cross_q[(key, sk)] = torch.zeros(256)
    r.cross_k[(key, sk)] = torch.zeros(128)
    r.inputs[sk] = torch.zeros(16)  # keyed by the sigma key: only the cond half is kept


def test_decide_estimates_every_step_and_picks_by_budget():
    r = strategy_record("auto", budget=10_000)
    first_step(r)
    r.decide()
    assert r.estimated_bytes == 1024 * 2 + 512  # cross kept for 2 of 4 steps, keys once
    assert r.mode == "keep" and r.cross_q and r.inputs  # auto keeps the inputs in case the run outgrows it
    r.finish(torch.zeros(1, 4, 8, 8))
    assert not r.inputs and r.cross_q
    r = strategy_record("auto", budget=2000)
    first_step(r)
    r.decide()
    assert r.mode == "recompute" and not r.cross_q and not r.cross_k and r.inputs
    r = strategy_record("recompute", budget=1 << 40)
    first_step(r)
    r.decide()
    assert r.mode == "recompute" and r.attention_nbytes() == 0


def test_auto_switches_when_the_run_outgrows_the_budget():
    r = strategy_record("auto", budget=3000)
    first_step(r)
    r.decide()
    assert r.mode == "keep"
    r.cross_q[(("input", 1, 0), "5#0")] = torch.zeros(256)
    r.cross_q[(("input", 1, 0), "5#1")] = torch.zeros(256)  # a second evaluation at the same sigma
    r.check_budget()
    assert r.mode == "recompute" and r.attention_nbytes() == 0
    r.finish(torch.zeros(1, 4, 8, 8))
    assert r.inputs, "a recomputing store keeps its inputs"


def test_map_tokens_keeps_the_words_positions_only():
    # the token maps stop after the prompt's last word ("a b": start, a, b): the end token and the
    # padding are never read, and keeping them would cost 77/3 times the memory
    r = record()
    r.begin(SIGMAS, (1, 4, 8, 8))
    key = LAYERS[0].key
    r.layer_hw[key] = (2, (2, 2))
    q, k = torch.randn(1, 4, 16), torch.randn(1, 77, 16)
    r.map_tokens(key, "10#0", q, k)
    assert r.prompt.length == 77 and r.prompt.map_tokens == 3 and r.maps["10#0"].shape == (1, 3, 2, 2)
    # they are the first three of the maps over all 77 tokens, which sum to one per pixel (float32 softmax)
    from attention.inject import token_maps
    full = token_maps(q, k, 2, (2, 2), 77)
    torch.testing.assert_close(full.sum(1), torch.ones(1, 2, 2), atol=1e-6, rtol=0)
    assert torch.equal(r.maps["10#0"], full[:, :3])


def test_attention_bytes_are_counted_as_the_tables_grow():
    """attention_nbytes() counts each step's additions once (it runs at every step under `auto`): it
    equals a count of every table from scratch, a tensor shared by two tables counted once, and
    starts over for a new run's tables and after the attention is dropped."""
    r = strategy_record("auto", budget=1 << 20)
    q, k = torch.zeros(64), torch.zeros(32)
    r.cross_q[("a", "10#0")], r.cross_k[("a", "10#0")] = q, k
    r.self_qk[("a", "10#0")] = (q, torch.zeros(8))  # a joint call's parts share its image queries
    assert r.attention_nbytes() == 4 * (64 + 32 + 8)
    r.self_qk[("a", "5#0")] = (torch.zeros(16), torch.zeros(8))
    r.cross_q[("a", "5#0")] = torch.zeros(4)
    assert r.attention_nbytes() == 4 * (64 + 32 + 8 + 16 + 8 + 4)
    r.drop_attention()
    assert r.attention_nbytes() == 0
    r.cross_k[("a", "2#0")] = torch.zeros(2)
    assert r.attention_nbytes() == 8
    r.begin(SIGMAS, (1, 4, 8, 8))  # a new run: new tables
    r.cross_q[("a", "10#0")] = torch.zeros(1)
    assert r.attention_nbytes() == 4
