"""Prompts as ComfyUI users write them: weights, punctuation, escapes, long prompts and long
negatives. Word positions come from ComfyUI's own tokenisation (in-process, TinySD's CLIP), and
edits of such prompts run through the real server."""
from __future__ import annotations

import numpy as np
import pytest

import graphs

STEPS = 6


@pytest.fixture(scope="module")
def clip(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def prompt(tiny, comfy_nodes):
    """The source prompt as AttentionStore reads it."""
    store = comfy_nodes["AttentionStore"]
    return lambda clip, text: store.execute(tiny[0], clip, text, 1.0, "none", 1.0, "model dtype").result[2].prompt


def conditioning_ids(clip, text) -> list:
    """The token ids ComfyUI encodes, chunk after chunk."""
    return [t for chunk in clip.tokenize(text)["l"] for t, _ in chunk]


@pytest.mark.parametrize("text, word, expected", [
    ("a (red car:1.2) on a table", "table", [6]),
    ("a (red car:1.2) on a table", "car", [3]),
    ("a ((red)) car", "car", [3]),
    ("a (red (car:1.3):0.8) on a table", "table", [6]),
    ("a \\(red\\) car", "car", [5]),
    ("a tiger.", "tiger", [2]),
    ("a smiling, bunny doll.", "smiling", [2]),
    ("a smiling, bunny doll.", "doll", [5]),
])
def test_word_positions_are_those_of_the_conditioning(clip, prompt, text, word, expected):
    """Before, each whitespace piece was tokenised alone: 'table' sat at 12 in 'a (red car:1.2)
    on a table', and a word's punctuation came with it."""
    p = prompt(clip, text)
    assert p.positions(word) == expected
    ids = conditioning_ids(clip, text)
    assert [p.keys[i] for i in range(p.length)] == ids
    assert ids[expected[0]] == conditioning_ids(clip, word)[1]  # the word's own token sits there


def test_a_long_weighted_prompt_has_its_real_token_count(clip, prompt):
    """'(red circle:1.2)' 20 times is 40 tokens (was refused as 160)."""
    p = prompt(clip, "(red circle:1.2) " * 20)
    assert p.length == 77 and len(p.content) == 40
    assert p.positions("circle") == list(range(2, 41, 2))


def test_prompts_longer_than_one_chunk_address_every_chunk(clip, prompt):
    text = " ".join(["a red circle"] * 30) + " on a black background"  # 94 tokens: two chunks
    p = prompt(clip, text)
    ids = conditioning_ids(clip, text)
    assert p.length == len(ids) == 154 and p.starts == (0, 77)
    background = p.positions("background")
    assert len(background) == 1 and background[0] > 77 and ids[background[0]] == conditioning_ids(clip, "background")[1]
    assert len(p.positions("circle")) == 30


# ------------------------------------------------------------------ through the real server
def run(server, graph):
    """The source and edited images (float32 in [0, 1]) of an edit graph."""
    entry = server.run(graph, timeout=180)
    return (np.stack(server.images(entry, graphs.SOURCE_SAVE)).astype(np.float32),
            np.stack(server.images(entry, graphs.EDITED_SAVE)).astype(np.float32))


@pytest.mark.parametrize("kind, source, target, extra", [
    ("reweight", "a (red circle:1.0)", "a (red circle:1.0)", {"edit_inputs": {"weights": "red=2"}}),
    ("local_blend", "a (red circle:1.0)", "a (blue circle:1.0)", {}),
    ("replace", "a (red:1.0) circle.", "a (blue:1.0) circle.", {}),
])
def test_weight_one_edits_exactly_as_the_plain_prompt(server, kind, source, target, extra):
    """ComfyUI encodes weight 1.0 exactly as no weight, so the edit must be the same images; before,
    re-weighting moved to the wrong tokens and local blend refused the word."""
    plain = lambda text: text.replace("(", "").replace(":1.0)", "")  # noqa: E731
    weighted = run(server, graphs.edit_graph(kind, source, target, 5, steps=STEPS, **extra))
    unweighted = run(server, graphs.edit_graph(kind, plain(source), plain(target), 5, steps=STEPS, **extra))
    assert np.array_equal(weighted[0], unweighted[0]) and np.array_equal(weighted[1], unweighted[1])


LONG_NEGATIVE = ", ".join(["blurry, noisy, low quality, jpeg artefacts, watermark, text, signature, cropped"] * 8)


@pytest.mark.parametrize("kind", ["replace", "refine", "reweight", "local_blend", "fpe"])
def test_long_negative_and_long_source_prompt_edit_exactly_on_their_own_maps(server, kind):
    """A negative of more than 75 tokens makes ComfyUI repeat the positive to 154 tokens, and a
    source prompt of 150 tokens is two chunks: with the target prompt equal to the source, every
    edit injects the source's own maps, so the edited image must be the source image. (Before,
    both stopped every P2P edit with a size mismatch.)"""
    source = " ".join(["a red circle"] * 50)  # 150 tokens
    negative = LONG_NEGATIVE
    extra = {"edit_inputs": {"weights": "red=1.0"}} if kind == "reweight" else {}
    if kind == "fpe":
        extra = {"edit_inputs": {"layers": "all", "until": 1.0}}
    if kind == "local_blend":
        extra = {"blend": {"source_words": "circle", "target_words": "circle"}}
    for src, neg in ((source, "blurry"), ("a red circle", negative), (source, negative)):
        graph = graphs.edit_graph(kind, src, src, 5, steps=STEPS, negative=neg, **extra)
        graph["edit"]["inputs"].update({"cross_attention_until": 1.0, "self_attention_until": 1.0,
                                        "self_attention_layers": "all"} if kind not in ("fpe", "reweight") else {})
        source_img, edited = run(server, graph)
        # 8-bit images: the latents agree to float precision, so at most one level of rounding
        assert np.abs(source_img - edited).max() <= 1.001 / 255, (kind, len(src), len(neg))


def test_long_negative_colour_swap_edits(server, comfy_nodes):
    """With a 120-token negative the word swap still turns the circle blue and keeps its place."""
    import shapes  # demo_model/, on sys.path once ComfyUI has loaded it (comfy_nodes)

    graph = graphs.edit_graph("replace", "a red circle", "a blue circle", 11, steps=12,
                              negative=LONG_NEGATIVE, edit_inputs=graphs.TINYSD_P2P)
    source_img, edited = run(server, graph)
    a, b = shapes.classify(source_img[0]), shapes.classify(edited[0])
    assert (a.colour, b.colour) == ("red", "blue")
    assert shapes.iou(a.mask, b.mask) > 0.6
