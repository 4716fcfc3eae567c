"""Pictures of what the store recorded: a word's cross-attention over the source image, and the mask."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention.layers import LEVELS, PRESETS, select_layers
from ..attention.schedule import ScheduleError, StepRange
from ..attention.tokens import PromptError
from .common import NodeInputError, check_source
from .store import AttentionStoreType
from .common import CATEGORY, Schema

NODE = "AttentionMapPreview"


def heat_colours(heat: torch.Tensor) -> torch.Tensor:
    """(B, H, W) in [0, 1] -> (B, H, W, 3): black-red-yellow-white, readable over any image."""
    return torch.stack([(3 * heat).clamp(0, 1), (3 * heat - 1).clamp(0, 1), (3 * heat - 2).clamp(0, 1)], dim=-1)


class AttentionMapPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return Schema(
            node_id=NODE, display_name="Attention Map Preview", category=CATEGORY + "/attention_maps",
            search_aliases=["attention map", "cross-attention map", "heatmap", "word mask"],
            description="Where the source branch's pixels looked at the given words: their cross-attention, averaged "
                        "over the chosen layers and steps, as an overlay on the image and as a MASK (the words' "
                        "region, e.g. for inpainting or to check a local blend).",
            inputs=[
                AttentionStoreType.Input("store", tooltip="The AttentionStore of the source branch."),
                io.Latent.Input("source_latent", tooltip="The source sampler's output (orders this after the run)."),
                io.Image.Input("image", tooltip="The decoded source image (VAEDecode of source_latent)."),
                io.String.Input("words", default="circle", tooltip="Word(s) of the source prompt, space-separated."),
                io.Combo.Input("layers", options=list(PRESETS) + list(LEVELS), default="all",
                               tooltip="Layers to average (the store keeps cross-attention of all layers). Words "
                                       "localise best at one resolution: SD1.5 at 512 px at level 2 (16²), "
                                       "TinySD at level 1 (8²)."),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.05, tooltip="First fraction of steps."),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Last fraction of steps (at most the store's cross_attention_until)."),
                io.Float.Input("threshold", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="The mask is where the normalised map exceeds this."),
            ],
            outputs=[io.Image.Output(display_name="overlay", tooltip="The map over the image."),
                     io.Mask.Output(display_name="mask", tooltip="Where the normalised map exceeds the threshold."),
                     io.Image.Output(display_name="heatmap", tooltip="The map alone, in colour.")],
        )

    @classmethod
    def execute(cls, store, source_latent, image, words, layers, start, end, threshold) -> io.NodeOutput:
        store = check_source(store, source_latent, NODE)
        try:
            positions = store.prompt.positions(words)
            steps = StepRange(start, end)
        except PromptError as e:
            raise NodeInputError(NODE, "words", str(e)) from None
        except ScheduleError as e:
            raise NodeInputError(NODE, "start/end", str(e)) from None
        chosen = {l.key for l in select_layers(list(store.layers.values()), layers)}
        heat = store.word_heatmap(positions, chosen, steps)
        if heat is None and store.recompute:
            raise NodeInputError(NODE, "layers", f"the store recomputes the source (AttentionStore's strategy/"
                                 f"budget_mb) and keeps token maps of level {store.map_level} only: choose "
                                 f"'level {store.map_level}', or set AttentionStore's strategy to 'keep'")
        if heat is None:
            raise NodeInputError(NODE, "layers", "the store kept no cross-attention for these layers and steps: "
                                 "widen them or raise AttentionStore's cross_attention_until")
        if image.shape[0] != heat.shape[0] and heat.shape[0] != 1:
            raise NodeInputError(NODE, "image", f"{image.shape[0]} images for a source batch of {heat.shape[0]}: "
                                 "connect the VAEDecode of source_latent")
        size = tuple(image.shape[1:3])
        heat = torch.nn.functional.interpolate(heat[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        heat = heat / heat.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        colours = heat_colours(heat).to(image)
        overlay = 0.45 * image[..., :3] + 0.55 * colours
        return io.NodeOutput(overlay.clamp(0, 1), (heat > threshold).float(), colours)
