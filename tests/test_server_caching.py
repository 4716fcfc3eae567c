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

    server._json("/free", {"free_memory": True})  # next prompt runs on an empty cache
    again = server.run(second)
    assert "source_sampler" not in cached_nodes(again)
    np.testing.assert_array_equal(server.images(again, "edited_save")[0], edited)
    first_edit = server.images(server.run(first), "edited_save")[0]
    assert np.abs(first_edit - edited).max() > 0.05, "the target prompt change had no effect"
