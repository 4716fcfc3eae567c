"""ComfyUI glue shared by the nodes: prompts from CLIP, layer discovery, patch installation."""
from __future__ import annotations

import comfy.ldm.modules.attention
from comfy import sd1_clip

from ..attention.controllers import BlockPatch, Editor, LayerPatch, Recorder
from ..attention.dit import BlockName, JointPatch, dit_attention_layers, is_dit
from ..attention.layers import AttentionLayer, unet_attention_layers
from ..attention.record import SourceRecord
from ..attention.tokens import Prompt, PromptError, concat_prompts, prompt_from_tokens

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
    tokenize_with_weights call, so weights, parentheses, embeddings and chunks all agree).

    Which tokens reach the attention: CLIP-L's for SD1/SDXL (SDXL's G tokens sit at the same
    positions), T5's for Flux (no CLIP tokens in its context), and for SD3 the CLIP chunks followed
    by T5's (its context is their concatenation); a word then has positions in both parts."""
    if clip is None:
        raise NodeInputError(node, "clip", "no CLIP given: connect the checkpoint's CLIP output")
    tokens = clip.tokenize(text, return_word_ids=True)
    if "t5xxl" in tokens:  # SD3 (with CLIP-G): CLIP's chunks, then T5's; Flux: T5's only
        names = ["l", "t5xxl"] if "g" in tokens else ["t5xxl"]
    else:
        names = ["l" if "l" in tokens else next(iter(tokens))]
    plain = " ".join(sd1_clip.unescape_important(segment)
                     for segment, _ in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0))
    parts = []
    try:
        for name in names:
            tokenizer = getattr(clip.tokenizer, f"clip_{name}", None) or getattr(clip.tokenizer, name, None)
            piece = getattr(tokenizer, "inv_vocab", {}).get
            parts.append(prompt_from_tokens(text, tokens[name], piece, plain, sentencepiece=name == "t5xxl"))
    except PromptError as e:
        raise NodeInputError(node, input_name, str(e)) from None
    return parts[0] if len(parts) == 1 else concat_prompts(*parts)


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def model_layers(model, node: str) -> list[AttentionLayer]:
    net = getattr(model.model, "diffusion_model", None)
    try:
        return dit_attention_layers(net) if is_dit(net) else unet_attention_layers(net)
    except TypeError as e:
        raise NodeInputError(node, "model", f"this model's architecture ({type(model.model).__name__}) cannot "
                             f"be addressed: {e}. The pack supports SD1.x/SD2.x/SDXL-style UNets and the "
                             "Flux and SD3 flow transformers") from None


def guidance_distilled(model) -> bool:
    """Flux.1-dev-style models take the guidance as an input and are sampled at cfg 1: they have
    no unconditional branch for null-text or negative-prompt inversion to work on."""
    params = getattr(getattr(model.model, "diffusion_model", None), "params", None)
    return bool(getattr(params, "guidance_embed", False))


def model_id(model) -> str:
    return f"{type(model.model).__name__}@{id(model.model):x}"


def _ours(patch) -> bool:
    return isinstance(patch, (LayerPatch, BlockPatch))


def _foreign(patch):
    """What another node put there, with this pack's earlier patch unwrapped."""
    return patch.previous if _ours(patch) else patch


def install(model, controller: Recorder | Editor, patched: dict[str, list[AttentionLayer]]) -> None:
    """Put the controller's patches on `model` (a clone), replacing this pack's earlier ones.

    UNet: per block, under ComfyUI's key (block, id), dispatching on the transformer index: another
    pack's per-block patch is chained (it runs wherever we do not inject), and so is its per-layer
    patch, ours then going under the same per-layer key (ComfyUI looks those up first).
    Flow transformer: the attention override (see install_joint)."""
    if is_dit(model.model.diffusion_model):
        install_joint(model, controller, patched)
    else:
        install_unet(model, controller, patched)
    for kind, wrapper in (("outer_sample", controller.outer_sample), ("predict_noise", controller.predict_noise),
                          ("apply_model", controller.apply_model)):
        model.remove_wrappers_with_key(kind, EDIT_KEY)
        model.add_wrapper_with_key(kind, EDIT_KEY, wrapper)
    post = [f for f in model.model_options.get("sampler_post_cfg_function", [])
            if not isinstance(getattr(f, "__self__", None), (Recorder, Editor))]
    model.model_options["sampler_post_cfg_function"] = post + [controller.post_cfg]
    model.model_options.setdefault("transformer_options", {})[EDIT_KEY] = controller


def install_joint(model, controller: Recorder | Editor, patched: dict[str, list[AttentionLayer]]) -> None:
    """One `optimized_attention_override` for all joint layers, chaining another pack's override;
    on SD3, per-block "dit" patches that name the block (chaining another pack's block patch)."""
    net = model.model.diffusion_model
    options = model.model_options.setdefault("transformer_options", {})
    previous = options.get("optimized_attention_override")
    previous = previous.previous if isinstance(previous, JointPatch) else previous
    parts = {kind: {(l.block, l.block_id): LayerPatch(controller, kind, l) for l in layers}
             for kind, layers in patched.items()}
    options["optimized_attention_override"] = JointPatch(controller, int(getattr(net, "patch_size", 2)),
                                                         parts.get("attn2", {}), parts.get("attn1", {}), previous)
    if hasattr(net, "joint_blocks"):
        existing = options.get("patches_replace", {}).get("dit", {})
        for i in range(len(net.joint_blocks)):
            own = existing.get(("double_block", i))
            own = own.previous if isinstance(own, BlockName) else own
            model.set_model_patch_replace(BlockName(i, own), "dit", "double_block", i)


def install_unet(model, controller: Recorder | Editor, patched: dict[str, list[AttentionLayer]]) -> None:
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
