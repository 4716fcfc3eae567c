"""What an edit costs, in one process and one run, side by side with one plain generation:

- plain generation: its prompt's text encoding and KSampler (an edit's nodes encode their prompts too);
- P2P replace edit: source branch (AttentionStore keeping what the P2P schedule needs) + target; the
  schedule is the nodes' defaults (SD1.5's), or on TinySD its own (graphs.TINYSD_P2P: self-attention at
  8x8 for 0.8 of the steps, more injection than the defaults);
- FPE edit: source branch (AttentionStore keeping self-attention of the fpe layers only) + target;
- both again with AttentionStore's strategy "recompute" (the store keeps only the source's
  latent-sized inputs; the target re-runs the source beside itself while it injects);
- real-image edits: DDIMInvert + source branch re-anchored to it (direct inversion) + FPE target (empty
  source prompt), and + P2P replace and local blend target (flow models: SamplerCustomAdvanced from
  DDIMInvert's noise, as their workflows);
- DDIM inversion alone and null-text inversion alone (10 inner steps at most);
and the memory: the attention store after the source branch (it only grows while the source runs,
so that is its peak), what storing every probability map of the same layers and steps would take,
and the process's peak RSS. With more than one run, each edit's line adds the median and range of
each run's ratio to the plain generation timed just before it, the ratio of the fastest runs, and
the median of each branch's (the source's nodes and sampler; the target's) ratio to it. Everything runs under
torch.inference_mode(), as ComfyUI's executor runs the nodes of a queued prompt.

    OMP_NUM_THREADS=1 .venv/bin/python tools/benchmark.py                         # TinySD, 128 px, 20 steps
    OMP_NUM_THREADS=1 .venv/bin/python tools/benchmark.py --model sd15 --size 512 --steps 3
    OMP_NUM_THREADS=1 .venv/bin/python tools/benchmark.py --model flux_small --size 256 --steps 10 --skip-real
    OMP_NUM_THREADS=1 .venv/bin/python tools/benchmark.py --model tinyflux --cfg 4     # TinyFlux, 128 px, 20 steps
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import graphs
import inproc


class Bench:
    """The model under test as an inproc.Tiny (its encode/sample helpers), whatever its kind."""

    def __init__(self, kind: str, size: int, steps: int, cfg: float):
        self.node = inproc.node_classes()  # sets up ComfyUI (sys.path) and loads the pack
        if kind == "tinysd":
            self.tiny = inproc.Tiny.load(steps=steps, cfg=cfg, size=size)
        elif kind == "tinyflux":
            self.tiny = inproc.Tiny.load("TinyFluxCheckpointLoader", steps=steps, cfg=cfg, size=size,
                                         scheduler=graphs.TINYFLUX_SCHEDULER)
        else:
            import random_models
            self.tiny = inproc.Tiny(*random_models.build(kind), None, steps=steps, cfg=cfg, size=size)
        self.model, self.clip = self.tiny.model, self.tiny.clip
        self.negative = self.encode("")

    def encode(self, text: str):
        return self.tiny.encode(text)

    def sample(self, model, positive, inverted=None) -> dict:
        """A seeded sample, or a real-image branch from DDIMInvert's outputs `inverted` (as the workflows wire it)."""
        if inverted is None:
            return self.tiny.sample(model, positive, seed=1, negative=self.negative)
        return self.tiny.sample_branch(model, positive, inverted, self.negative)

    def store(self, prompt: str, self_layers: str, self_until: float, cross_until: float, inversion=None,
              strategy: str = "keep"):
        return self.node["AttentionStore"].execute(self.model, self.clip, prompt, cross_until, self_layers,
                                                   self_until, "model dtype", True, inversion, strategy).result


CLOCK = time.perf_counter  # main() picks the process's CPU time on a CPU device


def timed(fn):
    """fn()'s result and its time: wall time on an accelerator (synchronised), the process's CPU time
    on a CPU, where one torch thread makes it the run's own time, whatever else the machine runs."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = CLOCK()
    out = fn()
    sync()
    return out, CLOCK() - t


def attention_heads(model) -> int:
    return next(getattr(m, "heads", None) or m.num_heads for m in model.model.diffusion_model.modules()
                if hasattr(m, "heads") or hasattr(m, "num_heads"))


def map_bytes(store, heads: int, element_size: int = 4) -> int:
    """Bytes that every probability map of the recorded layers and steps would take (fp32):
    self-attention B x heads x N x N per kept (layer, step, cond/uncond), cross-attention
    B x heads x N x L per kept (layer, step), L the text tokens (77 per CLIP chunk, Flux: T5's).
    Tensors are kept in the pack's layout (B, N, C), a flow transformer's in head layout (B, H, N, D)."""
    tokens = lambda t: t.shape[-2] if t.dim() == 4 else t.shape[1]  # noqa: E731
    total = sum(q.shape[0] * heads * tokens(q) ** 2 for q, _ in store.self_qk.values())
    total += sum(q.shape[0] * heads * tokens(q) * tokens(store.cross_k[key]) for key, q in store.cross_q.items())
    return total * element_size


@torch.inference_mode()  # as ComfyUI's PromptExecutor runs every node of a prompt
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tinysd", "tinyflux", "sd15", "flux_small", "sd35_small"], default="tinysd",
                    help="flux_small / sd35_small: Flux.1's and SD3.5 Medium's layouts at reduced width (random weights)")
    ap.add_argument("--size", type=int, default=None, help="image size in px (TinySD 128; sd15 e.g. 256, 512)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each measurement, interleaved (the median is reported: a shared machine's hiccups do not move it)")
    ap.add_argument("--strategies", default="keep,recompute", help="AttentionStore strategies to time")
    ap.add_argument("--p2p-schedule", choices=["auto", "defaults", "tinysd"], default="auto",
                    help="P2P's schedule: the nodes' defaults or TinySD's (auto: TinySD's on TinySD)")
    ap.add_argument("--skip-real", action="store_true", help="skip the real-image edit and the inversions")
    ap.add_argument("--null-text-steps", type=int, default=10,
                    help="null-text inner steps (0: skip null-text, e.g. for SD1.5 at 512 px on a CPU)")
    args = ap.parse_args()
    demo = args.model in ("tinysd", "tinyflux")
    size = args.size or (128 if demo else 512)
    b = Bench(args.model, size, args.steps, args.cfg)
    global CLOCK
    cpu = torch.device(b.model.load_device).type == "cpu"
    CLOCK = time.process_time if cpu and torch.get_num_threads() == 1 else time.perf_counter
    tinysd_schedule = args.p2p_schedule == "tinysd" or (args.p2p_schedule == "auto" and demo)
    sched = (graphs.TINYFLUX_P2P if args.model == "tinyflux" else graphs.TINYSD_P2P) if tinysd_schedule \
        else graphs.P2P_DEFAULTS
    src_prompt, tgt_prompt = ("a red circle", "a blue circle") if demo else ("a cat riding a bicycle", "a cat riding a car")
    words = ("red", "blue") if demo else ("bicycle", "car")
    pos = b.encode(src_prompt)
    b.sample(b.model, pos)  # warm-up (loading, first-call allocations)

    times: dict[str, list[float]] = {}
    branches: dict[str, list[tuple[float, float]]] = {}  # an edit's (source, target) branch times, each run
    stores = {}
    for _ in range(args.repeat):
        _, t = timed(lambda: b.sample(b.model, b.encode(src_prompt)))
        times.setdefault("plain generation", []).append(t)

        for strategy in args.strategies.split(","):
            def p2p():
                def source():
                    m, spos, st = b.store(src_prompt, sched["self_attention_layers"], sched["self_attention_until"],
                                          sched["cross_attention_until"], strategy=strategy)
                    return st, b.sample(m, spos)

                def target():
                    em, epos = b.node["P2PReplace"].execute(b.model, b.clip, st, src, tgt_prompt, word_schedules="",
                                                            **sched).result
                    b.sample(em, epos)
                (st, src), t_source = timed(source)
                branches.setdefault(f"P2P replace edit, store: {strategy}", []).append((t_source, timed(target)[1]))
                return st
            stores[f"P2P, {strategy}"], t = timed(p2p)
            times.setdefault(f"P2P replace edit, store: {strategy}", []).append(t)

            def fpe():
                def source():
                    m, spos, st = b.store(src_prompt, "fpe", 1.0, 0.0, strategy=strategy)
                    return st, b.sample(m, spos)

                def target():
                    b.sample(b.node["FPESelfAttnInject"].execute(b.model, st, src, **graphs.FPE_DEFAULTS).result[0],
                             b.encode(tgt_prompt))
                (st, src), t_source = timed(source)
                branches.setdefault(f"FPE edit, store: {strategy}", []).append((t_source, timed(target)[1]))
                return st
            stores[f"FPE, {strategy}"], t = timed(fpe)
            times.setdefault(f"FPE edit, store: {strategy}", []).append(t)

        if args.skip_real:
            continue
        image = b.sample(b.model, pos)

        scheduler = b.tiny.scheduler

        def real():
            inverted = b.node["DDIMInvert"].execute(b.model, b.encode(""), b.negative, image, args.steps, scheduler,
                                                    1.0).result
            m, spos, st = b.store("", "fpe", 1.0, 0.0, inverted[1])
            src = b.sample(m, spos, inverted)
            b.sample(b.node["FPESelfAttnInject"].execute(b.model, st, src, **graphs.FPE_DEFAULTS).result[0],
                     b.encode(tgt_prompt), inverted)
            return inverted[1]
        inv, t = timed(real)
        times.setdefault("real-image FPE edit (inversion + source + target)", []).append(t)

        def real_p2p():
            inverted = b.node["DDIMInvert"].execute(b.model, pos, b.negative, image, args.steps, scheduler, 1.0).result
            m, spos, st = b.store(src_prompt, sched["self_attention_layers"], sched["self_attention_until"],
                                  sched["cross_attention_until"], inverted[1])
            src = b.sample(m, spos, inverted)
            em, epos = b.node["P2PReplace"].execute(b.model, b.clip, st, src, tgt_prompt, word_schedules="",
                                                    **sched).result
            em = b.node["P2PLocalBlend"].execute(em, *words, 0.5, 0.2, "", 0).result[0]
            b.sample(em, epos, inverted)
        _, t = timed(real_p2p)
        times.setdefault("real-image P2P + local blend edit", []).append(t)
        _, t = timed(lambda: b.node["DDIMInvert"].execute(b.model, pos, b.negative, image, args.steps, scheduler,
                                                          1.0).result)
        times.setdefault("DDIM inversion", []).append(t)
        if args.null_text_steps:
            _, t = timed(lambda: b.node["NullTextInversion"].execute(b.model, inv, pos, b.negative, args.cfg,
                                                                     args.null_text_steps, 0.1, 1e-5).result)
            times.setdefault("null-text inversion", []).append(t)

    mean = {k: statistics.median(v) for k, v in times.items()}
    plain = mean["plain generation"]
    # each run's ratio to the plain generation timed just before it: the machine's speed drifts
    # between runs, and a paired ratio cancels the drift that a ratio of medians keeps
    paired = {k: sorted(t / p for t, p in zip(v, times["plain generation"])) for k, v in times.items()}
    dev = str(torch.device(b.model.load_device))
    print(f"benchmark: {args.model}, {size}x{size} px, {args.steps} euler steps, cfg {args.cfg}, {dev}, "
          f"torch threads {torch.get_num_threads()}, {'CPU' if CLOCK is time.process_time else 'wall'} time, median of {args.repeat} runs; P2P schedule "
          f"{'the demo model' if tinysd_schedule else 'defaults'} {sched}")
    for k, v in mean.items():
        # fastest/fastest: a shared machine's interference only ever adds time (timeit's advice)
        spread = f"  (runs: median {statistics.median(paired[k]):.2f}x, {paired[k][0]:.2f}-{paired[k][-1]:.2f}x; " \
                 f"fastest {min(times[k]) / min(times['plain generation']):.2f}x)" \
            if len(paired[k]) > 1 and k != "plain generation" else ""
        if k in branches and len(branches[k]) > 1:  # where the extra goes: each branch against a plain generation
            runs = list(zip(branches[k], times["plain generation"]))
            spread += (f"; branches: source {statistics.median(s / p for (s, _), p in runs):.3f}x, "
                       f"target {statistics.median(t / p for (_, t), p in runs):.3f}x")
        print(f"  {k:52s} {v:8.2f} s  {v / plain:5.2f}x plain{spread}")
    if "null-text inversion" in mean:
        print(f"  {f'null-text ({args.null_text_steps} inner steps) / DDIM inversion':52s} "
              f"{mean['null-text inversion'] / mean['DDIM inversion']:8.2f}x")
    heads = attention_heads(b.model)
    maps = {name.split(",")[0]: map_bytes(st, heads) for name, st in stores.items() if st.mode == "keep"}
    for name, st in stores.items():
        kept, full = st.nbytes(), maps.get(name.split(",")[0], 0)
        per_step = kept / args.steps
        vs_maps = f"{full / 2**20:9.1f} MiB; store/maps {100 * kept / full:.1f}%" if full else "(run keep to see)"
        print(f"  store after the source branch, {name:16s}: {kept / 2**20:9.1f} MiB ({per_step / 2**20:.2f} MiB/step); "
              f"attention kept {st.attention_nbytes() / 2**20:.1f} MiB; keeping it all would take "
              f"{st.estimated_bytes / 2**20:.1f} MiB (first step x steps); every probability map of the same "
              f"layers/steps (fp32): {vs_maps}")
    if not args.skip_real:
        print(f"  inversion trajectory: {inv.latents.numel() * inv.latents.element_size() / 2**20:.2f} MiB")
    print(f"  process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
