"""ComfyUI's caching on the real server: when only the target prompt changes, only the target
branch runs again, and its result equals a full re-run (the store still holds the source run)."""
from __future__ import annotations

import sys

import numpy as np

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import graphs  # noqa: E402


def cached_nodes(entry: dict) -> set[str]:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_cached":
            return set(data["nodes"])
    return set()


def test_changing_only_the_target_reruns_only_the_target(server):
    first = graphs.edit_graph("replace", "a red circle", "a blue circle", seed=21, steps=10)
    server.run(first)
    second = graphs.edit_graph("replace", "a red circle", "a green circle", seed=21, steps=10)
    entry = server.run(second)
    cached = cached_nodes(entry)
    assert {"store", "source_sampler", "loader"} <= cached, cached
    assert "target_sampler" not in cached and "edit" not in cached
    edited = server.images(entry, "edited_save")[0]

    server.free()  # the next prompt runs on an empty cache
    again = server.run(second)
    assert "source_sampler" not in cached_nodes(again)
    np.testing.assert_array_equal(server.images(again, "edited_save")[0], edited)
    first_edit = server.images(server.run(first), "edited_save")[0]
    assert np.abs(first_edit - edited).max() > 0.05, "the target prompt change had no effect"


def test_a_cached_store_finds_each_source_run(tmp_path_factory):
    """With an LRU cache ComfyUI keeps AttentionStore's output and the outputs of earlier source
    runs: P1 (seed 43), P2 (seed 44), then P1 again with only its target text changed reuses P1's
    cached source latent, and the store still holds the run that made it. The edit equals the one
    a fresh server makes. And one store feeding two source samplers (two seeds) edits both."""
    import comfyui_env

    server_module = comfyui_env.server_module()
    with server_module.ComfyServer(tmp_path_factory.mktemp("lru"), extra_args=("--cache-lru", "50")) as s:
        s.run(graphs.edit_graph("replace", "a red circle", "a blue circle", seed=43, steps=6))
        s.run(graphs.edit_graph("replace", "a red circle", "a blue circle", seed=44, steps=6))
        again = graphs.edit_graph("replace", "a red circle", "a green circle", seed=43, steps=6)
        entry = s.run(again)
        assert "source_sampler" in cached_nodes(entry)
        edited = s.images(entry, "edited_save")[0]

        two = graphs.edit_graph("replace", "a red circle", "a green circle", seed=43, steps=6)
        for node in ("source_sampler", "target_sampler"):  # a second pair of branches on seed 44, same store
            two[f"{node}_b"] = {**two[node], "inputs": {**two[node]["inputs"], "seed": 44}}
        two["edit_b"] = {**two["edit"], "inputs": {**two["edit"]["inputs"], "source_latent": ["source_sampler_b", 0]}}
        two["target_sampler_b"]["inputs"]["model"] = ["edit_b", 0]
        two["edited_decode_b"] = {**two["edited_decode"], "inputs": {**two["edited_decode"]["inputs"],
                                                                      "samples": ["target_sampler_b", 0]}}
        two["edited_save_b"] = {**two["edited_save"], "inputs": {**two["edited_save"]["inputs"],
                                                                  "images": ["edited_decode_b", 0]}}
        both = s.run(two)
        edited_b = s.images(both, "edited_save_b")[0]
    with server_module.ComfyServer(tmp_path_factory.mktemp("fresh")) as fresh:
        np.testing.assert_array_equal(fresh.images(fresh.run(again), "edited_save")[0], edited)
        seed44 = graphs.edit_graph("replace", "a red circle", "a green circle", seed=44, steps=6)
        np.testing.assert_array_equal(fresh.images(fresh.run(seed44), "edited_save")[0], edited_b)
