"""The optimisation loop both demo models train with (train_tinysd.py, train_tinyflux.py).

Resumable from a state file, linear warm-up then cosine decay, gradient clipping at 1, an EMA of
the weights (what ships), a log, and caption accuracy every so often: the loss falls long before
a model follows its captions.
"""
from __future__ import annotations

import math
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import safetensors.torch
import torch

PREFIX = "model.diffusion_model."  # where a checkpoint holds the denoiser


@dataclass
class Schedule:
    lr: float
    steps: int  # the cosine's length (a run may stop earlier)
    floor: float = 0.0  # the fraction of lr the cosine ends at
    warmup: int = 200

    def at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        return self.lr * warm * ((1 + self.floor) / 2 + (1 - self.floor) / 2 * math.cos(math.pi * step / self.steps))


@dataclass
class Run:
    net: torch.nn.Module
    name: str  # the network's key in the state file
    state_path: pathlib.Path
    log_name: str
    save_every: int
    eval_every: int  # 0: never
    ema_decay: float = 0.999
    init_from: str | None = None  # a checkpoint whose denoiser starts a new run


def caption_check(build: Callable[[], torch.nn.Module], accuracy: Callable[[torch.nn.Module], tuple[float, float]],
                  how: str) -> Callable[[dict], str]:
    """An `evaluate` for train(): the caption accuracy (colour, shape) of the EMA weights in a new network."""
    def evaluate(ema: dict) -> str:
        live = build()
        live.load_state_dict(ema)
        live.eval()
        colour, shape = accuracy(live)
        return f"caption accuracy (EMA, {how}): colour {colour:.2f} shape {shape:.2f}"
    return evaluate


def train(run: Run, schedule: Schedule, loss_at: Callable[[int], torch.Tensor],
          export: Callable[[dict], None], evaluate: Callable[[dict], str], stop: int | None = None) -> None:
    """Optimises run.net on loss_at(step) until `stop` (default: the schedule's end); every
    save_every steps writes the state and export(EMA weights), every eval_every logs evaluate(EMA)."""
    net, state_path = run.net, pathlib.Path(run.state_path)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=schedule.lr, weight_decay=0.0)
    step = 0
    if run.init_from and not state_path.exists():
        weights = safetensors.torch.load_file(run.init_from)
        net.load_state_dict({k[len(PREFIX):]: v.float() for k, v in weights.items() if k.startswith(PREFIX)})
        ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
        print(f"initialised from {run.init_from}", flush=True)
    if state_path.exists():
        st = torch.load(state_path, weights_only=True)
        net.load_state_dict(st[run.name])
        opt.load_state_dict(st["opt"])
        ema, step = st["ema"], st["step"]
        print(f"resumed at step {step}", flush=True)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    stop = min(schedule.steps, stop or schedule.steps)
    with open(state_path.parent / run.log_name, "a") as log:
        def note(msg: str) -> None:
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()

        t0 = time.time()
        while step < stop:
            for group in opt.param_groups:
                group["lr"] = schedule.at(step)
            loss = loss_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            decay = min(run.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.is_floating_point() else ema[k].copy_(v)
            if step % 50 == 0:
                note(f"step {step} loss {loss.item():.4f} {(time.time() - t0) / 50:.2f}s/step")
                t0 = time.time()
            if step % run.save_every == 0 or step == stop:
                torch.save({run.name: net.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step}, state_path)
                export(ema)
            if run.eval_every and (step % run.eval_every == 0 or step == stop):
                note(f"step {step} {evaluate(ema)}")
                t0 = time.time()
