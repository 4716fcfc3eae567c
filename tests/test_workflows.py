"""The example workflows in workflows/: well-formed for ComfyUI's frontend, consistent with the
nodes' object_info, equal to their API versions, reproducible by tools/make_workflows.py, and
accepted (demo ones: executed) by ComfyUI's own validation and executor, in-process."""
from __future__ import annotations

import asyncio
import json
import pathlib
import uuid

import pytest

import make_workflows as mw

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
UI_FILES = sorted(p for p in WORKFLOWS.rglob("*.json") if "api" not in p.relative_to(WORKFLOWS).parts)
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))
# Combos listing the user's model files: the value names a file the user supplies.
FILE_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"): (".safetensors", ".ckpt"), ("LoadImage", "image"): (".png",)}
SD15_CHECKPOINT, SDXL_CHECKPOINT = "v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"
FLOW_CHECKPOINTS = ("flux1-dev-fp8.safetensors", "sd3.5_large_fp8_scaled.safetensors")
SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced")


def rel(path: pathlib.Path) -> str:
    return path.relative_to(WORKFLOWS).as_posix()


@pytest.fixture(scope="session")
def object_info(comfy_nodes):
    return mw.object_info()


def load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def test_the_expected_workflows_are_there():
    expected = set(mw.example_graphs())
    assert {rel(p) for p in UI_FILES} >= expected
    assert {rel(p) for p in API_FILES} >= {mw.api_path(r) for r in expected}
    assert len(expected) == 29
    top = {rel(p) for p in UI_FILES if p.parent == WORKFLOWS}
    assert top == {f"{t}.json" for t in mw.TITLES.values()}, "top-level workflows are titled (the templates browser shows the name)"
    for name in top:  # the templates browser shows <name>.jpg beside each one
        assert (WORKFLOWS / name).with_suffix(".jpg").exists(), f"no thumbnail for {name}: make_workflows.py --thumbnails"


def test_every_node_of_the_pack_is_in_an_example(object_info):
    import node_reference
    used = {n["type"] for p in UI_FILES if p.parent == WORKFLOWS for n in load(p)["nodes"]}
    assert set(node_reference.pack_nodes(object_info)) <= used, set(node_reference.pack_nodes(object_info)) - used
    sdxl = {n["type"] for p in UI_FILES if "(SDXL)" in p.name for n in load(p)["nodes"]}
    assert {"P2PReplace", "FPESelfAttnInject", "DDIMInvert", "NullTextInversion"} <= sdxl


@pytest.mark.parametrize("path", [p for p in UI_FILES if p.parent == WORKFLOWS], ids=rel)
def test_top_level_examples_guide_the_user(path):
    """A note saying what to change, a group per branch holding its sampler, one seed/steps/cfg
    source linked to both samplers, and the checkpoint's download address."""
    wf = load(path)
    notes = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    assert notes and "What to change" in notes[0]["widgets_values"][0]
    groups = {g["title"].split(":")[0]: g["bounding"] for g in wf["groups"]}
    assert {"Source branch", "Target branch"} <= set(groups)
    samplers = [n for n in wf["nodes"] if n["type"] in SAMPLERS]
    assert len(samplers) == 2
    for sampler in samplers:
        x, y, w, h = groups["Source branch" if "source" in sampler["title"] else "Target branch"]
        assert x <= sampler["pos"][0] < x + w and y <= sampler["pos"][1] < y + h, sampler["title"]
    links = {link[0]: link for link in wf["links"]}
    by_id = {n["id"]: n for n in wf["nodes"]}
    settings = [n for n in wf["nodes"] if n["type"] in SAMPLERS + ("CFGGuider", "BasicScheduler")]
    for name in ("steps", "cfg") + (("seed",) if samplers[0]["type"] == "KSampler" else ()):
        sources = {by_id[links[i["link"]][1]]["type"] + str(links[i["link"]][1]) for s in settings
                   for i in s["inputs"] if i["name"] == name and i.get("link") is not None}
        assert len(sources) == 1 and "Primitive" in next(iter(sources)), (name, sources)
    loader = next(n for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple")
    (model,) = loader["properties"]["models"]
    assert model["name"] == loader["widgets_values"][0] and model["directory"] == "checkpoints"
    assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith(model["name"])


def check_widget_value(node_type: str, name: str, spec: list, value, where: str) -> None:
    t, opts = mw.input_type(spec), mw.input_options(spec)
    if t == "COMBO":
        if (node_type, name) in FILE_COMBOS:
            assert isinstance(value, str) and value.endswith(FILE_COMBOS[(node_type, name)]), where
        else:
            assert value in mw.combo_values(spec), f"{where}: {value!r} not in {mw.combo_values(spec)}"
    elif t == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
        assert opts.get("min", -float("inf")) <= value <= opts.get("max", float("inf")), f"{where}: {value} out of range"
    elif t == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a FLOAT"
        assert opts.get("min", -float("inf")) <= value <= opts.get("max", float("inf")), f"{where}: {value} out of range"
    elif t == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"
    elif t == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a BOOLEAN"
    else:
        pytest.fail(f"{where}: no check for widget type {t}")


@pytest.mark.parametrize("path", UI_FILES, ids=rel)
def test_ui_workflow_is_consistent_with_object_info(path, object_info):
    wf = load(path)
    assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"} <= set(wf)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    links = {link[0]: link for link in wf["links"]}
    assert len(links) == len(wf["links"]), "duplicate link ids"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(links, default=0)

    for node in wf["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in mw.FRONTEND_ONLY:  # a note: one text widget, no sockets
            assert not node["inputs"] and not node["outputs"] and len(node["widgets_values"]) == 1, where
            continue
        assert node["type"] in object_info, f"{where}: unknown node type"
        info = object_info[node["type"]]
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values"} <= set(node), where
        assert node["properties"]["Node name for S&R"] == node["type"]
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
        specs = {n: (s, opt) for n, s, opt in mw.ordered_inputs(info)}
        # sockets: every required one connected, each slot's link arrives at this node and slot
        connected = set()
        for slot_index, slot in enumerate(node["inputs"]):
            assert slot["name"] in specs, f"{where}: no input '{slot['name']}'"
            spec, _ = specs[slot["name"]]
            assert slot["type"] == mw.input_type(spec), f"{where}: input '{slot['name']}' type"
            assert mw.is_widget(spec) == ("widget" in slot), f"{where}: '{slot['name']}' widget flag"
            if slot["link"] is not None:
                link = links[slot["link"]]
                assert (link[3], link[4]) == (node["id"], slot_index), f"{where}: link {link[0]} target"
                connected.add(slot["name"])
        for name, (spec, optional) in specs.items():
            if not mw.is_widget(spec) and not optional:
                assert name in connected, f"{where}: required input '{name}' is not connected"
        # outputs: as object_info says, with the links that leave them
        assert len(node["outputs"]) == len(info["output"]), where
        for slot_index, out in enumerate(node["outputs"]):
            assert out["type"] == info["output"][slot_index] and out["name"] == info["output_name"][slot_index]
            leaving = sorted(l[0] for l in wf["links"] if (l[1], l[2]) == (node["id"], slot_index))
            assert sorted(out["links"] or []) == leaving, f"{where}: output {slot_index} links"
        # widgets: count, order and values as the frontend reads them
        values = list(node["widgets_values"])
        assert len(values) == sum(count for _, _, count in mw.widget_slots(info)), f"{where}: widgets_values count"
        for name, spec, count in mw.widget_slots(info):
            check_widget_value(node["type"], name, spec, values[0], f"{where}: widget '{name}'")
            expected_extra = ["image"] if mw.input_options(spec).get("image_upload") else None  # upload button
            for extra in values[1:count]:
                if expected_extra:
                    assert [extra] == expected_extra, f"{where}: upload widget of '{name}': {extra!r}"
                else:
                    assert extra in mw.CONTROL_VALUES or extra == "", f"{where}: control value of '{name}': {extra!r}"
            values = values[count:]

    for link_id, from_node, from_slot, to_node, to_slot, link_type in wf["links"]:
        assert from_node in nodes and to_node in nodes, f"link {link_id}: missing node"
        out_type = object_info[nodes[from_node]["type"]]["output"][from_slot]
        in_slot = nodes[to_node]["inputs"][to_slot]
        to_specs = {n: s for n, s, _ in mw.ordered_inputs(object_info[nodes[to_node]["type"]])}
        in_type = mw.input_type(to_specs[in_slot["name"]])
        assert in_slot["link"] == link_id, f"link {link_id}: target slot does not hold it"
        assert link_type == out_type == in_type, f"link {link_id}: {out_type} -> {in_type} (link says {link_type})"


@pytest.mark.parametrize("path", UI_FILES, ids=rel)
def test_ui_to_api_round_trip_equals_the_api_file(path, object_info):
    api_file = WORKFLOWS / mw.api_path(rel(path))
    assert api_file.exists(), f"{rel(path)} has no API version {mw.api_path(rel(path))}"
    assert mw.ui_to_api(load(path), object_info) == load(api_file)
    assert mw.undecorated(mw.api_to_ui(load(api_file), object_info)) == mw.undecorated(load(path))


@pytest.mark.parametrize("path", [p for p in UI_FILES if rel(p) in mw.example_graphs()], ids=rel)
def test_examples_sample_both_branches_alike(path, object_info):
    api = load(WORKFLOWS / mw.api_path(rel(path)))
    samplers = [n for n in api.values() if n["class_type"] in SAMPLERS]
    assert len(samplers) == 2
    settings = [{k: v for k, v in s["inputs"].items() if k not in ("model", "positive", "guider")} for s in samplers]
    assert settings[0] == settings[1], "source and target must use the same seed, latent, negative and settings"
    guiders = [api[s["inputs"]["guider"][0]]["inputs"] for s in samplers if "guider" in s["inputs"]]
    if guiders:  # SamplerCustomAdvanced (flow models): DDIMInvert's noise, one guidance and negative
        assert api[samplers[0]["inputs"]["noise"][0]]["class_type"] == "DDIMInvert"
        assert [{k: g[k] for k in ("negative", "cfg")} for g in guiders][0] == {k: guiders[1][k] for k in ("negative", "cfg")}
        return
    saves = sorted(n["inputs"]["filename_prefix"] for n in api.values() if n["class_type"] == "SaveImage")
    assert saves == ["p2p/edited", "p2p/source"]
    seed_at = {"KSampler": 0, "KSamplerAdvanced": 1}  # KSamplerAdvanced: add_noise, noise_seed, control
    seeds = [n["widgets_values"][seed_at[n["type"]]:seed_at[n["type"]] + 2] for n in load(path)["nodes"]
             if n["type"] in seed_at]
    assert seeds and all(control == "fixed" for _, control in seeds), "the seed must stay fixed between runs"
    shared = [n["widgets_values"] for n in load(path)["nodes"] if n["type"] == "PrimitiveInt"]
    assert shared and all(control == "fixed" for _, control in shared), "the shared seed/steps must stay fixed"


def test_regenerating_gives_the_committed_files(tmp_path, object_info):
    assert mw.main(["--out", str(tmp_path)]) == 0
    made = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert made, "make_workflows wrote nothing"
    for name in made:
        committed = WORKFLOWS / name
        assert committed.exists(), f"workflows/{name} is not committed: run tools/make_workflows.py"
        assert (tmp_path / name).read_text() == committed.read_text(), f"workflows/{name} is stale: rerun the script"


@pytest.fixture
def input_dir(tmp_path, comfy_nodes):
    """A ComfyUI input folder holding the images the real-image workflows load: ComfyUI's own
    example.png (SD1.5 workflows) and the demo image (TinySD ones)."""
    import shutil

    import folder_paths

    before = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    folder.mkdir()
    shutil.copy(pathlib.Path(before) / "example.png", folder / "example.png")
    shutil.copy(REPO / "demo_model" / "red_circle.png", folder / mw.DEMO_IMAGE)
    folder_paths.set_input_directory(str(folder))
    try:
        yield folder
    finally:
        folder_paths.set_input_directory(before)


@pytest.fixture
def sd15_checkpoint_name(tmp_path, comfy_nodes):
    """Placeholder files named like the SD1.5, SDXL, Flux and SD3.5 checkpoints, so validation sees them in the list."""
    import folder_paths

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / SD15_CHECKPOINT).write_bytes(b"")
    (folder / SDXL_CHECKPOINT).write_bytes(b"")
    for name in FLOW_CHECKPOINTS:
        (folder / name).write_bytes(b"")
    folder_paths.add_model_folder_path("checkpoints", str(folder))
    try:
        yield SD15_CHECKPOINT
    finally:
        folder_paths.folder_names_and_paths["checkpoints"][0].remove(str(folder))
        folder_paths.filename_list_cache.pop("checkpoints", None)


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_comfyui_validates_the_api_graph(path, sd15_checkpoint_name, input_dir):
    import execution

    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), load(path), None))
    assert ok and not node_errors, f"{error}\n{json.dumps(node_errors, indent=1)}"
    graph = load(path)
    assert sorted(outputs) == sorted(n for n, node in graph.items() if node["class_type"] in ("SaveImage", "PreviewImage"))


class _Server:
    """The three things PromptExecutor asks of ComfyUI's server."""
    client_id = None
    last_node_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append(event)


@pytest.fixture
def output_dir(tmp_path, comfy_nodes):
    import folder_paths

    before = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    try:
        yield tmp_path / "output"
    finally:
        folder_paths.set_output_directory(before)


@pytest.mark.parametrize("path", [p for p in API_FILES if p.stem.endswith(("_tinysd", "_tinyflux"))], ids=lambda p: p.name)
def test_demo_graph_executes(path, output_dir, input_dir):
    import execution

    server = _Server()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args={"ram": 0.0})
    prompt = load(path)
    ok, error, outputs, _ = asyncio.run(execution.validate_prompt("demo", prompt, None))
    assert ok, error
    executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
    failures = [m for m in executor.status_messages if m[0] != "execution_start" and "error" in m[0]]
    assert executor.success and not failures, failures
    saved = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*.png"))
    assert saved == ["p2p/edited_00001_.png", "p2p/source_00001_.png"], saved


def frontend_default_graph() -> dict:
    """The default workflow built into the installed frontend (a JS literal in its bundle), as JSON."""
    import shutil
    import subprocess

    frontend = pytest.importorskip("comfyui_frontend_package")
    if shutil.which("node") is None:
        pytest.skip("node is needed to read the frontend's default graph")
    marker = "defaultGraph={"
    for js in sorted((pathlib.Path(frontend.__file__).parent / "static" / "assets").glob("*.js")):
        text = js.read_text(errors="replace")
        start = text.find(marker)
        if start < 0:
            continue
        i, depth = start + len(marker) - 1, 0
        while True:  # the literal holds no braces inside strings
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        literal = text[start + len("defaultGraph="):i]
        out = subprocess.run(["node", "-e", f"process.stdout.write(JSON.stringify({literal}))"],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)
    pytest.skip("no defaultGraph in the installed frontend bundle")


def test_converter_matches_the_frontends_own_default_workflow(object_info):
    """The frontend's default graph (saved by the frontend itself) through ui_to_api and back:
    same widgets_values order (KSampler's seed followed by its control value), same input
    slots, same links (target slots index the socket inputs)."""
    ref = frontend_default_graph()
    api = mw.ui_to_api(ref, object_info)
    ks = next(n for n in api.values() if n["class_type"] == "KSampler")["inputs"]
    assert (ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]) == (20, 8, "euler", "normal", 1)
    again = {n["id"]: n for n in mw.api_to_ui(api, object_info)["nodes"]}
    for node in ref["nodes"]:
        mine = again[node["id"]]
        assert [(s["name"], s["type"]) for s in mine["inputs"]] == [(s["name"], s["type"]) for s in node.get("inputs", [])]
        assert [(s["name"], s["type"]) for s in mine["outputs"]] == [(s["name"], s["type"]) for s in node.get("outputs", [])]
        if "widgets_values" in node:
            controls = [i for i, v in enumerate(node["widgets_values"]) if isinstance(v, bool)]  # legacy `true`
            assert len(mine["widgets_values"]) == len(node["widgets_values"]), node["type"]
            assert [v for i, v in enumerate(mine["widgets_values"]) if i not in controls] == \
                [v for i, v in enumerate(node["widgets_values"]) if i not in controls], node["type"]
            assert all(mine["widgets_values"][i] in mw.CONTROL_VALUES for i in controls)
    mine_links = {tuple(l[1:]) for l in mw.api_to_ui(api, object_info)["links"]}
    assert mine_links == {tuple(l[1:]) for l in ref["links"]}


def test_every_input_and_output_of_the_pack_has_a_tooltip(object_info):
    import node_reference
    nodes = node_reference.pack_nodes(object_info)
    assert len(nodes) == 9
    for name, node in nodes.items():
        for inp, spec, _ in mw.ordered_inputs(node):
            assert mw.input_options(spec).get("tooltip"), f"{name}: input '{inp}' has no tooltip"
        assert all(node.get("output_tooltips") or [None]), f"{name}: an output has no tooltip"
        assert node.get("description"), name


def test_the_node_reference_is_up_to_date(object_info):
    import node_reference
    assert node_reference.OUT.read_text() == node_reference.render(object_info), \
        "docs/nodes.md is stale: run tools/node_reference.py"


def test_readme_and_docs_show_every_example_and_their_links_resolve():
    import re
    import urllib.parse

    top = [p for p in UI_FILES if p.parent == WORKFLOWS]
    for path in top:  # the picture of each top-level workflow in the newest frontend (tests/test_frontend.py)
        assert (REPO / "docs" / "screenshots" / f"{path.stem}.png").exists(), f"no docs/screenshots/{path.stem}.png"
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        for target in re.findall(r"\]\(((?:[^()\s]|\([^()\s]*\))+)\)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            local = (doc.parent / urllib.parse.unquote(target.split("#")[0])).resolve()
            assert local.exists(), f"{doc.relative_to(REPO)} links to {target}, which does not exist"
    readme = (REPO / "README.md").read_text()
    for path in top:
        assert path.stem in readme, f"the README's example table misses {path.stem}"
