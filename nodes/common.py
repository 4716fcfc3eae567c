"""ComfyUI glue shared by the nodes: prompts from CLIP, layer discovery, patch installation."""
from __future__ import annotations

import comfy.ldm.modules.attention
from comfy import sd1_clip

from ..attention.controllers import BlockPatch, Editor, LayerPatch, Recorder
from ..attention.layers import AttentionLayer, unet_attention_layers
from ..attention.record import SourceRecord
from ..attention.tokens import Prompt, PromptError, prompt_from_tokens

EDIT_KEY = "attention_edit"  # transformer_options key and wrapper key of this pack


class NodeInputError(ValueError):
    """Raised with '<node>: <input>: <what is wrong and the fix>'."""

    def __init__(self, node: str, input_name: str, message: str):
        super().__init__(f"{node}: input '{input_name}': {message}")


def attention_fn(q, k, v, heads):
    """ComfyUI's own attention (so a patched layer computes exactly what an unpatched one does)."""
    return comfy.ldm.modules.attention.optimized_attention(q, k, v, heads)


def prompt_from_clip(clip, text: str, node: str, input_name: str) -> Prompt:
    """The prompt's words at the positions of the conditioning that ComfyUI makes of it (the same
    tokenize_with_weights call, so weights, parentheses, embeddings and chunks all agree)."""
    if clip is None:
        raise NodeInputError(node, "clip", "no CLIP given: connect the checkpoint's CLIP output")
    tokens = clip.tokenize(text, return_word_ids=True)
    name = "l" if "l" in tokens else next(iter(tokens))
    tokenizer = getattr(clip.tokenizer, f"clip_{name}", None) or getattr(clip.tokenizer, name, None)
    vocab = getattr(tokenizer, "inv_vocab", {})
    plain = " ".join(sd1_clip.unescape_important(segment)
                     for segment, _ in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0))
    try:
        return prompt_from_tokens(text, tokens[name], vocab.get, plain)
    except PromptError as e:
        raise NodeInputError(node, input_name, str(e)) from None


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def model_layers(model, node: str) -> list[AttentionLayer]:
    unet = getattr(model.model, "diffusion_model", None)
    try:
        return unet_attention_layers(unet)
    except TypeError as e:
        raise NodeInputError(node, "model", f"this model's architecture ({type(model.model).__name__}) cannot "
                             f"be addressed: {e}. The pack supports SD1.x/SD2.x/SDXL-style UNets") from None


def model_id(model) -> str:
    return f"{type(model.model).__name__}@{id(model.model):x}"


def _ours(patch) -> bool:
    return isinstance(patch, (LayerPatch, BlockPatch))


def _foreign(patch):
    """What another node put there, with this pack's earlier patch unwrapped."""
    return patch.previous if _ours(patch) else patch


def install(model, controller: Recorder | Editor, patched: dict[str, list[AttentionLayer]]) -> None:
    """Put the controller's patches on `model` (a clone), replacing this pack's earlier ones.

    Per block, under ComfyUI's key (block, id), dispatching on the transformer index: another
    pack's per-block patch is chained (it runs wherever we do not inject), and so is its per-layer
    patch, ours then going under the same per-layer key (ComfyUI looks those up first)."""
    table = model.model_options.get("transformer_options", {}).get("patches_replace", {})
    for kind, layers in patched.items():
        existing = table.get(kind, {})
        blocks: dict[tuple[str, int], list[AttentionLayer]] = {}
        for layer in layers:
            blocks.setdefault(layer.key[:2], []).append(layer)
        for block, members in blocks.items():
            previous = _foreign(existing.get(block))
            per_block = {}
            for layer in members:
                own = _foreign(existing.get(layer.key))
                if own is not None:  # another pack patched this very layer: wrap it at its key
                    model.set_model_patch_replace(LayerPatch(controller, kind, layer, own), kind, *layer.key)
                else:
                    per_block[layer.transformer_index] = LayerPatch(controller, kind, layer, previous)
            if per_block:
                model.set_model_patch_replace(BlockPatch(per_block, previous), kind, *block)
    for kind, wrapper in (("outer_sample", controller.outer_sample), ("predict_noise", controller.predict_noise),
                          ("apply_model", controller.apply_model)):
        model.remove_wrappers_with_key(kind, EDIT_KEY)
        model.add_wrapper_with_key(kind, EDIT_KEY, wrapper)
    post = [f for f in model.model_options.get("sampler_post_cfg_function", [])
            if not isinstance(getattr(f, "__self__", None), (Recorder, Editor))]
    model.model_options["sampler_post_cfg_function"] = post + [controller.post_cfg]
    model.model_options.setdefault("transformer_options", {})[EDIT_KEY] = controller


def current_controller(model) -> Recorder | Editor | None:
    c = model.model_options.get("transformer_options", {}).get(EDIT_KEY)
    return c if isinstance(c, (Recorder, Editor)) else None


def current_editor(model) -> Editor | None:
    c = current_controller(model)
    return c if isinstance(c, Editor) else None


def check_source(record: SourceRecord, source_latent: dict, node: str) -> SourceRecord:
    """The store's finished run that produced `source_latent` (a store keeps its runs within
    budget_mb, so a graph that ComfyUI's cache re-runs in part still finds its source)."""
    if not isinstance(record, SourceRecord):
        raise NodeInputError(node, "store", "expects the ATTENTION_STORE output of an AttentionStore node")
    if not record.runs:
        raise NodeInputError(node, "source_latent", "the attention store has not recorded a source run yet: "
                             "sample the source branch with AttentionStore's MODEL and connect that sampler's "
                             "LATENT here")
    run = record.run_for(source_latent["samples"])
    if run is None:
        raise NodeInputError(node, "source_latent", "this latent is not the output of a sampler that used this "
                             "AttentionStore's MODEL, or the store dropped that run (it keeps runs within budget_mb): "
                             "connect the source sampler's LATENT output, or raise AttentionStore's budget_mb")
    return run


# ----------------------------------------------------------------------------------------------
# Node search terms. ComfyUI's frontend (1.3x and newer) searches a node's name, display name and
# `search_aliases`. Newer ComfyUI's io.Schema has that field; on one without it (0.3.75), `Schema`
# adds it and serves it in /object_info the same way, so the nodes declare it once either way.
def _schema_with_search_aliases():
    import dataclasses

    from comfy_api.latest import io

    if "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}:
        return io.Schema

    @dataclasses.dataclass
    class NodeInfoV1(io.NodeInfoV1):
        search_aliases: list = None

    @dataclasses.dataclass
    class Schema(io.Schema):
        search_aliases: list = None
        """Extra words the node search matches (what users type: "prompt to prompt", "inversion")."""

        def get_v1_info(self, cls):
            info = super().get_v1_info(cls)
            fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
            return NodeInfoV1(**fields, search_aliases=list(self.search_aliases or []))

    return Schema


Schema = _schema_with_search_aliases()
CATEGORY = "attention_edit"  # the pack's top category in the node library; subcategories below it
