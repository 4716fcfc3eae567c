"""Write the pack's example workflows (workflows/) from API-format graphs.

    OMP_NUM_THREADS=1 .venv/bin/python tools/make_workflows.py [--out DIR]

For each example it writes three files under DIR (default: the repo's workflows/):
  <name>_sd15.json            UI format (what ComfyUI's frontend loads; SD1.5 via CheckpointLoaderSimple)
  demo/<name>_tinysd.json     the same graph on the pack's demo model (TinySDCheckpointLoader)
  api/<stem>.json             the API format of each (what POST /prompt takes), for scripts and tests

`api_to_ui` converts any API graph into the frontend's workflow format using ComfyUI's
object_info (computed in-process, the same dict GET /object_info serves); `ui_to_api` converts
back the way the frontend's graphToPrompt does. Both follow frontend 1.32.9:
  * a node's inputs are created in object_info "input_order" (required, then optional); inputs
    whose type has a widget (INT, FLOAT, STRING, BOOLEAN, COMBO, ...) and no forceInput become
    widgets, all others become sockets;
  * widgets_values lists the widgets in that order; an INT widget with control_after_generate
    (or, when that option is absent, an INT named "seed"/"noise_seed") is followed by its
    "control after generate" value, a COMBO with control_after_generate by that value and a
    filter-list string;
  * inputs[] holds the sockets, and where a widget is linked (a widget converted to an input), then
    every widget's input in order, as the frontend creates them; a link's target slot indexes that list.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import json
import os
import pathlib
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported (see the README)
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import graphs  # noqa: E402
WORKFLOWS = REPO / "workflows"
FRONTEND_VERSION = "1.32.9"

# Input types the frontend renders as widgets (its ComfyWidgets registry; a list spec is a COMBO).
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "COLOR"}
UNSUPPORTED_WIDGET_TYPES = {"IMAGEUPLOAD", "IMAGECOMPARE", "CHART", "GALLERIA"}  # add widgets of their own
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")

# ----------------------------------------------------------------------------------------------
# object_info in-process


def _node_info(nodes_module, node_class: str) -> dict:
    """What ComfyUI 0.3.75's server.py `node_info` returns for GET /object_info (copied logic)."""
    from comfy_api.internal import _ComfyNodeInternal

    obj_class = nodes_module.NODE_CLASS_MAPPINGS[node_class]
    if issubclass(obj_class, _ComfyNodeInternal):
        return obj_class.GET_NODE_INFO_V1()
    info = {"input": obj_class.INPUT_TYPES()}
    info["input_order"] = {key: list(value.keys()) for key, value in obj_class.INPUT_TYPES().items()}
    info["output"] = obj_class.RETURN_TYPES
    info["output_is_list"] = getattr(obj_class, "OUTPUT_IS_LIST", [False] * len(obj_class.RETURN_TYPES))
    info["output_name"] = getattr(obj_class, "RETURN_NAMES", info["output"])
    info["name"] = node_class
    info["display_name"] = nodes_module.NODE_DISPLAY_NAME_MAPPINGS.get(node_class, node_class)
    info["description"] = getattr(obj_class, "DESCRIPTION", "")
    info["python_module"] = getattr(obj_class, "RELATIVE_PYTHON_MODULE", "nodes")
    info["category"] = getattr(obj_class, "CATEGORY", "sd")
    info["output_node"] = getattr(obj_class, "OUTPUT_NODE", False) is True
    return info


CORE_EXTRAS = ("nodes_primitive.py", "nodes_custom_sampler.py")  # ComfyUI's comfy_extras the examples use
# (PrimitiveInt, ...; SamplerCustomAdvanced and its guider, sampler and scheduler nodes for flow models)


def load_core_extras(nodes_module, comfyui: pathlib.Path) -> None:
    """Register CORE_EXTRAS in-process as ComfyUI's server does at start (init_extra_nodes)."""
    if "PrimitiveInt" in nodes_module.NODE_CLASS_MAPPINGS:
        return
    for name in CORE_EXTRAS:
        if not asyncio.run(nodes_module.load_custom_node(str(comfyui / "comfy_extras" / name), module_parent="comfy_extras")):
            raise SystemExit(f"ComfyUI failed to load comfy_extras/{name}")


@functools.lru_cache(maxsize=1)
def object_info() -> dict:
    """GET /object_info of ComfyUI's core nodes (nodes.py) + this pack + the demo-model loader,
    in-process. Of comfy_extras only CORE_EXTRAS are loaded: the examples use those and core nodes."""
    import comfyui_env

    path = comfyui_env.setup()
    import torch

    torch.set_num_threads(1)
    import nodes

    load_core_extras(nodes, path)
    for name, probe in (("comfyui-attention-edit", "AttentionStore"),
                        ("comfyui-attention-edit-demo-model", "TinySDCheckpointLoader")):
        if probe in nodes.NODE_CLASS_MAPPINGS:  # already loaded in this process (e.g. by the tests)
            continue
        folder = path / "custom_nodes" / name
        if not folder.exists():
            raise SystemExit(f"{folder} missing: run tools/setup.sh")
        if not asyncio.run(nodes.load_custom_node(str(folder))):
            raise SystemExit(f"ComfyUI failed to load {name}")
    out = {}
    for name in nodes.NODE_CLASS_MAPPINGS:
        try:  # like the server: a node whose info fails is left out
            out[name] = json.loads(json.dumps(_node_info(nodes, name)))
        except Exception:
            pass
    return out


# ----------------------------------------------------------------------------------------------
# input specs as the frontend sees them


def ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in the order the frontend creates them (getOrderedInputSpecs)."""
    inp = info.get("input", {})
    order = info.get("input_order") or {k: list(inp.get(k, {})) for k in ("required", "optional")}
    out = [(n, list(inp["required"][n]), False) for n in order.get("required", []) if n in inp.get("required", {})]
    out += [(n, list(inp["optional"][n]), True) for n in order.get("optional", []) if n in inp.get("optional", {})]
    seen = {n for n, _, _ in out}
    for section, optional in (("required", False), ("optional", True)):
        out += [(n, list(s), optional) for n, s in inp.get(section, {}).items() if n not in seen]
    return out


def input_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def input_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_values(spec: list) -> list:
    return spec[0] if isinstance(spec[0], list) else input_options(spec).get("options", [])


def is_widget(spec: list) -> bool:
    t = input_type(spec)
    if t in UNSUPPORTED_WIDGET_TYPES:
        raise NotImplementedError(f"widget type {t} is not supported by this converter")
    return t in WIDGET_TYPES and not input_options(spec).get("forceInput", False)


def extra_widget_values(name: str, spec: list) -> list:
    """Values of the widgets the frontend adds after this input's widget (none, or control ones)."""
    t, opts = input_type(spec), input_options(spec)
    if t == "INT":
        control = opts.get("control_after_generate")
        if control if control is not None else name in ("seed", "noise_seed"):
            return ["fixed"]
    if t == "COMBO" and opts.get("control_after_generate"):
        return ["fixed", ""]  # control value and its filter list
    if t == "COMBO" and opts.get("image_upload"):
        return ["image"]  # the upload button the frontend appends (LoadImage has no other widget after it)
    return []


def default_value(spec: list):
    opts = input_options(spec)
    if "default" in opts:
        return opts["default"]
    t = input_type(spec)
    if t == "COMBO":
        values = combo_values(spec)
        return values[0] if values else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(t)


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# ----------------------------------------------------------------------------------------------
# API <-> UI


def complete(api: dict, info: dict) -> dict:
    """The graph with every widget input it leaves out set to the node's default, and every node
    titled (_meta.title, the display name unless set), as the frontend's API export has them."""
    api = copy.deepcopy(api)
    for nid, node in api.items():
        if node["class_type"] not in info:
            raise ValueError(f"node {nid}: unknown node type {node['class_type']}")
        node.setdefault("_meta", {}).setdefault("title", info[node["class_type"]].get("display_name")
                                                or node["class_type"])
        for name, spec, optional in ordered_inputs(info[node["class_type"]]):
            if name not in node["inputs"] and is_widget(spec):  # optional widgets too: the frontend makes them
                value = default_value(spec)
                if value is None and optional:
                    continue
                if value is None:
                    raise ValueError(f"node {nid} ({node['class_type']}): input '{name}' has no default: set it")
                node["inputs"][name] = value
    return api


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(nid: str, stack: tuple = ()) -> int:
        if nid in stack:
            raise ValueError(f"the graph has a cycle through node {nid}")
        if nid not in depth:
            srcs = [v[0] for v in api[nid]["inputs"].values() if is_link(v)]
            depth[nid] = 1 + max((visit(s, stack + (nid,)) for s in srcs), default=-1)
        return depth[nid]

    for nid in api:
        visit(nid)
    return depth


def _node_size(title: str, n_sockets: int, widgets: list[tuple[str, list]]) -> list[int]:
    height = 26 + 22 * n_sockets
    for name, spec in widgets:
        multiline = input_type(spec) == "STRING" and input_options(spec).get("multiline")
        height += 96 if multiline else 24 * (1 + len(extra_widget_values(name, spec)))
    return [max(320, 9 * len(title) + 40), height + 10]


COLUMN_WIDTH, ROW_GAP, MARGIN = 400, 50, 50


def api_to_ui(api_graph: dict, object_info: dict) -> dict:
    """Frontend workflow (UI format, version 0.4) of an API-format graph.

    Node ids must be integers (as strings); a node's "_meta": {"title"} becomes its title.
    Widget inputs the graph leaves out take the node's default. Layout: one column per
    topological depth, nodes stacked in id order.
    """
    api = complete(api_graph, object_info)
    for nid, node in api.items():
        if not str(nid).isdigit():
            raise ValueError(f"node id '{nid}' is not an integer: the frontend's node ids are numbers")
        if node["class_type"] not in object_info:
            raise ValueError(f"node {nid}: unknown node type {node['class_type']}")
    ids = sorted(api, key=int)
    depth = _depths(api)
    exec_order = sorted(ids, key=lambda n: (depth[n], int(n)))

    ui_nodes, links = {}, []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid in ids:  # first pass: inputs and widgets; links get ids in (target node, slot) order
        node, info = api[nid], object_info[api[nid]["class_type"]]
        known = {n for n, _, _ in ordered_inputs(info)}
        unknown = set(node["inputs"]) - known
        if unknown:
            raise ValueError(f"node {nid} ({node['class_type']}): unknown inputs {sorted(unknown)}")
        sockets, widget_inputs, widgets_values = [], [], []
        specs = ordered_inputs(info)
        for name, spec, optional in specs:  # sockets first (the frontend adds them before widgets)
            if is_widget(spec):
                continue
            value = node["inputs"].get(name)
            if value is None and not optional:
                raise ValueError(f"node {nid} ({node['class_type']}): required input '{name}' is not connected")
            if value is not None and not is_link(value):
                raise ValueError(f"node {nid} ({node['class_type']}): input '{name}' takes a link, got {value!r}")
            slot = {"name": name, "type": input_type(spec), "link": None}
            if optional:
                slot["shape"] = 7
            sockets.append((slot, value))
        for name, spec, optional in specs:
            if not is_widget(spec):
                continue
            value = node["inputs"].get(name, default_value(spec))
            slot = {"name": name, "type": input_type(spec), "widget": {"name": name}, "link": None}
            widget_inputs.append((slot, value if is_link(value) else None))
            if is_link(value):  # a widget driven by a link: the widget keeps its default value
                value = default_value(spec)
            widgets_values.append(value)
            widgets_values += extra_widget_values(name, spec)
        if all(value is None for _, value in widget_inputs):
            widget_inputs = []  # no widget linked: only the sockets, as the frontend exports them
        # else every widget's input, as the frontend (1.3x) holds them: a link's slot indexes that list
        inputs = []
        for slot_index, (slot, value) in enumerate(sockets + widget_inputs):
            if value is not None:
                src, src_slot = value
                if src not in api:
                    raise ValueError(f"node {nid}: input '{slot['name']}' links to missing node {src}")
                link_id = len(links) + 1
                links.append([link_id, int(src), src_slot, int(nid), slot_index, slot["type"]])
                out_links.setdefault((src, src_slot), []).append(link_id)
                slot["link"] = link_id
            inputs.append(slot)
        title = node.get("_meta", {}).get("title") or info.get("display_name") or node["class_type"]
        widgets = [(n, s) for n, s, _ in specs if is_widget(s)]
        ui = {"id": int(nid), "type": node["class_type"], "pos": [0, 0],
              "size": _node_size(title, max(len(sockets), len(info.get("output", []))), widgets),
              "flags": {}, "order": exec_order.index(nid), "mode": 0, "inputs": inputs, "outputs": []}
        if title != (info.get("display_name") or node["class_type"]):
            ui["title"] = title
        ui["properties"] = {"Node name for S&R": node["class_type"]}
        ui["widgets_values"] = widgets_values
        ui_nodes[nid] = ui

    for nid in ids:  # outputs, now that the links are known
        info = object_info[api[nid]["class_type"]]
        names = info.get("output_name") or info.get("output", [])
        is_list = info.get("output_is_list") or [False] * len(info.get("output", []))
        for slot, out_type in enumerate(info.get("output", [])):
            out = {"name": names[slot], "type": "COMBO" if isinstance(out_type, list) else out_type,
                   "links": out_links.get((nid, slot), []), "slot_index": slot}
            if is_list[slot]:
                out["shape"] = 6
            ui_nodes[nid]["outputs"].append(out)
        for (src, slot) in out_links:
            if src == nid and slot >= len(info.get("output", [])):
                raise ValueError(f"a link reads output {slot} of node {nid}, which has {len(info['output'])} outputs")

    columns: dict[int, list[str]] = {}
    for nid in ids:
        columns.setdefault(depth[nid], []).append(nid)
    for d, column in columns.items():
        y = MARGIN
        for nid in column:
            ui_nodes[nid]["pos"] = [MARGIN + d * COLUMN_WIDTH, y]
            y += ui_nodes[nid]["size"][1] + ROW_GAP

    return {"last_node_id": max(int(n) for n in ids), "last_link_id": len(links),
            "nodes": [ui_nodes[n] for n in ids], "links": links, "groups": [], "config": {}, "extra": {},
            "version": 0.4}


def widget_slots(info: dict) -> list[tuple[str, list, int]]:
    """(input name, spec, number of widgets_values it takes) for each widget input, in order."""
    return [(n, s, 1 + len(extra_widget_values(n, s))) for n, s, _ in ordered_inputs(info) if is_widget(s)]


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API-format graph of a UI workflow, as the frontend's graphToPrompt builds it."""
    links = {link[0]: link for link in workflow["links"]}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    api = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) == 2 or node["type"] in FRONTEND_ONLY:  # muted, or a note: left out
            continue
        if node.get("mode", 0) != 0:
            raise NotImplementedError(f"node {node['id']}: mode {node['mode']} (bypass) is not supported")
        if node["type"] not in object_info:
            raise ValueError(f"node {node['id']}: unknown node type {node['type']}")
        info = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec, count in widget_slots(info):
            # a value the file leaves out keeps the widget's default (the frontend's configure does)
            inputs[name] = values[0] if values else default_value(spec)
            values = values[count:]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widgets_values left over")
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            link = links[slot["link"]]
            if link[1] in nodes and nodes[link[1]].get("mode", 0) == 0:
                inputs[slot["name"]] = [str(link[1]), link[2]]
            else:
                inputs.pop(slot["name"], None)
        title = node.get("title") or info.get("display_name") or node["type"]
        api[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    return api


# ----------------------------------------------------------------------------------------------
# the example graphs

SD15 = {"loader": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": graphs.SD15_CHECKPOINT}},
        "name": "SD1.5", **graphs.SD15_SETTINGS}
SDXL = {"loader": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": graphs.SDXL_CHECKPOINT}},
        "name": "SDXL", **graphs.SDXL_SETTINGS}
FLUX = {"loader": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": graphs.FLUX_CHECKPOINT}},
        "name": "Flux.1-dev", "flow": True, **graphs.FLUX_SETTINGS}
SD35 = {"loader": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": graphs.SD35_CHECKPOINT}},
        "name": "SD3.5", "flow": True, **graphs.SD35_SETTINGS}
TINYFLUX = {"loader": graphs.TINYFLUX, "name": "TinyFlux", "flow": True, "size": 128, "steps": 20,
            "cfg": graphs.TINYFLUX_CFG, "seed": 42, "scheduler": graphs.TINYFLUX_SCHEDULER, "p2p": graphs.TINYFLUX_P2P,
            "blend": {"threshold": 0.5, "dilate": 0}}
TINYSD = {"loader": {"class_type": "TinySDCheckpointLoader", "inputs": {}}, "name": "TinySD",
          "size": 128, "steps": 20, "cfg": 5.0, "seed": 42,
          # TinySD's colour words localise at 8x8 (level 1), not at P2P's 16x16; its shape nouns do not.
          # Its P2P schedule injects self-attention at 8x8 too (graphs.TINYSD_P2P says why): keep every layer.
          "store": {"token_map_level": "level 1", "self_attention_layers": "all"},
          "blend": {"threshold": 0.5, "dilate": 0}, "p2p": graphs.TINYSD_P2P, "map_layers": "level 1"}

# name -> (edit, sd15 prompts/settings, tinysd prompts/settings)
EXAMPLES = {
    "p2p_replace": ("replace", {"source": "a cat riding a bicycle", "target": "a cat riding a car"},
                    {"source": "a red circle", "target": "a blue circle"}),
    "p2p_refine": ("refine", {"source": "a cat riding a bicycle", "target": "a cat riding a red bicycle"},
                   {"source": "a red circle", "target": "a red circle on a black background"}),
    "p2p_reweight": ("reweight", {"source": "a fluffy cat riding a bicycle", "target": "a fluffy cat riding a bicycle",
                                  "weights": "fluffy=2.0"},
                     {"source": "a red circle", "target": "a red circle", "weights": "red=2.0"}),
    "p2p_local_blend": ("local_blend", {"source": "a cat riding a bicycle", "target": "a cat riding a car",
                                        "source_words": "bicycle", "target_words": "car", "map_words": "bicycle"},
                        {"source": "a red circle", "target": "a blue circle",
                         "source_words": "red", "target_words": "blue", "map_words": "red"}),
    "fpe": ("fpe", {"source": "a cat riding a bicycle", "target": "a cat riding a car"},
            {"source": "a red circle", "target": "a blue circle"}),
}
SDXL_EXAMPLES = {  # name -> (edit, prompts): SDXL versions of the generated-image edits
    "p2p_replace": ("replace", {"source": "a photo of a cat riding a bicycle", "target": "a photo of a cat riding a car"}),
    "fpe": ("fpe", {"source": "a photo of a cat riding a bicycle", "target": "a photo of a dog riding a bicycle"}),
}
FLOW_EXAMPLES = {  # name -> (edit, prompts, tinyflux prompts): the flow transformers' generated-image edits
    "p2p_replace": ("replace", {"source": "a photo of a cat riding a bicycle in a park",
                                "target": "a photo of a cat riding a motorcycle in a park"},
                    {"source": "a red circle", "target": "a blue circle"}),
    "fpe": ("fpe", {"source": "a photo of a cat riding a bicycle in a park",
                    "target": "a photo of a fox riding a bicycle in a park"},
            {"source": "a red circle", "target": "a blue circle"}),
}

# Titles of the top-level workflows: ComfyUI's templates browser shows the file name as the title.
TITLES = {
    "p2p_replace_sd15": "Prompt-to-Prompt word swap (SD1.5)",
    "p2p_refine_sd15": "Prompt-to-Prompt refine - add words (SD1.5)",
    "p2p_reweight_sd15": "Prompt-to-Prompt re-weight a word (SD1.5)",
    "p2p_local_blend_sd15": "Prompt-to-Prompt local blend and attention map (SD1.5)",
    "fpe_sd15": "Free-Prompt-Editing (SD1.5)",
    "real_fpe_sd15": "Edit a real image - Free-Prompt-Editing (SD1.5)",
    "real_p2p_local_blend_sd15": "Edit a real image - Prompt-to-Prompt local blend (SD1.5)",
    "p2p_replace_sdxl": "Prompt-to-Prompt word swap (SDXL)",
    "fpe_sdxl": "Free-Prompt-Editing (SDXL)",
    "real_p2p_null_text_sdxl": "Edit a real image - Prompt-to-Prompt with null-text inversion (SDXL)",
    "p2p_replace_flux": "Prompt-to-Prompt word swap (Flux.1-dev)",
    "fpe_flux": "Free-Prompt-Editing (Flux.1-dev)",
    "p2p_replace_sd35": "Prompt-to-Prompt word swap (SD3.5)",
    "fpe_sd35": "Free-Prompt-Editing (SD3.5)",
    "real_fpe_flux": "Edit a real image - Free-Prompt-Editing (Flux.1-dev)",
    "real_p2p_local_blend_flux": "Edit a real image - Prompt-to-Prompt local blend (Flux.1-dev)",
    "real_fpe_sd35": "Edit a real image - Free-Prompt-Editing (SD3.5)",
    "real_p2p_local_blend_sd35": "Edit a real image - Prompt-to-Prompt local blend (SD3.5)",
}
# The demo output (tools/demo.py, out/demo/<name>_{source,edited}.png) each top-level workflow's thumbnail shows.
THUMBNAIL_DEMO = {"p2p_replace": "replace_color", "p2p_refine": "refine_background", "p2p_reweight": "reweight",
                  "p2p_local_blend": "local_blend", "fpe": "fpe", "real_fpe": "real_fpe",
                  "real_p2p_local_blend": "real_p2p_blend", "real_p2p_null_text": "real_p2p_blend"}

# What the UI adds to a graph: groups (one per branch) and notes. Not part of the API format.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
GROUP_COLORS = {"shared": "#b58b2a", "inversion": "#a1309b", "source": "#3f789e", "target": "#8A8"}


class _Graph:
    """An API graph being built, with where each node goes in the UI: (group, column)."""

    def __init__(self, groups: list[tuple[str, str, int]]):
        self.nodes: dict[str, dict] = {}
        self.place: dict[str, tuple[str, int]] = {}
        self.groups = groups  # (key, title, row): groups of one row sit side by side
        self.notes: list[tuple[str, int, str]] = []  # (group, column, markdown)
        self.models: list[dict] = []

    def add(self, class_type: str, title: str | None = None, at: tuple[str, int] = ("shared", 0), **inputs) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"inputs": inputs, "class_type": class_type}
        if title:
            self.nodes[nid]["_meta"] = {"title": title}
        self.place[nid] = at
        return nid

    def note(self, at: tuple[str, int], text: str) -> None:
        self.notes.append((at[0], at[1], text))


def _loader(g: _Graph, model: dict) -> str:
    loader = g.add(model["loader"]["class_type"], at=("shared", 1), **model["loader"]["inputs"])
    ckpt = model["loader"]["inputs"].get("ckpt_name")
    if ckpt in graphs.CHECKPOINT_URLS:
        g.models.append({"name": ckpt, "url": graphs.CHECKPOINT_URLS[ckpt], "directory": "checkpoints"})
    return loader


def _settings(g: _Graph, model: dict, seed: bool = True) -> dict:
    """One seed, steps and cfg for both samplers (PrimitiveInt/PrimitiveFloat linked to their inputs)."""
    out = {}
    if seed:
        out["seed"] = [g.add("PrimitiveInt", "seed (both branches)", at=("shared", 2), value=model["seed"]), 0]
    out["steps"] = [g.add("PrimitiveInt", "steps (both branches)", at=("shared", 2), value=model["steps"]), 0]
    out["cfg"] = [g.add("PrimitiveFloat", "cfg (both branches)", at=("shared", 2), value=model["cfg"]), 0]
    return out


def _model_hint(model: dict) -> str:
    ckpt = model["loader"]["inputs"].get("ckpt_name")
    if ckpt is None:
        return f"The demo model ({model['name']}) ships with the pack's repository; nothing to download."
    hint = (f"**Checkpoint:** any {model['name']} checkpoint (`{ckpt}` is the one this example names; "
            f"the frontend offers its download).")
    if model["name"] == "Flux.1-dev":
        hint += (" Flux.1-dev's guidance is distilled: cfg stays 1 (its guidance, 3.5 by default, can be set with "
                 "FluxGuidance on both positive prompts); the negative prompt is then unused.")
    return hint


SAME_SETTINGS = ("**Both branches must sample alike:** the seed, steps and cfg come from the three nodes on "
                 "the right, linked to both samplers; keep `sampler_name` and `scheduler` equal in both "
                 "KSamplers. The pack refuses a target that samples differently.")


def _edit_note(edit: str, model: dict) -> str:
    what = {"replace": "swap a word (same number of words in both prompts): *cat riding a bicycle → car*",
            "refine": "add or remove words: *a cat riding a **red** bicycle*",
            "reweight": "strengthen or weaken a word: `weights` such as `fluffy=2.0` (c from -2 to 2)",
            "local_blend": "swap a word and keep everything outside its region exactly as in the source "
                           "(P2P Local Blend); the Attention Map Preview shows where a word sits",
            "fpe": "write any new prompt (Free-Prompt-Editing keeps the source's layout)"}[edit]
    return "\n\n".join([
        f"## Edit an image by editing its prompt ({model['name']})",
        "The **source branch** (blue) generates the original image and records its attention; the "
        "**target branch** (green) generates the edit with the same noise, reusing that attention.",
        f"**What to change:** the source prompt (Attention Store) and the target prompt "
        f"({'Target prompt node' if edit == 'fpe' else 'edit node'}): {what}.",
        _model_hint(model), SAME_SETTINGS,
        "Changing only the target prompt re-runs only the target branch."])


def edit_graph(edit: str, prompts: dict, model: dict) -> _Graph:
    """Source branch (AttentionStore -> KSampler) and target branch (edit node -> KSampler), one seed,
    steps and cfg for both, one negative prompt; both decoded and saved. Unset widgets keep the nodes'
    defaults."""
    g = _Graph([("shared", "Model, negative prompt, size and the settings both branches share", 0),
                ("source", "Source branch: the original image (records its attention)", 1),
                ("target", "Target branch: the edited image", 1)])
    loader = _loader(g, model)
    latent = g.add("EmptyLatentImage", at=("shared", 1), width=model["size"], height=model["size"], batch_size=1)
    negative = g.add("CLIPTextEncode", "Negative prompt (both branches)", at=("shared", 1), text="", clip=[loader, 1])
    shared = _settings(g, model)
    g.note(("shared", 0), _edit_note(edit, model))
    store = g.add("AttentionStore", at=("source", 0), model=[loader, 0], clip=[loader, 1],
                  source_prompt=prompts["source"], **model.get("store", {}))
    sampling = dict(seed=shared["seed"], steps=shared["steps"], cfg=shared["cfg"], sampler_name="euler",
                    scheduler=model.get("scheduler", "normal"), denoise=1.0)
    source = g.add("KSampler", "KSampler (source)", at=("source", 1), model=[store, 0], positive=[store, 1],
                   negative=[negative, 0], latent_image=[latent, 0], **sampling)
    decoded = g.add("VAEDecode", "VAE Decode (source)", at=("source", 1), samples=[source, 0], vae=[loader, 2])
    g.add("SaveImage", "Save Image (source)", at=("source", 2), images=[decoded, 0], filename_prefix="p2p/source")
    if "map_words" in prompts:  # where a word of the source prompt sits (what local blend's mask is made of)
        preview = g.add("AttentionMapPreview", at=("source", 0), store=[store, 2], source_latent=[source, 0],
                        image=[decoded, 0], words=prompts["map_words"], layers=model.get("map_layers", "level 2"))
        g.add("PreviewImage", "Preview (attention map)", at=("source", 2), images=[preview, 0])

    link = dict(model=[loader, 0], store=[store, 2], source_latent=[source, 0])
    if edit == "fpe":
        edit_id = g.add("FPESelfAttnInject", at=("target", 0), **link)
        positive = [g.add("CLIPTextEncode", "Target prompt", at=("target", 0), text=prompts["target"],
                          clip=[loader, 1]), 0]
        edited_model = [edit_id, 0]
    else:
        node = {"replace": "P2PReplace", "local_blend": "P2PReplace", "refine": "P2PRefine",
                "reweight": "P2PReweight"}[edit]
        extra = {"weights": prompts["weights"]} if edit == "reweight" else model.get("p2p", {})
        edit_id = g.add(node, at=("target", 0), **link, clip=[loader, 1], target_prompt=prompts["target"], **extra)
        positive, edited_model = [edit_id, 1], [edit_id, 0]
        if edit == "local_blend":
            edited_model = [g.add("P2PLocalBlend", at=("target", 0), model=edited_model,
                                  source_words=prompts["source_words"], target_words=prompts["target_words"],
                                  **model.get("blend", {})), 0]
    target = g.add("KSampler", "KSampler (edited)", at=("target", 1), model=edited_model, positive=positive,
                   negative=[negative, 0], latent_image=[latent, 0], **sampling)
    decoded = g.add("VAEDecode", "VAE Decode (edited)", at=("target", 1), samples=[target, 0], vae=[loader, 2])
    g.add("SaveImage", "Save Image (edited)", at=("target", 2), images=[decoded, 0], filename_prefix="p2p/edited")
    return g


# real images: name -> (edit, sd15 prompts, tinysd prompts); the TinySD image is demo_model/red_circle.png
DEMO_IMAGE = "attention_edit_red_circle.png"  # its name in ComfyUI's input folder
_REAL_P2P = dict(graphs.REAL_IMAGE_EXAMPLE)
REAL_EXAMPLES = {
    "real_fpe": ("fpe", {"image": graphs.REAL_IMAGE_EXAMPLE["image"], "source": "", "target": graphs.REAL_IMAGE_FPE_TARGET},
                 {"image": DEMO_IMAGE, "source": "", "target": "a blue circle"}),
    "real_p2p_local_blend": ("local_blend", _REAL_P2P,
                             {"image": DEMO_IMAGE, "source": "a red circle", "target": "a blue circle",
                              "source_words": "red", "target_words": "blue"}),
}
SDXL_REAL_EXAMPLES = {"real_p2p_null_text": ("null_text", _REAL_P2P)}


def _real_note(edit: str, model: dict) -> str:
    if edit == "fpe":
        prompts = ("**What to change:** the image (Load Image) and the target prompt: any new prompt. "
                   "Free-Prompt-Editing needs no description of the image: the source prompt stays empty.")
    else:
        prompts = ("**What to change:** the image (Load Image), the **source prompt** (one node: it must describe "
                   "the image, word for word as the target will change it) and the target prompt in the edit "
                   "node (the same number of words; Local Blend's words mark the region that may change).")
    inversion = ("**Null-text inversion** optimises the negative prompt per step so that guided sampling retraces "
                 "the image; it costs an optimisation per step (`inner_steps`)." if edit == "null_text" else
                 "**Direct inversion:** the source branch is re-anchored to the inversion at every step, so it "
                 "gives back the image exactly.")
    if model.get("flow"):
        inversion += (" DDIM Invert walks the flow backwards (`solver` midpoint: second order, twice the model "
                      "calls, a closer noise for the target branch).")
        if model["name"] == "Flux.1-dev":
            inversion += (" Flux.1-dev's guidance is distilled (cfg 1): null-text and negative-prompt inversion "
                          "need a negative branch and do not apply; direct inversion does.")
    sampling = ("both SamplerCustomAdvanced nodes take DDIM Invert's **noise** and LATENT, one sampler (*euler*) "
                "and one scheduler (DDIM Invert's steps and scheduler); a flow model cannot start from the LATENT "
                "with KSamplerAdvanced." if model.get("flow") else
                "both KSamplers keep add_noise *disable*, sampler *euler* and DDIM Invert's scheduler.")
    return "\n\n".join([
        f"## Edit a real image ({model['name']})",
        "DDIM Invert turns the image into the noise it would be sampled from; the **source branch** (blue) "
        "samples that noise back into the image and records its attention, the **target branch** (green) "
        "samples it with the edit.", prompts, inversion, _model_hint(model),
        "**Both branches and the inversion must sample alike:** steps and cfg come from the nodes on the right; "
        + sampling])


def real_graph(edit: str, prompts: dict, model: dict) -> _Graph:
    """API graph of a real-image edit: LoadImage -> VAEEncode -> DDIMInvert (source prompt, cfg 1);
    the source branch re-anchored to the trajectory (AttentionStore's inversion input) reconstructs
    the image, the target branch edits; both sample the inverted noise with KSamplerAdvanced and
    add_noise disabled. edit "null_text": a P2P local blend whose negative comes from
    NullTextInversion, and no re-anchoring. One source prompt and one steps/cfg feed every node."""
    g = _Graph([("shared", "Model, negative prompt and the settings every sampler shares", 0),
                ("inversion", "Image to noise: DDIM inversion", 0),
                ("source", "Source branch: the image again (records its attention)", 1),
                ("target", "Target branch: the edited image", 1)])
    loader = _loader(g, model)
    negative = g.add("CLIPTextEncode", "Negative prompt", at=("shared", 1), text="", clip=[loader, 1])
    shared = _settings(g, model, seed=False)
    g.note(("shared", 0), _real_note(edit, model))
    image = g.add("LoadImage", at=("inversion", 0), image=prompts["image"])
    latent = g.add("VAEEncode", at=("inversion", 1), pixels=[image, 0], vae=[loader, 2])
    source_prompt = [g.add("PrimitiveStringMultiline", "Source prompt (describes the image)", at=("inversion", 1),
                           value=prompts["source"]), 0]
    source_text = g.add("CLIPTextEncode", "Source prompt (inversion)", at=("inversion", 2), text=source_prompt,
                        clip=[loader, 1])
    scheduler = model.get("scheduler", "normal")
    invert = g.add("DDIMInvert", at=("inversion", 2), model=[loader, 0], positive=[source_text, 0],
                   negative=[negative, 0], latent=[latent, 0], steps=shared["steps"], scheduler=scheduler, cfg=1.0)
    branch_negative = [negative, 0]
    store_inputs = {"inversion": [invert, 1]}
    if edit == "null_text":
        branch_negative = [g.add("NullTextInversion", at=("inversion", 3), model=[loader, 0], inversion=[invert, 1],
                                 positive=[source_text, 0], negative=[negative, 0], cfg=shared["cfg"],
                                 **graphs.NULL_TEXT), 0]
        store_inputs = {}
    store = g.add("AttentionStore", at=("source", 0), model=[loader, 0], clip=[loader, 1], source_prompt=source_prompt,
                  **store_inputs, **model.get("store", {}))
    sample = _branch_sampler(g, model, shared, loader, invert, branch_negative, scheduler)
    source = sample("source", "source: reconstruction", [store, 0], [store, 1])
    decoded = g.add("VAEDecode", "VAE Decode (source)", at=("source", 1), samples=[source, 0], vae=[loader, 2])
    g.add("SaveImage", "Save Image (source)", at=("source", 2), images=[decoded, 0], filename_prefix="p2p/source")
    link = dict(model=[loader, 0], store=[store, 2], source_latent=[source, 0])
    if edit == "fpe":
        edited_model = [g.add("FPESelfAttnInject", at=("target", 0), **link), 0]
        positive = [g.add("CLIPTextEncode", "Target prompt", at=("target", 0), text=prompts["target"],
                          clip=[loader, 1]), 0]
    else:
        edit_id = g.add("P2PReplace", at=("target", 0), **link, clip=[loader, 1], target_prompt=prompts["target"],
                        **model.get("p2p", {}))
        positive = [edit_id, 1]
        edited_model = [g.add("P2PLocalBlend", at=("target", 0), model=[edit_id, 0],
                              source_words=prompts["source_words"], target_words=prompts["target_words"],
                              **model.get("blend", {})), 0]
    target = sample("target", "edited", edited_model, positive)
    decoded = g.add("VAEDecode", "VAE Decode (edited)", at=("target", 1), samples=[target, 0], vae=[loader, 2])
    g.add("SaveImage", "Save Image (edited)", at=("target", 2), images=[decoded, 0], filename_prefix="p2p/edited")
    return g


def _branch_sampler(g: _Graph, model: dict, shared: dict, loader: str, invert: str, negative: list, scheduler: str):
    """The sampler of a real-image branch, from DDIMInvert's outputs. UNets: KSamplerAdvanced from the LATENT
    with add_noise disabled. Flow models: SamplerCustomAdvanced with DDIMInvert's noise (KSamplerAdvanced would
    start a flow at (1 - sigma) x latent), each branch its CFGGuider, one sampler and scheduler for both."""
    if not model.get("flow"):
        sampling = dict(add_noise="disable", noise_seed=0, steps=shared["steps"], cfg=shared["cfg"],
                        sampler_name="euler", scheduler=scheduler, start_at_step=0, end_at_step=10000,
                        return_with_leftover_noise="disable")
        return lambda group, title, m, positive: g.add("KSamplerAdvanced", f"KSampler ({title})", at=(group, 1),
                                                        model=m, positive=positive, negative=negative,
                                                        latent_image=[invert, 0], **sampling)
    sampler = g.add("KSamplerSelect", "Sampler (both branches)", at=("shared", 2), sampler_name="euler")
    sigmas = g.add("BasicScheduler", "Scheduler (both branches)", at=("shared", 2), model=[loader, 0],
                   scheduler=scheduler, steps=shared["steps"], denoise=1.0)

    def sample(group, title, m, positive):
        guider = g.add("CFGGuider", f"CFG Guider ({group})", at=(group, 1), model=m, positive=positive,
                       negative=negative, cfg=shared["cfg"])
        return g.add("SamplerCustomAdvanced", f"SamplerCustomAdvanced ({title})", at=(group, 1), noise=[invert, 2],
                     guider=[guider, 0], sampler=[sampler, 0], sigmas=[sigmas, 0], latent_image=[invert, 0])
    return sample


def ui_name(slug: str) -> str:
    """File name (no extension) of a workflow: top-level ones by title, demo ones by slug."""
    return TITLES.get(slug, slug)


def examples() -> dict[str, _Graph]:
    """Relative UI path (from workflows/) -> graph."""
    out = {}
    for name, (edit, sd15, tiny) in EXAMPLES.items():
        out[f"{ui_name(name + '_sd15')}.json"] = edit_graph(edit, sd15, SD15)
        out[f"demo/{name}_tinysd.json"] = edit_graph(edit, tiny, TINYSD)
    for name, (edit, sd15, tiny) in REAL_EXAMPLES.items():
        out[f"{ui_name(name + '_sd15')}.json"] = real_graph(edit, sd15, SD15)
        out[f"demo/{name}_tinysd.json"] = real_graph(edit, tiny, TINYSD)
    for name, (edit, prompts) in SDXL_EXAMPLES.items():
        out[f"{ui_name(name + '_sdxl')}.json"] = edit_graph(edit, prompts, SDXL)
    for name, (edit, prompts) in SDXL_REAL_EXAMPLES.items():
        out[f"{ui_name(name + '_sdxl')}.json"] = real_graph(edit, prompts, SDXL)
    for name, (edit, prompts, tiny) in FLOW_EXAMPLES.items():
        out[f"{ui_name(name + '_flux')}.json"] = edit_graph(edit, prompts, FLUX)
        out[f"{ui_name(name + '_sd35')}.json"] = edit_graph(edit, prompts, SD35)
        out[f"demo/{name}_tinyflux.json"] = edit_graph(edit, tiny, TINYFLUX)
    for name, (edit, prompts, tiny) in REAL_EXAMPLES.items():
        out[f"{ui_name(name + '_flux')}.json"] = real_graph(edit, prompts, FLUX)
        out[f"{ui_name(name + '_sd35')}.json"] = real_graph(edit, prompts, SD35)
        out[f"demo/{name}_tinyflux.json"] = real_graph(edit, tiny, TINYFLUX)
    return out


def example_graphs() -> dict[str, dict]:
    """Relative UI path (from workflows/) -> API graph (defaults not yet filled in)."""
    return {rel: g.nodes for rel, g in examples().items()}


SLUGS = {title: slug for slug, title in TITLES.items()}


def slug(ui_rel: str) -> str:
    stem = pathlib.PurePosixPath(ui_rel).stem
    return SLUGS.get(stem, stem)


def api_path(ui_rel: str) -> str:
    return f"api/{slug(ui_rel)}.json"


# ----------------------------------------------------------------------------------------------
# the UI's additions: layout, groups, notes, model metadata

GROUP_PAD, GROUP_TITLE, GROUP_GAP, NODE_GAP, NOTE_WIDTH = 20, 100, 40, 30, 420
SIZES = {"SaveImage": [280, 300], "PreviewImage": [280, 300], "LoadImage": [320, 420]}


def _note_height(text: str) -> int:
    lines = sum(max(1, -(-len(par) // 52)) + 1 for par in text.split("\n\n"))
    return 40 + 19 * lines


def decorate(ui: dict, g: _Graph) -> dict:
    """The frontend workflow `ui` (api_to_ui of g's graph) laid out by g's groups and columns, with
    its notes (MarkdownNote) and the loader's model metadata (properties.models)."""
    ui = copy.deepcopy(ui)
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    next_id = max(int(n) for n in nodes) + 1
    cells: dict[tuple[str, int], list[dict]] = {}
    for nid, node in nodes.items():
        node["size"] = list(SIZES.get(node["type"], node["size"]))
        if node["type"] == "CheckpointLoaderSimple" and g.models:
            node["properties"]["models"] = copy.deepcopy(g.models)
        cells.setdefault(g.place[nid], []).append(node)
    for group, col, text in g.notes:
        note = {"id": next_id, "type": "MarkdownNote", "pos": [0, 0], "size": [NOTE_WIDTH, _note_height(text)],
                "flags": {}, "order": len(ui["nodes"]), "mode": 0, "inputs": [], "outputs": [],
                "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        ui["nodes"].append(note)
        cells.setdefault((group, col), []).insert(0, note)
        next_id += 1
    ui["last_node_id"] = next_id - 1
    groups, y = [], MARGIN
    for row in sorted({r for _, _, r in g.groups}):
        x, row_height = MARGIN, 0
        for key, title, _ in (grp for grp in g.groups if grp[2] == row):
            columns = sorted(c for (k, c) in cells if k == key)
            cx, height = x + GROUP_PAD, 0
            for col in columns:
                cy, width = y + GROUP_TITLE, 0
                for node in cells[(key, col)]:
                    node["pos"] = [cx, cy]
                    cy += node["size"][1] + NODE_GAP + 30  # the title bar sits above pos
                    width = max(width, node["size"][0])
                height = max(height, cy - y)
                cx += width + NODE_GAP
            bounding = [x, y, cx - x - NODE_GAP + GROUP_PAD, height]
            groups.append({"id": len(groups) + 1, "title": title, "bounding": bounding,
                           "color": GROUP_COLORS[key], "font_size": 24, "flags": {}})
            x += bounding[2] + GROUP_GAP
            row_height = max(row_height, height)
        y += row_height + GROUP_GAP
    ui["groups"] = groups
    return ui


def undecorated(ui: dict) -> dict:
    """`ui` without what decorate adds (notes, groups, layout, model metadata): what api_to_ui gives."""
    ui = copy.deepcopy(ui)
    ui["nodes"] = [n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY]
    ui["last_node_id"] = max(n["id"] for n in ui["nodes"])
    ui["groups"] = []
    for node in ui["nodes"]:
        node["pos"] = node["size"] = None
        node["properties"].pop("models", None)
    return ui


def dumps(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_all(out: pathlib.Path, info: dict | None = None) -> list[pathlib.Path]:
    info = info or object_info()
    written = []
    for rel, g in examples().items():
        api = complete(g.nodes, info)
        for path, data in ((out / rel, decorate(api_to_ui(api, info), g)), (out / api_path(rel), api)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dumps(data))
            written.append(path)
    return written


def write_thumbnails(demo: pathlib.Path, out: pathlib.Path = WORKFLOWS) -> list[pathlib.Path]:
    """<title>.jpg beside each top-level workflow (what ComfyUI's templates browser shows): the
    source and the edited image of the same edit from tools/demo.py's output folder `demo`."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=26)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    written = []
    for slug_name, title in TITLES.items():
        base, arch = slug_name.rsplit("_", 1)
        shown = THUMBNAIL_DEMO[base]
        if arch in ("flux", "sd35") and (demo / f"flux_{shown}_source.png").exists():
            shown = f"flux_{shown}"  # the same edit on TinyFlux, the flow transformer
        pair = [Image.open(demo / f"{shown}_{role}.png").convert("RGB") for role in ("source", "edited")]
        side = 250
        canvas = Image.new("RGB", (2 * side + 30, side + 70), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (im, label) in enumerate(zip(pair, ("source", "edited"))):
            x = 10 + i * (side + 10)
            canvas.paste(im.resize((side, side), Image.NEAREST), (x, 60))
            draw.text((x, 20), label, fill="black", font=font)
        path = out / f"{title}.jpg"
        canvas.save(path, quality=90)
        written.append(path)
    return written


def write_icon(demo: pathlib.Path, path: pathlib.Path = REPO / "docs" / "icon.png") -> pathlib.Path:
    """The pack's registry icon (pyproject's Icon), 400x400: the demo's local-blend colour swap, source above
    left, edited below right."""
    from PIL import Image

    source, edited = (Image.open(demo / f"local_blend_{role}.png").convert("RGB").resize((240, 240), Image.NEAREST)
                      for role in ("source", "edited"))
    icon = Image.new("RGB", (400, 400), "white")
    icon.paste(source, (20, 20))
    icon.paste(edited, (140, 140))
    icon.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=WORKFLOWS, help="output folder (default: workflows/)")
    parser.add_argument("--thumbnails", type=pathlib.Path, metavar="DEMO_DIR",
                        help="also write the top-level workflows' thumbnails and docs/icon.png from tools/demo.py's output (out/demo)")
    args = parser.parse_args(argv)
    if args.thumbnails:
        for path in write_thumbnails(args.thumbnails, args.out) + [write_icon(args.thumbnails)]:
            print(path)
    for path in write_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
