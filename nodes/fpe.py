"""Free-Prompt-Editing: only the source's self-attention, in a middle band of layers, all steps."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.layers import PRESETS, select_layers
from ..attention.record import SourceRecord
from .common import NodeInputError, model_layers
from .p2p import build_editor, install_editor
from .store import AttentionStoreType
from .common import CATEGORY, Schema


class FPESelfAttnInject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return Schema(
            node_id="FPESelfAttnInject", display_name="FPE Self-Attention Inject",
            category=CATEGORY + "/free_prompt_editing",
            search_aliases=["free prompt editing", "fpe", "self-attention injection", "image editing"],
            description="Free-Prompt-Editing: the target keeps the source's layout by reading its values through the "
                        "source's self-attention maps (FPE's code: layers of <= 32² positions at 512 px, the first "
                        "80% of the steps). Cross-attention stays the target's "
                        "own, so any target prompt works; for real images the source prompt may be empty.",
            inputs=[
                io.Model.Input("model", tooltip="The same MODEL as AttentionStore's input (not its output)."),
                AttentionStoreType.Input("store", tooltip="The AttentionStore of the source branch (its "
                                         "self_attention_layers must include these layers)."),
                io.Latent.Input("source_latent", tooltip="The source sampler's output (orders the branches)."),
                io.Combo.Input("layers", options=list(PRESETS), default="fpe",
                               tooltip="fpe: layers of <= 32² positions at 512 px (FPE's official code); fpe_4_14: the "
                                       "paper's 'layers 4-14' in forward order, counted from 0 (see docs)."),
                io.Float.Input("until", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Inject for this first fraction of the steps (FPE's code: 0.8)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="Sample the target branch with this model and "
                                                                   "an ordinary CLIPTextEncode of the target prompt.")],
        )

    @classmethod
    def execute(cls, model, store, source_latent, layers, until) -> io.NodeOutput:
        chosen = select_layers(model_layers(model, "FPESelfAttnInject"), layers)
        recorded = store.spec.self_layers if isinstance(store, SourceRecord) else frozenset(l.key for l in chosen)
        missing = [l for l in chosen if l.key not in recorded]
        if missing:
            raise NodeInputError("FPESelfAttnInject", "layers", f"the store does not keep self-attention of "
                                 f"{', '.join(map(str, missing[:3]))}...: set AttentionStore's self_attention_layers "
                                 "to a preset that includes them (e.g. 'fpe' or 'all')")
        editor = build_editor("FPESelfAttnInject", model, store, source_latent, None,
                              None, chosen, until)
        return io.NodeOutput(install_editor(model, editor))
