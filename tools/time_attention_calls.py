"""Times single joint-attention calls of a flow transformer, each repeated in a loop (a machine's
drift moves a short loop far less than a whole generation): the plain call, the source branch's
recorded call, and the target's edited call at each step of a P2P replace edit (past its windows a
run calls ComfyUI's attention without the pack's override, so those steps are only named).

    OMP_NUM_THREADS=1 .venv/bin/python tools/time_attention_calls.py --model tinyflux
    OMP_NUM_THREADS=1 .venv/bin/python tools/time_attention_calls.py --model flux_small --cfg 1
    OMP_NUM_THREADS=1 .venv/bin/python tools/time_attention_calls.py --image-block

The calls are caught by wrapping the patched clones' attention override (ComfyUI calls it with
the attention function and its arguments), then replayed: a replay of the source call records
into the store again, and each replay of a target call opens a fresh evaluation of the same sigma.
`--image-block` times instead the two ways attention/joint.py finds an edited call's image block
and text mass (the CPU kernel's log-sum-exps; the marked values other devices use) against a
plain attention of the same image rows over the whole sequence.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import comfyui_env
import graphs
import inproc

OVERRIDE = "optimized_attention_override"


def catch(model, calls: dict, name):
    """Wraps the clone's override so that the first conditional call of each (step name, block
    type) is kept for replay."""
    opts = model.model_options["transformer_options"]
    override = opts[OVERRIDE]

    def wrapper(func, *args, **kwargs):
        o = kwargs["transformer_options"]
        if 0 in o.get("cond_or_uncond", ()):
            calls.setdefault((name(o), o.get("block_type")), (func, args, dict(kwargs, transformer_options=dict(o))))
        return override(func, *args, **kwargs)
    opts[OVERRIDE] = wrapper
    return override


def timed_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return 1000 * statistics.median(times)


def attention_module(name: str):
    """attention/<name>.py of this repo, which imports nothing of ComfyUI's (its package only: the
    repo's own folder on sys.path would shadow ComfyUI's `nodes`)."""
    import importlib
    import importlib.util
    import sys
    folder = comfyui_env.REPO / "attention"
    if "attention" not in sys.modules:
        spec = importlib.util.spec_from_file_location("attention", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        sys.modules["attention"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["attention"])
    return importlib.import_module(f"attention.{name}")


def time_image_block(repeat: int) -> None:
    import torch.nn.functional as F
    joint = attention_module("joint")
    print(f"image block and text mass, process CPU time, median of {repeat} runs")
    for heads, dim, text, image in ((4, 32, 256, 1024), (6, 128, 512, 2048)):
        q = torch.randn(1, heads, image, dim)
        k, v = torch.randn(1, heads, text + image, dim), torch.randn(1, heads, text + image, dim)
        plain = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeat)
        by_lse = timed_ms(lambda: joint.image_block_heads(q, k, v[:, :, text:]), repeat)
        marked = timed_ms(lambda: joint.block_by_marked_values(q, k, v[:, :, text:]), repeat)
        print(f"  {heads} heads of {dim}, {text} text + {image} image keys: plain {plain:8.2f} ms   "
              f"log-sum-exps {by_lse / plain:5.2f}x   marked values {marked / plain:5.2f}x")


@torch.inference_mode()  # as ComfyUI's PromptExecutor runs every node of a prompt
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tinyflux", "flux_small"], default="tinyflux")
    ap.add_argument("--cfg", type=float, default=None, help="default: TinyFlux's 4, the layout's 5")
    ap.add_argument("--repeat", type=int, default=None, help="timed replays of each call (default 200 / 10)")
    ap.add_argument("--image-block", action="store_true", help="time the image block's two ways instead")
    args = ap.parse_args()
    if args.image_block:
        return time_image_block(args.repeat or 7)
    node = inproc.node_classes()
    if args.model == "tinyflux":
        cfg, repeat, sched = args.cfg or graphs.TINYFLUX_CFG, args.repeat or 200, graphs.TINYFLUX_P2P
        tiny = inproc.Tiny.load("TinyFluxCheckpointLoader", steps=20, cfg=cfg, size=128,
                                scheduler=graphs.TINYFLUX_SCHEDULER)
        source, target = "a red circle", "a blue circle"
    else:
        import random_models
        cfg, repeat, sched = args.cfg or 5.0, args.repeat or 10, graphs.P2P_DEFAULTS
        tiny = inproc.Tiny(*random_models.build("flux_small"), None, steps=4, cfg=cfg, size=512)
        source, target = "a cat riding a bicycle", "a cat riding a car"
    negative = tiny.encode("")
    m, spos, store = node["AttentionStore"].execute(tiny.model, tiny.clip, source, sched["cross_attention_until"],
                                                    sched["self_attention_layers"], sched["self_attention_until"],
                                                    "model dtype", True, None, "keep").result
    source_calls: dict = {}
    recording = catch(m, source_calls, lambda o: "source")
    src = tiny.sample(m, spos, seed=1, negative=negative)
    em, epos = node["P2PReplace"].execute(tiny.model, tiny.clip, store, src, target, word_schedules="", **sched).result
    target_calls: dict = {}
    steps = store.sample_sigmas

    def step_of(o):
        sigma = float(o["sigmas"].flatten()[0])
        return f"step {int((steps >= sigma * (1 - 1e-5)).sum()) - 1:2d}"
    editing = catch(em, target_calls, step_of)
    tiny.sample(em, epos, seed=1, negative=negative)

    def replay(override, func, a, k):
        steps: dict = {}  # sigma -> step, which a run's first call of each model evaluation finds

        def call():  # a fresh evaluation of the call's sigma, as the sampler opens one
            occurrences = override.controller.occurrences = type(override.controller.occurrences)()
            occurrences.steps = steps
            occurrences.begin(float(k["transformer_options"]["sigmas"].flatten()[0]))
            return override(func, *a, **k)
        return call

    print(f"{args.model}, cfg {cfg}, process CPU time, median of {repeat} replays of one call")
    for (name, block), (func, a, k) in sorted(source_calls.items()):  # the store keeps each replay's copies too
        plain, rec = timed_ms(lambda: func(*a, **k), repeat), timed_ms(replay(recording, func, a, k), repeat)
        print(f"  {block:6s} {name:8s} plain call {plain:9.3f} ms   recorded call {rec:9.3f} ms  {rec / plain:5.2f}x")
    editing.controller.sample_sigmas = steps  # as during the target's run
    for (name, block), (func, a, k) in sorted(target_calls.items()):
        if not editing.controller.needs_source(int(name.split()[1])):  # a run leaves the override out here
            print(f"  {block:6s} {name:8s} past the windows: ComfyUI's attention, without the override")
            continue
        plain, edit = timed_ms(lambda: func(*a, **k), repeat), timed_ms(replay(editing, func, a, k), repeat)
        print(f"  {block:6s} {name:8s} plain call {plain:9.3f} ms   edited call {edit:9.3f} ms  {edit / plain:5.2f}x")


if __name__ == "__main__":
    main()
