"""Put the project's ComfyUI on sys.path for scripts and tests (no ComfyUI globals are changed
beyond its own command-line defaults: CPU when there is no CUDA, PyTorch SDPA attention)."""
from __future__ import annotations

import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def comfyui_path() -> pathlib.Path:
    if os.environ.get("COMFYUI_PATH"):
        return pathlib.Path(os.environ["COMFYUI_PATH"]).resolve()
    recorded = REPO / ".comfyui" / "path"
    if recorded.exists():
        return pathlib.Path(recorded.read_text().strip())
    return REPO / ".comfyui" / "ComfyUI"


def setup(cpu: bool | None = None) -> pathlib.Path:
    """Import path and CLI defaults for an in-process ComfyUI; returns its folder."""
    path = comfyui_path()
    if not (path / "comfy").is_dir():
        raise SystemExit(f"ComfyUI not found at {path}: run tools/setup.sh first (or set COMFYUI_PATH)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    demo = str(REPO / "demo_model")
    if demo not in sys.path:
        sys.path.insert(1, demo)
    import torch
    import comfy.cli_args

    comfy.cli_args.args.cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    comfy.cli_args.args.use_pytorch_cross_attention = True
    return path


def server_module():
    """tests/server.py (the real-server harness), imported by path under its own name: ComfyUI has
    a top-level module called `server` too."""
    import importlib.util

    name = "attn_edit_comfy_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "server.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]
