"""tools/train_tinysd.py as a subprocess: checkpoint layout, resume, determinism (needs the ComfyUI
that tools/setup.sh prepared; a few optimiser steps on CPU)."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "train_tinysd.py"
PREFIXES = ("model.diffusion_model.", "cond_stage_model.transformer.text_model.", "first_stage_model.taesd_encoder.")


def start(folder: pathlib.Path, steps: int) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT), "--steps", str(steps), "--batch", "4", "--save-every", "3",
           "--eval-every", "3", "--state", str(folder / "s.pt"), "--out", str(folder / "m.safetensors")]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("train_tinysd.py did not finish in 400 s")
    assert proc.returncode == 0, f"train_tinysd.py failed ({proc.returncode}):\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two fresh 3-step runs with the same seed (in parallel), then the first resumed to step 4."""
    base = tmp_path_factory.mktemp("train")
    a, b = base / "a", base / "b"
    procs = [start(a, 3), start(b, 3)]
    outs = [finish(p) for p in procs]
    ckpt_a, ckpt_b = load_file(str(a / "m.safetensors")), load_file(str(b / "m.safetensors"))
    state_a = torch.load(a / "s.pt", weights_only=True)
    state_b = torch.load(b / "s.pt", weights_only=True)
    resumed_dir = base / "resumed"
    shutil.copytree(a, resumed_dir)
    resumed_out = finish(start(resumed_dir, 4))
    return {"outs": outs, "ckpt_a": ckpt_a, "ckpt_b": ckpt_b, "state_a": state_a, "state_b": state_b,
            "resumed_out": resumed_out, "resumed_state": torch.load(resumed_dir / "s.pt", weights_only=True),
            "resumed_ckpt": load_file(str(resumed_dir / "m.safetensors"))}


def test_checkpoint_layout(runs):
    ckpt = runs["ckpt_a"]
    for prefix in PREFIXES:
        assert any(k.startswith(prefix) for k in ckpt), f"no key starts with {prefix}"
    assert all(k.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")) for k in ckpt)
    unet = {k: v for k, v in ckpt.items() if k.startswith("model.diffusion_model.")}
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in unet
    assert all(v.dtype == torch.float16 for v in unet.values())
    assert all(torch.isfinite(v.float()).all() for v in ckpt.values())
    # the exported UNet is the EMA of the state
    ema = runs["state_a"]["ema"]
    for k, v in ema.items():
        assert torch.equal(unet["model.diffusion_model." + k], v.half()), k
    assert "step 3 caption accuracy" in runs["outs"][0]


def test_resume(runs):
    assert runs["state_a"]["step"] == 3
    assert "resumed at step 3" in runs["resumed_out"]
    assert "resumed" not in runs["outs"][0] and "resumed" not in runs["outs"][1]
    assert runs["resumed_state"]["step"] == 4
    assert "step 4 caption accuracy" in runs["resumed_out"]
    # one more optimiser step moved the weights
    before, after = runs["state_a"]["unet"], runs["resumed_state"]["unet"]
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert set(runs["resumed_ckpt"]) == set(runs["ckpt_a"])


def test_deterministic(runs):
    a, b = runs["ckpt_a"], runs["ckpt_b"]
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ between two runs with the same seed, e.g. {different[:3]}"
    sa, sb = runs["state_a"]["unet"], runs["state_b"]["unet"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and training did change the weights (3 steps from the same initialisation)
    init_zero = "out.2.weight"  # zero-initialised output conv
    assert not torch.equal(sa[init_zero], torch.zeros_like(sa[init_zero]))
