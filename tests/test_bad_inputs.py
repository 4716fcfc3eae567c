"""The catalogue of bad inputs, each through the real ComfyUI server (POST /prompt, the executor,
/history): the error names the node, the input and the fix, and the server keeps serving. Graphs
come from tools/graphs.py with one thing broken."""
from __future__ import annotations

import copy
import json

import pytest

import graphs

STEPS = 4
SEED = 99


def edit(kind="replace", source="a red circle", target="a blue circle", **kw) -> dict:
    return graphs.edit_graph(kind, source, target, SEED, steps=STEPS, **kw)


def with_changes(graph: dict, changes: dict) -> dict:
    g = copy.deepcopy(graph)
    for (node, name), value in changes.items():
        if isinstance(value, dict) and "class_type" in value:
            g[node] = value
        else:
            g[node]["inputs"][name] = value
    return g


def source_never_ran(graph: dict) -> dict:
    """The edit reads the store, but nothing samples the source branch (its outputs are removed)."""
    g = copy.deepcopy(graph)
    for node in ("source_sampler", "source_decode", "source_save"):
        del g[node]
    g["edit"]["inputs"]["source_latent"] = ["latent", 0]
    return g


def other_size(graph: dict, size=192, batch=1) -> dict:
    g = copy.deepcopy(graph)
    g["latent2"] = {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}}
    g["target_sampler"]["inputs"]["latent_image"] = ["latent2", 0]
    return g


def area_target(graph: dict) -> dict:
    """The target's positive restricted to an area: the model then runs on a crop."""
    g = copy.deepcopy(graph)
    g["area"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["edit", 1], "width": 64, "height": 64,
                                                                 "x": 0, "y": 0, "strength": 1.0}}
    g["target_sampler"]["inputs"]["positive"] = ["area", 0]
    return g


# name -> (graph, fragments the error must contain: node, input, fix)
CASES = {
    "reweight word not in the prompt": (edit("reweight", "a red circle", "a red circle",
                                             edit_inputs={"weights": "purple=2"}),
                                        ["P2PReweight", "'weights'", "purple"]),
    "blend word not in the prompt": (edit("local_blend", blend={"source_words": "square"}),
                                     ["P2PLocalBlend", "source_words", "square"]),
    "replace with impossible alignment": (edit(target="a big blue circle"),
                                          ["P2PReplace", "target_prompt", "P2PRefine"]),
    "word schedule outside [0, 1]": (edit(edit_inputs={"word_schedules": "blue=1.5"}),
                                     ["P2PReplace", "word_schedules", "1.5"]),
    "target steps differ": (with_changes(edit(), {("target_sampler", "steps"): STEPS + 2}),
                            ["P2PReplace", "steps", "same steps"]),
    "target scheduler differs": (with_changes(edit(), {("target_sampler", "scheduler"): "karras"}),
                                 ["P2PReplace", "sigmas", "scheduler"]),
    "target seed differs": (with_changes(edit(), {("target_sampler", "seed"): SEED + 1}),
                            ["P2PReplace", "other noise", "same seed"]),
    "target sampler differs": (with_changes(edit(), {("target_sampler", "sampler_name"): "heun"}),
                               ["P2PReplace", "sampler is heun", "same sampler"]),
    "target cfg differs": (with_changes(edit(), {("target_sampler", "cfg"): 1.0}), ["P2PReplace", "cfg", "same cfg"]),
    "source cfg differs": (with_changes(edit("fpe"), {("source_sampler", "cfg"): 1.0}),
                           ["FPESelfAttnInject", "cfg", "same cfg"]),
    "target denoise differs": (with_changes(edit(), {("target_sampler", "denoise"): 0.5}),
                               ["P2PReplace", "start at sigma", "denoise"]),
    "target resolution differs": (other_size(edit()), ["P2PReplace", "same width and height"]),
    "target batch size differs": (other_size(with_changes(edit(), {("latent", "batch_size"): 2}), 128, 3),
                                  ["P2PReplace", "batch size", "same batch size"]),
    "store from another run": (with_changes(edit(), {("edit", "source_latent"): ["latent", 0]}),
                               ["P2PReplace", "source_latent", "connect the source sampler's LATENT"]),
    "store used before its source ran": (source_never_ran(edit(source="a green square", target="a blue square")),
                                         ["P2PReplace", "source_latent", "not recorded a source run yet"]),
    "a word weighted twice": (edit("reweight", "a red circle", "a red circle", edit_inputs={"weights": "red=2, red=0.5"}),
                              ["P2PReweight", "'weights'", "'red' is given twice"]),
    "area conditioning on the target": (area_target(edit()), ["P2PReplace", "ConditioningSetArea", "ConditioningSetMask"]),
    "empty target prompt": (edit(target=""), ["P2PReplace", "target_prompt", "empty"]),
    "FPE layers the store did not keep": (edit("fpe", store={"self_attention_layers": "none"}),
                                          ["FPESelfAttnInject", "'layers'", "self_attention_layers"]),
    "preview word not in the prompt": (None, ["AttentionMapPreview", "'words'", "square"]),
}


def preview_graph() -> dict:
    g = edit()
    g["preview"] = {"class_type": "AttentionMapPreview", "inputs": {
        "store": ["store", 2], "source_latent": ["source_sampler", 0], "image": ["source_decode", 0],
        "words": "square", "layers": "all", "start": 0.0, "end": 1.0, "threshold": 0.3}}
    g["preview_save"] = {"class_type": "SaveImage", "inputs": {"images": ["preview", 0], "filename_prefix": "pv"}}
    return g


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_error(server, name):
    graph, fragments = CASES[name]
    graph = graph if graph is not None else preview_graph()
    with pytest.raises(Exception) as err:
        server.run(graph, timeout=120)
    message = str(err.value)
    assert type(err.value).__name__ == "ServerError", message
    for fragment in fragments:
        assert fragment in message, f"{name}: '{fragment}' not in: {message}"
    assert server.proc.poll() is None, "the server died"


def test_server_serves_after_the_catalogue(server):
    entry = server.run(edit(target="a green circle"), timeout=120)
    assert len(server.images(entry)) == 2
    stats = json.loads(server._request("/system_stats").decode())
    assert stats["system"]["comfyui_version"]


def test_store_from_another_model_is_refused(comfy_nodes):
    """Two loads of a checkpoint are two models (the server's cache would hand out one, so this
    runs the nodes in-process): the store of one cannot drive an edit of the other."""
    import inproc
    import tinysd  # demo_model/, on sys.path once ComfyUI is set up

    a = inproc.Tiny.load(steps=STEPS)
    b_model, b_clip, _ = tinysd.load_checkpoint(str(inproc.comfyui_env.REPO / "demo_model" / "tinysd.safetensors"))
    m, pos, store = comfy_nodes["AttentionStore"].execute(a.model, a.clip, "a red circle", 1.0, "none", 1.0,
                                                          "model dtype").result
    source = a.sample(m, pos, seed=1)
    with pytest.raises(Exception, match=r"P2PReplace: input 'model': .*same checkpoint"):
        comfy_nodes["P2PReplace"].execute(b_model, b_clip, store, source, "a blue circle", 0.8, "", 0.4, "p2p_16")


def test_unknown_architecture_is_refused(comfy_nodes, tiny):
    """A model without SD-style UNet blocks gets a message, not a crash."""
    import comfy.model_patcher
    import torch

    class NotAUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(4, 4)

    odd = comfy.model_patcher.ModelPatcher(NotAUNet(), load_device="cpu", offload_device="cpu")
    with pytest.raises(Exception, match=r"AttentionStore: input 'model': .*cannot be addressed"):
        comfy_nodes["AttentionStore"].execute(odd, tiny[1], "a red circle", 1.0, "fpe", 1.0, "model dtype")
