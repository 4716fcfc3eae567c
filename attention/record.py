"""What the source branch leaves for the target.

Two strategies, chosen per run within a memory budget:
- keep: queries/keys of the chosen layers and steps (never full maps), low-resolution queries for
  token maps (local blend, previews), the denoised latent of each step. The target then costs one
  plain generation, but the store grows with the step count.
- recompute: only the model's inputs of each step (latent-sized) and the low-resolution token maps;
  the target branch runs the source alongside itself in one batch while it injects, so the store
  does not hold attention at all. Slower (the target's injected steps cost two evaluations).
"""
from __future__ import annotations

import dataclasses
import itertools
import uuid
from dataclasses import dataclass, field

import torch

from .inversion import Trajectory
from .layers import AttentionLayer, is_joint
from .schedule import StepRange
from .tokens import Prompt

COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond values
RUN_DATA = ("cross_q", "cross_k", "self_qk", "map_q", "map_k", "layer_hw", "_maps", "denoised", "corrections", "inputs",
            "conds")  # what one source run leaves


KEYS_CHANGE = "keys change"  # SourceRecord._last_keys: this layer's text keys change with the step


class RecordError(RuntimeError):
    pass


@dataclass(frozen=True)
class RecordSpec:
    """Which layers and steps to keep, of the cond half only (P2P's and FPE's controllers edit
    only that half)."""
    cross_layers: frozenset[tuple[str, int, int]]
    cross_steps: StepRange
    self_layers: frozenset[tuple[str, int, int]]
    self_steps: StepRange
    map_positions: int = 16 * 16  # token maps are kept at the finest level with at most this many positions
    map_level: int | None = None  # or at this level (clamped to the deepest): a model whose words localise elsewhere
    storage_dtype: torch.dtype | None = None  # None: the model's dtype
    strategy: str = "keep"  # "keep" | "recompute" | "auto": keep unless the estimate exceeds budget_bytes
    budget_bytes: int = 2 << 30


def map_level(latent_shape: tuple[int, ...], max_positions: int, deepest: int) -> int:
    """P2P's local blend reads 16x16 maps at 512 px (latent 64, level 2): the finest level whose
    grid has at most `max_positions` positions (TinySD, latent 16: level 0)."""
    h, w = latent_shape[-2:]
    for level in range(deepest + 1):
        if h * w <= max_positions:
            return level
        h, w = -(-h // 2), -(-w // 2)  # stride-2 convolutions round up
    return deepest


@dataclass
class SourceRecord:
    spec: RecordSpec
    prompt: Prompt
    model_id: str
    layers: dict[tuple[str, int, int], AttentionLayer]
    run_id: str | None = None
    complete: bool = False
    sample_sigmas: torch.Tensor | None = None
    latent_shape: tuple[int, ...] | None = None
    result: torch.Tensor | None = None
    map_level: int | None = None  # level of the layers whose token maps are kept (local blend, previews)
    cross_q: dict = field(default_factory=dict)  # (layer key, sigma key) -> (B, N, C)
    cross_k: dict = field(default_factory=dict)  # (layer key, sigma key) -> (B, L, C); one tensor while the keys stay the same
    self_qk: dict = field(default_factory=dict)  # (layer key, sigma key) -> cond (q, k)
    map_q: dict = field(default_factory=dict)  # (layer key, sigma key) -> cond queries of the map-level layers
    map_k: dict = field(default_factory=dict)  # (layer key, sigma key) -> cond keys of a map-level layer
    layer_hw: dict = field(default_factory=dict)  # layer key -> (heads, (h, w)) of every layer seen
    denoised: dict = field(default_factory=dict)  # sigma key -> (B, C, H, W)
    inversion: Trajectory | None = None  # a real image's trajectory: the source is re-anchored to it
    correct_target: bool = False  # direct inversion: the target gets the source's corrections too (off: see AttentionStore)
    corrections: dict = field(default_factory=dict)  # sigma key -> anchored minus model denoised
    _last_keys: dict = field(default_factory=dict)  # (table, layer key) -> the keys kept last (keep_keys)
    mode: str = "pending"  # "keep" | "recompute" once the first step has shown what keeping costs
    estimated_bytes: int = 0  # what keeping the attention of every step would take (first step x steps)
    inputs: dict = field(default_factory=dict)  # recompute: (sigma key, cond_or_uncond) -> the model's input rows
    conds: dict = field(default_factory=dict)  # recompute: (sigma key, cond_or_uncond) -> {name: rows}
    has_control: bool = False  # the source ran with a ControlNet (recompute cannot reproduce it)
    settings: dict = field(default_factory=dict)  # the source run's noise, sampler and cfg (checked by the target)
    _maps: dict = field(default_factory=dict, repr=False)  # sigma key -> token maps, computed when asked
    store_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the AttentionStore this run belongs to
    runs: list = field(default_factory=list, repr=False)  # finished runs (each a record of its own), oldest first
    run_bytes: dict = field(default_factory=dict, repr=False)  # run id -> what a finished run holds (nbytes)
    _counted: dict = field(default_factory=dict, repr=False)  # attention_nbytes(): what it has counted so far

    def begin(self, sample_sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> None:
        """A new source run: fresh containers, so that the finished runs in `runs` keep theirs."""
        for name in RUN_DATA:
            setattr(self, name, {})
        self._last_keys = {}
        self.run_id, self.complete, self.result = uuid.uuid4().hex, False, None
        self.mode = "pending"  # the first step keeps everything; decide() then picks
        self.estimated_bytes, self.has_control = 0, False
        self.sample_sigmas = sample_sigmas.detach().float().cpu().clone()
        self.latent_shape = tuple(latent_shape)
        deepest = max(l.level for l in self.layers.values())
        chosen = self.spec.map_level
        self.map_level = map_level(latent_shape, self.spec.map_positions, deepest) if chosen is None else min(chosen, deepest)

    def finish(self, result: torch.Tensor) -> None:
        self.result = result.detach().float().cpu().clone()
        self.complete = True
        if self.mode == "keep":  # the inputs were kept in case the run outgrew its budget
            self.inputs.clear()
            self.conds.clear()
        self.runs.append(dataclasses.replace(self, runs=[], run_bytes={}, _counted={}))
        self.run_bytes[self.run_id] = self.nbytes()  # measured once: a finished run only gains small token maps
        while len(self.runs) > 1 and sum(self.run_bytes.get(run.run_id, 0) for run in self.runs) > self.spec.budget_bytes:
            self.run_bytes.pop(self.runs.pop(0).run_id, None)  # the oldest run goes first

    def run_for(self, samples: torch.Tensor) -> SourceRecord | None:
        """The finished run whose output is `samples` (the newest, if several are)."""
        samples = samples.float().cpu()
        for run in reversed(self.runs):
            if run.result.shape == samples.shape and torch.allclose(run.result, samples, atol=1e-5):
                return run
        return None

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` in the storage dtype (never a view: a kept view would hold all of its base)."""
        t = t.detach() if t.requires_grad else t
        return t.to(self.spec.storage_dtype, copy=True) if self.spec.storage_dtype is not None else t.clone()

    def keep_keys(self, table: dict, key, sk: str, k: torch.Tensor) -> torch.Tensor:
        """Keeps a UNet layer's text keys for this evaluation. They are the same at every step (the
        prompt through a fixed projection): the entries then share one tensor. Where they change
        (another pack's per-step patch), each step keeps its own, and once a layer's keys have
        changed they are no longer compared. (A flow transformer's text stream changes with every
        step: Recorder.record_joint keeps its keys per step without comparing.)"""
        kept, where = self.keep(k), (id(table), key)
        last = self._last_keys.get(where)
        if isinstance(last, torch.Tensor):
            if last.shape == kept.shape and torch.equal(last, kept):
                kept = last
            else:
                last = KEYS_CHANGE
        self._last_keys[where] = KEYS_CHANGE if last is KEYS_CHANGE else kept
        table[(key, sk)] = kept
        return kept

    @property
    def num_steps(self) -> int:
        return len(self.sample_sigmas) - 1

    @property
    def joint(self) -> bool:
        """A flow transformer's record (joint text-image attention)."""
        return any(is_joint(layer) for layer in self.layers.values())

    @property
    def recompute(self) -> bool:
        return self.mode == "recompute"

    def nbytes(self) -> int:
        tensors = [*self.cross_q.values(), *self.cross_k.values(), *self.map_q.values(), *self.map_k.values(),
                   *self.denoised.values(), *self.corrections.values(), *self.inputs.values(), *self._maps.values()]
        tensors += [t for pair in self.self_qk.values() for t in pair]
        tensors += [t for c in self.conds.values() for t in c.values()]
        return _unique_nbytes(tensors)

    def decide(self) -> None:
        """After the first step: estimate what keeping every step would take (one step's share times
        the steps each kind is kept for) and pick the strategy: under "auto", recompute if the
        estimate exceeds the budget."""
        from .schedule import step_index
        n = self.num_steps
        on_first = lambda sk: step_index(float(sk.partition("#")[0]), self.sample_sigmas) == 0  # noqa: E731
        cross = _unique_nbytes([q for (_, sk), q in self.cross_q.items() if on_first(sk)])
        self_ = _unique_nbytes([t for (_, sk), pair in self.self_qk.items() if on_first(sk) for t in pair])
        maps = _unique_nbytes([q for (_, sk), q in self.map_q.items() if on_first(sk)])
        active = lambda rng: sum(rng.active(i, n) for i in range(n))  # noqa: E731
        keys = _unique_nbytes([k for (_, sk), k in self.cross_k.items() if on_first(sk)])
        per_step = len({id(k) for k in self.cross_k.values()}) > len({key for key, _ in self.cross_k})
        self.estimated_bytes = (cross * active(self.spec.cross_steps) + self_ * active(self.spec.self_steps)
                                + maps * n + keys * (active(self.spec.cross_steps) if per_step else 1))
        if self.mode == "pending":
            over = self.estimated_bytes > self.spec.budget_bytes
            self.mode = self.spec.strategy if self.spec.strategy != "auto" else ("recompute" if over else "keep")
            if self.mode == "recompute":
                self.drop_attention()

    def check_budget(self) -> None:
        """Under "auto", a run that outgrows the budget after all (e.g. a sampler that evaluates the
        model twice per step) switches to recomputing: the inputs of every step are still there."""
        if self.spec.strategy == "auto" and self.mode == "keep" and self.attention_nbytes() > self.spec.budget_bytes:
            self.mode = "recompute"
            self.drop_attention()

    def attention_nbytes(self) -> int:
        """The kept queries and keys (each tensor once). The budget is checked at every step and a run
        only adds to these tables, so each call counts what was added since the last one."""
        tables = (self.cross_q, self.cross_k, self.map_q, self.map_k, self.self_qk)
        done = self._counted
        if not done or any(t is not seen or len(t) < n for t, (seen, n) in zip(tables, done["tables"])):
            done.update(tables=[(t, 0) for t in tables], ids=set(), nbytes=0)  # a new run, or dropped
        for i, (table, (_, n)) in enumerate(zip(tables, done["tables"])):
            for value in itertools.islice(table.values(), n, None):
                for t in value if isinstance(value, tuple) else (value,):
                    if id(t) not in done["ids"]:
                        done["ids"].add(id(t))
                        done["nbytes"] += t.numel() * t.element_size()
            done["tables"][i] = (table, len(table))
        return done["nbytes"]

    def drop_attention(self) -> None:
        self.compute_maps()  # the token maps made so far stay, the queries and keys go
        for d in (self.cross_q, self.cross_k, self.self_qk, self.map_q, self.map_k, self._last_keys, self._counted):
            d.clear()

    @property
    def maps(self) -> dict[str, torch.Tensor]:
        """sigma key -> head-averaged token maps (B, T, h, w) summed over the map-level layers.
        Computed from the kept queries and keys when first asked (local blend, previews), so a
        source run that nobody blends pays only for keeping a few low-resolution queries."""
        self.compute_maps()
        return by_evaluation(self._maps)

    def map_tokens(self, key, sk: str, q: torch.Tensor, k: torch.Tensor) -> None:
        """Token maps of a map-level layer, made now (recompute keeps maps, not queries)."""
        from .inject import token_maps
        heads, hw = self.layer_hw[key]
        self._maps[(key, sk)] = token_maps(q, k, heads, hw, self.prompt.length, self.prompt.map_tokens)

    def compute_maps(self) -> None:
        for (key, sk), q in self.map_q.items():
            if (key, sk) not in self._maps:
                self.map_tokens(key, sk, q, self.map_k[(key, sk)])

    def cumulative_maps(self, step: int) -> torch.Tensor | None:
        return cumulative_maps(self.maps, self.sample_sigmas, step)

    def word_heatmap(self, positions: list[int], layers: set, steps: StepRange) -> torch.Tensor | None:
        """The words' cross-attention (summed over their tokens, averaged over heads, the chosen layers
        and steps), upsampled to the latent: (B, H, W). None if nothing kept matches."""
        from .inject import token_maps
        from .schedule import step_index
        size = tuple(self.latent_shape[-2:])
        kept = {**self.map_q, **self.cross_q}
        total, count = None, 0
        for key, sk in {*kept, *self._maps}:
            step = step_index(float(sk.partition("#")[0]), self.sample_sigmas)
            if key not in layers or not steps.active(step, self.num_steps):
                continue
            if (key, sk) in self._maps:  # made already (local blend, or a store that recomputes)
                m = self._maps[(key, sk)][:, positions].sum(1, keepdim=True)
            else:
                heads, hw = self.layer_hw[key]
                k = self.cross_k.get((key, sk), self.map_k.get((key, sk)))
                m = token_maps(kept[(key, sk)], k, heads, hw, self.prompt.length, self.prompt.map_tokens)[:, positions].sum(1, keepdim=True)
            m = torch.nn.functional.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)[:, 0]
            total, count = (m if total is None else total + m), count + 1
        return None if total is None else total / count


def by_evaluation(maps: dict) -> dict[str, torch.Tensor]:
    """(layer key, sigma key) -> maps  as  sigma key -> the maps summed over the layers."""
    out: dict[str, torch.Tensor] = {}
    for (_, sk), m in maps.items():
        out[sk] = out[sk] + m if sk in out else m
    return out


def _unique_nbytes(tensors: list[torch.Tensor]) -> int:
    unique = {id(t): t for t in tensors}  # e.g. a map layer's queries may also be its kept cross queries
    return sum(t.numel() * t.element_size() for t in unique.values())


def cumulative_maps(maps: dict[str, torch.Tensor], sample_sigmas: torch.Tensor, step: int) -> torch.Tensor | None:
    """Token maps (keyed by sigma key) summed over steps 0..step: P2P's local blend uses the running sum."""
    from .schedule import step_index
    picked = [m for k, m in maps.items() if step_index(float(k.partition("#")[0]), sample_sigmas) <= step]
    return torch.stack(picked).sum(0) if picked else None
