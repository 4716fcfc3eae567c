"""End to end on the real ComfyUI server (a subprocess, see tests/server.py): the pack's nodes are
registered, a Prompt-to-Prompt graph runs through POST /prompt, and a failing graph does not
take the server down."""
from __future__ import annotations

import numpy as np
import pytest

import graphs

STEPS = 12
SEED = 1234

PACK_INPUTS = {
    "AttentionStore": ["model", "clip", "source_prompt", "cross_attention_until", "self_attention_layers",
                       "self_attention_until", "storage", "correct_target", "strategy", "budget_mb",
                       "token_map_level", "inversion"],
    "P2PReplace": ["model", "clip", "store", "source_latent", "target_prompt", "cross_attention_until",
                   "word_schedules", "self_attention_until", "self_attention_layers"],
    "P2PRefine": ["model", "clip", "store", "source_latent", "target_prompt", "cross_attention_until",
                  "word_schedules", "self_attention_until", "self_attention_layers"],
    "P2PReweight": ["model", "clip", "store", "source_latent", "target_prompt", "weights", "cross_attention_until"],
    "P2PLocalBlend": ["model", "source_words", "target_words", "threshold", "start", "subtract_words", "dilate", "mask",
                      "combine"],
    "FPESelfAttnInject": ["model", "store", "source_latent", "layers", "until"],
    "DDIMInvert": ["model", "positive", "negative", "latent", "steps", "scheduler", "cfg", "solver"],
    "NullTextInversion": ["model", "inversion", "positive", "negative", "cfg", "inner_steps", "learning_rate",
                          "early_stop"],
    "TinySDCheckpointLoader": [],
}
PACK_OUTPUTS = {
    "AttentionStore": ["MODEL", "CONDITIONING", "ATTENTION_STORE"],
    "P2PReplace": ["MODEL", "CONDITIONING"],
    "P2PRefine": ["MODEL", "CONDITIONING"],
    "P2PReweight": ["MODEL", "CONDITIONING"],
    "P2PLocalBlend": ["MODEL"],
    "FPESelfAttnInject": ["MODEL"],
    "DDIMInvert": ["LATENT", "INVERSION", "NOISE"],
    "NullTextInversion": ["CONDITIONING"],
    "TinySDCheckpointLoader": ["MODEL", "CLIP", "VAE"],
}


def test_object_info_lists_pack_nodes(server):
    info = server.object_info()
    missing = [n for n in PACK_INPUTS if n not in info]
    assert not missing, f"not registered: {missing}\n{server.log_tail()}"
    for name, inputs in PACK_INPUTS.items():
        spec = info[name]["input"]
        got = list(spec.get("required", {})) + list(spec.get("optional", {}))
        assert got == inputs, name
        assert list(info[name]["output"]) == PACK_OUTPUTS[name], name
    for name in PACK_INPUTS:
        if name != "TinySDCheckpointLoader":
            assert info[name]["category"].split("/")[0] == "attention_edit", name
            assert info[name]["search_aliases"], name  # served even where io.Schema lacks the field
    # what users type finds the nodes: the frontend searches name, display name and search_aliases
    for term, expected in (("prompt to prompt", {"P2PReplace", "P2PRefine", "P2PReweight", "P2PLocalBlend"}),
                           ("free prompt editing", {"FPESelfAttnInject"}),
                           ("inversion", {"DDIMInvert", "NullTextInversion"}),
                           ("attention map", {"AttentionMapPreview"})):
        found = {n for n, node in info.items() if term in node.get("search_aliases", [])}
        assert found >= expected, (term, found)
    assert info["P2PReplace"]["category"] == "attention_edit/prompt_to_prompt"
    assert info["DDIMInvert"]["category"] == "attention_edit/inversion"


def test_p2p_replace_end_to_end(server):
    plain = server.run(graphs.plain_graph("a red circle", SEED, steps=STEPS), timeout=120)
    (reference,) = server.images(plain, graphs.PLAIN_SAVE)

    entry = server.run(graphs.edit_graph("replace", "a red circle", "a blue circle", SEED, steps=STEPS), timeout=120)
    (source,) = server.images(entry, graphs.SOURCE_SAVE)
    (edited,) = server.images(entry, graphs.EDITED_SAVE)

    assert source.shape == edited.shape == reference.shape == (128, 128, 3)
    # recording the source's attention must not change the source image
    assert np.abs(source - reference).max() <= 1 / 255 + 1e-6
    # the edit changes the image
    assert np.abs(edited - source).mean() > 1 / 255


def test_server_survives_failing_graph(server):
    bad = graphs.edit_graph("replace", "a red circle", "a big blue circle", SEED, steps=STEPS)
    with pytest.raises(Exception) as err:
        server.run(bad, timeout=120)
    assert type(err.value).__name__ == "ServerError"
    message = str(err.value)
    assert "P2PReplace" in message and "target_prompt" in message, message

    # a later good graph (new seed: nothing cached) still runs to the end
    entry = server.run(graphs.edit_graph("replace", "a red circle", "a green circle", SEED + 1, steps=STEPS),
                       timeout=120)
    images = server.images(entry)
    assert len(images) == 2 and all(im.shape == (128, 128, 3) for im in images)
    assert server.proc is not None and server.proc.poll() is None


def test_templates_browser_lists_the_examples_with_thumbnails(server):
    """ComfyUI's templates browser: GET /api/workflow_templates lists the pack's top-level workflows
    by title, and serves each one and the thumbnail the frontend asks for (<name>.jpg)."""
    import json
    import pathlib
    import urllib.parse
    import urllib.request

    import make_workflows as mw

    def get(path: str):
        with urllib.request.urlopen(server.url + urllib.parse.quote(path), timeout=30) as r:
            return r.headers.get("Content-Type", ""), r.read()

    _, body = get("/api/workflow_templates")
    listed = json.loads(body)["comfyui-attention-edit"]
    assert sorted(listed) == sorted(mw.TITLES.values())
    for name in listed:
        kind, data = get(f"/api/workflow_templates/comfyui-attention-edit/{name}.json")
        assert json.loads(data)["nodes"], name
        kind, data = get(f"/api/workflow_templates/comfyui-attention-edit/{name}.jpg")
        assert kind == "image/jpeg" and data[:3] == b"\xff\xd8\xff", name
    assert pathlib.Path(mw.WORKFLOWS / "demo").is_dir()  # the demo-model versions stay out of the list
