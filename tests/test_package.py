"""What the registry package holds: the files `comfy node pack` ships (git-tracked files less the
.comfyignore patterns) are the nodes and what they need, and a copy of exactly those files, installed
as a custom node of the real ComfyUI server, registers every node and runs an edit."""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import pytest

import graphs

REPO = pathlib.Path(__file__).resolve().parents[1]
PACK_NODES = {"AttentionStore", "P2PReplace", "P2PRefine", "P2PReweight", "P2PLocalBlend", "FPESelfAttnInject",
              "DDIMInvert", "NullTextInversion", "AttentionMapPreview"}


def ignore_patterns() -> list[str]:
    lines = [l.strip() for l in (REPO / ".comfyignore").read_text().splitlines()]
    patterns = [l for l in lines if l and not l.startswith("#")]
    # this test reads the subset of gitignore syntax the file uses: folders ("dir/") and exact paths
    assert all(not set(p) & set("*?[!") for p in patterns), f"a wildcard in .comfyignore: extend this test: {patterns}"
    return patterns


def packaged_files() -> list[str]:
    """git ls-files less .comfyignore (what comfy-cli's zip_files packs)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    patterns = ignore_patterns()

    def ignored(path: str) -> bool:
        for p in patterns:
            if p.endswith("/") and (path.startswith(p) or f"/{p}" in f"/{path}"):
                return True
            if not p.endswith("/") and (path == p.lstrip("/") or (("/" not in p) and path.rsplit("/", 1)[-1] == p)):
                return True
        return False

    return sorted(p for p in tracked.splitlines() if not ignored(p))


def test_the_package_holds_the_nodes_and_the_examples_not_the_development_files():
    files = packaged_files()
    assert {"LICENSE", "README.md", "pyproject.toml", "__init__.py", "nodes/__init__.py",
            "attention/__init__.py"} <= set(files)
    for folder in ("nodes", "attention"):
        assert {p.relative_to(REPO).as_posix() for p in (REPO / folder).glob("*.py")} <= set(files)
    examples = {p.name for p in (REPO / "workflows").glob("*.json")}
    assert examples and {f"workflows/{n}" for n in examples} <= set(files)
    assert {f"workflows/{n[:-5]}.jpg" for n in examples} <= set(files), "every example's thumbnail"
    for dev in ("demo_model/", "tests/", "tools/", ".ci/", "workflows/demo/", "workflows/api/"):
        assert not [p for p in files if p.startswith(dev)], f"{dev} is shipped"
    size = sum((REPO / p).stat().st_size for p in files)
    assert size < 2_000_000, f"the package holds {size / 1e6:.1f} MB"


@pytest.fixture(scope="module")
def packaged_server(tmp_path_factory):
    """ComfyUI with a copy of only the packaged files as its custom node (and the demo-model loader)."""
    import comfyui_env

    root = tmp_path_factory.mktemp("package")
    pack = root / "custom_nodes" / "attention-edit-packaged"
    for rel in packaged_files():
        (pack / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, pack / rel)
    config = root / "extra_model_paths.yaml"
    config.write_text(f"packaged:\n  custom_nodes: {root / 'custom_nodes'}\n")
    module = comfyui_env.server_module()
    extra = ("--extra-model-paths-config", str(config), "--disable-all-custom-nodes", "--whitelist-custom-nodes",
             "attention-edit-packaged", "comfyui-attention-edit-demo-model")
    server = module.ComfyServer(root / "server", extra_args=extra, only_pack_nodes=False).start(timeout=90)
    try:
        yield server
    finally:
        server.stop()


def test_the_packaged_copy_registers_every_node_and_runs_an_edit(packaged_server):
    info = packaged_server.object_info()
    assert PACK_NODES <= set(info), f"missing: {PACK_NODES - set(info)}\n{packaged_server.log_tail()}"
    modules = {info[n]["python_module"] for n in PACK_NODES}
    assert modules == {"custom_nodes.attention-edit-packaged"}, modules  # the copy, not the repo
    graph = graphs.edit_graph("replace", "a red circle", "a blue circle", 1, steps=4)
    entry = packaged_server.run(graph, timeout=120)
    assert packaged_server.images(entry, graphs.EDITED_SAVE), json.dumps(entry.get("status"))[:500]
