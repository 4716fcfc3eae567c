"""attention/layers.py on a fake UNet whose module classes carry SD1.5's names and layout."""
from __future__ import annotations

import pathlib
import sys

import pytest
from torch import nn

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attention.layers import PRESETS, AttentionLayer, select_layers, unet_attention_layers  # noqa: E402


class SpatialTransformer(nn.Module):
    def __init__(self, depth: int = 1):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(nn.Identity() for _ in range(depth))


class Downsample(nn.Module):
    pass


class Upsample(nn.Module):
    pass


class ResBlock(nn.Module):
    pass


class TimestepEmbedSequential(nn.Sequential):
    pass


def seq(*mods):
    return TimestepEmbedSequential(*mods)


class FakeSD15UNet(nn.Module):
    """input 0 conv; 1,2 / 4,5 / 7,8 res+attn; 3,6,9 downsample; 10,11 res. middle res+attn+res.
    output 0,1,2 res (2 ends in an upsample); 3..11 res+attn, with upsamples ending 5 and 8."""

    def __init__(self, depth: dict | None = None):
        super().__init__()
        depth = depth or {}
        st = lambda key: SpatialTransformer(depth.get(key, 1))  # noqa: E731
        inp = [seq(nn.Conv2d(4, 4, 3))]
        for i in range(1, 12):
            if i in (3, 6, 9):
                inp.append(seq(Downsample()))
            elif i in (10, 11):
                inp.append(seq(ResBlock()))
            else:
                inp.append(seq(ResBlock(), st(("input", i))))
        self.input_blocks = nn.ModuleList(inp)
        self.middle_block = seq(ResBlock(), st(("middle", 0)), ResBlock())
        out = []
        for i in range(12):
            mods = [ResBlock()] if i < 3 else [ResBlock(), st(("output", i))]
            if i in (2, 5, 8):
                mods.append(Upsample())
            out.append(seq(*mods))
        self.output_blocks = nn.ModuleList(out)


EXPECTED = [  # (block, block_id, index, level)
    ("input", 1, 0, 0), ("input", 2, 1, 0), ("input", 4, 2, 1), ("input", 5, 3, 1),
    ("input", 7, 4, 2), ("input", 8, 5, 2), ("middle", 0, 6, 3),
    ("output", 3, 7, 2), ("output", 4, 8, 2), ("output", 5, 9, 2),
    ("output", 6, 10, 1), ("output", 7, 11, 1), ("output", 8, 12, 1),
    ("output", 9, 13, 0), ("output", 10, 14, 0), ("output", 11, 15, 0),
]


def test_sd15_layers_indices_levels_keys():
    layers = unet_attention_layers(FakeSD15UNet())
    assert [(l.block, l.block_id, l.index, l.level) for l in layers] == EXPECTED
    assert [l.index for l in layers] == list(range(16))
    assert all(l.transformer_index == 0 for l in layers)
    assert layers[6].key == ("middle", 0, 0)
    assert layers[0].key == ("input", 1, 0)
    assert layers[15].key == ("output", 11, 0)
    assert len({l.key for l in layers}) == 16
    assert str(layers[4]) == "input 7.0 (#4, level 2)"


def keys(layers):
    return [l.key[:2] for l in layers]


def test_presets():
    layers = unet_attention_layers(FakeSD15UNet())
    assert select_layers(layers, "all") == layers
    assert select_layers(layers, "none") == []
    # (h) "fpe": FPE's official code edits the maps of at most 32x32 positions at 512 px (level >= 1):
    # SD1.5 indices 2..12
    fpe = select_layers(layers, "fpe")
    assert [l.index for l in fpe] == list(range(2, 13))
    assert keys(fpe) == [("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0)] + [
        ("output", i) for i in range(3, 9)]
    # "fpe_4_14": the paper's "layers 4-14", as forward-order indices 4..14
    band = select_layers(layers, "fpe_4_14")
    assert [l.index for l in band] == list(range(4, 15))
    assert keys(band) == [("input", 7), ("input", 8), ("middle", 0)] + [("output", i) for i in range(3, 11)]
    assert keys(select_layers(layers, "p2p_16")) == [("input", 7), ("input", 8), ("middle", 0),
                                                     ("output", 3), ("output", 4), ("output", 5)]
    assert keys(select_layers(layers, "p2p_32")) == [("input", 4), ("input", 5), ("input", 7), ("input", 8),
                                                     ("middle", 0)] + [("output", i) for i in range(3, 9)]
    assert set(PRESETS) == {"all", "fpe", "fpe_4_14", "p2p_16", "p2p_32", "none", "double", "single"}
    with pytest.raises(ValueError, match="flow transformer"):
        select_layers(layers, "double")
    assert [l.index for l in select_layers(layers, "level 1")] == [2, 3, 10, 11, 12]


def test_fpe_presets_on_a_unet_with_70_attention_layers():
    # SDXL-like: attention from level 1 on; "fpe" keeps them all, "fpe_4_14" scales the band to
    # ceil(4 * 70 / 16) = 18 .. floor(14 * 70 / 16) = 61
    layers = [AttentionLayer("input", i, 0, i, 1 + (i % 2)) for i in range(70)]
    assert select_layers(layers, "fpe") == layers
    assert [l.index for l in select_layers(layers, "fpe_4_14")] == list(range(18, 62))


def test_unknown_preset():
    with pytest.raises(ValueError, match="p2p_64"):
        select_layers(unet_attention_layers(FakeSD15UNet()), "p2p_64")


def test_deeper_transformer_stacks_get_one_layer_each():
    layers = unet_attention_layers(FakeSD15UNet({("input", 4): 2, ("middle", 0): 3}))
    assert len(layers) == 16 + 1 + 2
    got = [(l.block, l.block_id, l.transformer_index, l.index, l.level) for l in layers[2:10]]
    assert got == [("input", 4, 0, 2, 1), ("input", 4, 1, 3, 1), ("input", 5, 0, 4, 1),
                   ("input", 7, 0, 5, 2), ("input", 8, 0, 6, 2),
                   ("middle", 0, 0, 7, 3), ("middle", 0, 1, 8, 3), ("middle", 0, 2, 9, 3)]
    assert [l.index for l in layers] == list(range(19))


def test_unwrapped_block_modules_count_too():
    unet = FakeSD15UNet()
    unet.input_blocks[3] = Downsample()  # not inside a Sequential
    layers = unet_attention_layers(unet)
    assert [(l.block, l.block_id, l.level) for l in layers][:4] == [("input", 1, 0), ("input", 2, 0),
                                                                   ("input", 4, 1), ("input", 5, 1)]


def test_non_unet_raises_type_error():
    with pytest.raises(TypeError, match="Linear"):
        unet_attention_layers(nn.Linear(2, 2))
    with pytest.raises(TypeError):
        unet_attention_layers(None)

    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_blocks = nn.ModuleList()
            self.output_blocks = nn.ModuleList()

    with pytest.raises(TypeError):
        unet_attention_layers(Partial())


def test_attention_layer_is_hashable_and_frozen():
    a = AttentionLayer("input", 1, 0, 0, 0)
    assert a == AttentionLayer("input", 1, 0, 0, 0) and hash(a) == hash(AttentionLayer("input", 1, 0, 0, 0))
    with pytest.raises(Exception):
        a.level = 3  # type: ignore[misc]


def test_flow_transformer_presets():
    """Flux's 19 double + 38 single blocks: one resolution, so the resolution presets take every
    block; double/single pick a stream; fpe_4_14 keeps its share of the depth."""
    from attention.dit import dit_attention_layers

    class Flux(nn.Module):
        def __init__(self):
            super().__init__()
            self.double_blocks = nn.ModuleList(nn.Identity() for _ in range(19))
            self.single_blocks = nn.ModuleList(nn.Identity() for _ in range(38))

    layers = dit_attention_layers(Flux())
    assert [l.index for l in layers] == list(range(57)) and {l.level for l in layers} == {0}
    for preset in ("all", "fpe", "p2p_16", "p2p_32"):
        assert select_layers(layers, preset) == layers
    assert [l.block_id for l in select_layers(layers, "double")] == list(range(19))
    assert [l.block_id for l in select_layers(layers, "single")] == list(range(38))
    assert [l.index for l in select_layers(layers, "fpe_4_14")] == list(range(15, 50))  # ceil(4*57/16)..floor(14*57/16)
