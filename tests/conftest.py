"""Fixtures: ComfyUI in-process (fast tests) and the real ComfyUI server (end-to-end tests).

Both use the ComfyUI that tools/setup.sh prepared (or COMFYUI_PATH) with this pack and the
TinySD demo-model loader installed as custom nodes. No part of ComfyUI is mocked.
"""
from __future__ import annotations

import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def comfy_nodes():
    """ComfyUI's NODE_CLASS_MAPPINGS with this pack and the demo-model loader loaded in-process."""
    import inproc

    return inproc.node_classes()


@pytest.fixture(scope="session")
def tiny(comfy_nodes):
    """(MODEL, CLIP, VAE) of TinySD, loaded by the demo loader node."""
    return comfy_nodes["TinySDCheckpointLoader"].execute().result


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The real ComfyUI server (tests/server.py) in a subprocess, with this pack and the TinySD
    loader; its output/input/temp folders and its log (server.log_path) are in a pytest tmp dir."""
    import comfyui_env

    s = comfyui_env.server_module().ComfyServer(tmp_path_factory.mktemp("comfyui-server")).start(timeout=90)
    try:
        yield s
    finally:
        s.stop()


def batch_noise_floor(tiny, sampler: str, prompt: str, rows: int = 2, batches=(4, 6)) -> float:
    """How far float32 rounding alone moves a sample when the model's batch changes shape: the same
    `rows` rows (same seed, same noise) sampled in a batch of `rows` and inside larger batches (a
    recomputing target's model batch holds the source's rows too; ConditioningCombine doubles the
    cond rows). CPUs round batch-shaped sums differently (AVX2 vs AVX-512), so a comparison of two
    paths that differ in batch shape is bounded by a multiple of this floor, measured on the machine
    that runs the test."""
    pos = tiny.encode(prompt)
    alone = tiny.sample(tiny.model, pos, seed=3, batch=rows, sampler=sampler)["samples"]
    return max(float((tiny.sample(tiny.model, pos, seed=3, batch=b, sampler=sampler)["samples"][:rows] - alone)
                     .abs().max()) for b in batches)
