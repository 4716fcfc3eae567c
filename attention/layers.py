"""One explicit way to name the UNet's attention layers.

A layer is ComfyUI's patch key (block, block_id, transformer_index) plus two derived facts:
`index`, its position in forward order over the whole UNet (SD1.5: 0..15 = input 1,2,4,5,7,8,
middle 0, output 3..11), and `level`, how often the latent was downsampled before it (SD1.5 at
512 px: level 0 = 64², 1 = 32², 2 = 16², 3 = 8²).

Presets:
- "all"        every attention layer.
- "fpe"        Free-Prompt-Editing's official code: every layer whose maps have at most 32²
               positions at 512 px, i.e. level >= 1 (SD1.5: `index` 2..12 = input 4,5,7,8, middle,
               output 3..8). By level, so it keeps its place at any size; SDXL, whose attention
               starts at level 1, gets all its layers.
- "fpe_4_14"   the FPE paper's "layers 4-14" read as `index` 4..14, counted from 0 in forward order
               (SD1.5: input 7,8, middle, output 3..10). On a UNet with n attention layers the same
               band is index ceil(4n/16)..floor(14n/16) (SDXL's 70 layers: 18..61).
- "p2p_16"     P2P's self-attention rule "resolution <= 16²" at 512 px: level >= 2.
- "p2p_32"     "resolution <= 32²": level >= 1.
- "none"       no layer.
- "level N"    the layers at one resolution (level 0 = the full latent; SD1.5 at 512 px: 64²).

Flow transformers (Flux, SD3; dit.py) have no resolutions: every joint-attention layer sees the
same image tokens (level 0). There the resolution presets (fpe, p2p_16, p2p_32) take every layer,
"double" / "single" take Flux's double- or single-stream blocks, and "fpe_4_14" keeps its share
of the depth (on Flux's 57 blocks: 15..49).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionLayer:
    block: str  # "input" | "middle" | "output"
    block_id: int
    transformer_index: int  # position inside the block's transformer stack (ComfyUI's 3rd key)
    index: int  # forward order over the whole UNet
    level: int  # number of downsamplings before this layer

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.block, self.block_id, self.transformer_index)

    def __str__(self) -> str:
        return f"{self.block} {self.block_id}.{self.transformer_index} (#{self.index}, level {self.level})"


PRESETS = ("all", "fpe", "fpe_4_14", "p2p_16", "p2p_32", "none", "double", "single")
LEVELS = ("level 0", "level 1", "level 2", "level 3")  # one resolution (0 = the full latent)


def unet_attention_layers(unet: torch.nn.Module) -> list[AttentionLayer]:
    """The attention layers of an SD-style UNet (`input_blocks`, `middle_block`, `output_blocks`)."""
    if not all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise TypeError(f"{type(unet).__name__} is not an SD1/SDXL-style UNet (no input/middle/output blocks)")
    layers: list[AttentionLayer] = []
    level = 0

    def visit(block: str, block_id: int, module: torch.nn.Module) -> None:
        nonlocal level
        for child in module.children() if isinstance(module, torch.nn.Sequential) else [module]:
            name = type(child).__name__
            if name == "SpatialTransformer":
                for t in range(len(child.transformer_blocks)):
                    layers.append(AttentionLayer(block, block_id, t, len(layers), level))
            elif name == "Downsample":
                level += 1
            elif name == "Upsample":
                level -= 1

    for i, m in enumerate(unet.input_blocks):
        visit("input", i, m)
    visit("middle", 0, unet.middle_block)
    for i, m in enumerate(unet.output_blocks):
        visit("output", i, m)
    return layers


def is_joint(layer: AttentionLayer) -> bool:
    """A flow transformer's joint-attention layer (Flux double/single block, SD3 joint block)."""
    return layer.block in ("double", "single", "joint")


def select_layers(layers: list[AttentionLayer], preset: str) -> list[AttentionLayer]:
    joint = bool(layers) and all(is_joint(l) for l in layers)
    if preset in ("double", "single"):
        if not joint:
            raise ValueError(f"the layer preset '{preset}' names a flow transformer's blocks; this model is a UNet")
        return [l for l in layers if l.block == preset]
    if joint and preset in ("fpe", "p2p_16", "p2p_32"):  # one resolution: every layer
        return list(layers)
    if preset == "all":
        return list(layers)
    if preset == "none":
        return []
    if preset == "fpe":
        return [l for l in layers if l.level >= 1]
    if preset == "fpe_4_14":
        n = len(layers)
        return [l for l in layers if -(-4 * n // 16) <= l.index <= 14 * n // 16]
    if preset == "p2p_16":
        return [l for l in layers if l.level >= 2]
    if preset == "p2p_32":
        return [l for l in layers if l.level >= 1]
    if preset in LEVELS:
        return [l for l in layers if l.level == int(preset.split()[1])]
    raise ValueError(f"unknown layer preset '{preset}'; choose one of {', '.join(PRESETS)}")
