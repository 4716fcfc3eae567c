"""Prompt-to-Prompt on the target branch: replace, refine, re-weight and local blend."""
from __future__ import annotations

import dataclasses

import torch
from comfy_api.latest import io

from ..attention.align import refine_mapper, replace_mapper
from ..attention.controllers import COMBINE, CrossEdit, Editor, LocalBlend
from ..attention.layers import PRESETS, select_layers
from ..attention.schedule import ScheduleError, StepRange, parse_word_fractions, parse_word_values
from ..attention.tokens import PromptError, split_words
from .common import (NodeInputError, attention_fn, check_source, current_editor, encode, install, model_id,
                     model_layers, prompt_from_clip)
from .store import AttentionStoreType
from .common import CATEGORY, Schema


def target_inputs(default_prompt: str) -> list:
    return [
        io.Model.Input("model", tooltip="The same MODEL as AttentionStore's input (not its output), or the "
                                        "output of another edit node of the same store to combine edits."),
        io.Clip.Input("clip", tooltip="The checkpoint's CLIP: encodes the target prompt and aligns its words."),
        AttentionStoreType.Input("store", tooltip="The AttentionStore of the source branch."),
        io.Latent.Input("source_latent", tooltip="The source sampler's output: it orders the branches "
                                                 "(the target runs after the source) and is checked against the store."),
        io.String.Input("target_prompt", multiline=True, default=default_prompt,
                        tooltip="The edited prompt. Its CONDITIONING is this node's second output: use it as the "
                                "target sampler's positive."),
    ]


def target_outputs() -> list:
    return [io.Model.Output(display_name="MODEL", tooltip="Sample the target branch with this model (same seed, "
                                                          "steps, sampler and size as the source)."),
            io.Conditioning.Output(display_name="target_positive", tooltip="The target prompt's conditioning: the "
                                                                           "target sampler's positive.")]


def schedule_inputs(cross=0.8, self_=0.4) -> list:
    return [
        io.Float.Input("cross_attention_until", default=cross, min=0.0, max=1.0, step=0.05,
                       tooltip="Inject the source's cross-attention for this first fraction of steps (τ). "
                               "Higher keeps more of the source; lower lets the edit change more."),
        io.String.Input("word_schedules", default="", tooltip="Per-word τ for target words, e.g. 'car=0.4'."),
        io.Float.Input("self_attention_until", default=self_, min=0.0, max=1.0, step=0.05,
                       tooltip="Inject the source's self-attention for this first fraction of steps."),
        io.Combo.Input("self_attention_layers", options=list(PRESETS), default="p2p_16",
                       tooltip="Where self-attention is injected (p2p_16: resolutions <= 16² at 512 px)."),
    ]


def build_editor(node, model, store, source_latent, target, cross: CrossEdit | None, self_layers, self_until):
    run = check_source(store, source_latent, node)
    if model_id(model) != store.model_id:
        raise NodeInputError(node, "model", "the store was recorded with a different model: use the same "
                             "checkpoint (before AttentionStore) for both branches")
    previous = current_editor(model)
    if previous is not None and previous.record.store_id != store.store_id:
        raise NodeInputError(node, "model", "the model already carries an edit that reads another "
                             "AttentionStore: chain edits of one store only")
    try:
        self_steps = StepRange(0, self_until)
    except ScheduleError as e:
        raise NodeInputError(node, "self_attention_until", str(e)) from None
    if target is None and previous is not None:
        target = previous.target
    editor = Editor(run, run.run_id, cross, frozenset(l.key for l in self_layers), self_steps,
                    target=target, node=node, attention=attention_fn)
    if previous is not None:  # compose with what an earlier edit node of this pack set up
        editor.cross = editor.cross or previous.cross
        editor.blend = previous.blend
        if not self_layers:
            editor.self_layers, editor.self_steps = previous.self_layers, previous.self_steps
    return editor


def install_editor(model, editor: Editor):
    layers = list(editor.record.layers.values())
    m = model.clone()
    install(m, editor, {"attn1": [l for l in layers if l.key in editor.self_layers], "attn2": layers})
    return m


def cross_steps(node: str, target, cross_until: float, word_schedules: str) -> tuple[StepRange, dict]:
    try:
        steps = StepRange(0, cross_until, cross=True)
        words = {w: StepRange(0, f, cross=True) for w, f in parse_word_fractions(word_schedules).items()}
    except ScheduleError as e:
        raise NodeInputError(node, "cross_attention_until/word_schedules", str(e)) from None
    try:
        per_pos = {p: rng for w, rng in words.items() for p in target.positions(w)}
    except PromptError as e:
        raise NodeInputError(node, "word_schedules", f"{e}; name words of the target prompt") from None
    return steps, per_pos


class _P2PEdit(io.ComfyNode):
    """A P2P edit of the target prompt: the subclasses differ in their token alignment (`mapper`)."""
    NODE = DISPLAY_NAME = DESCRIPTION = EXAMPLE_TARGET = ""
    ALIASES: list[str] = []
    mapper = staticmethod(lambda source, target: None)

    @classmethod
    def define_schema(cls):
        return Schema(
            node_id=cls.NODE, display_name=cls.DISPLAY_NAME, category=CATEGORY + "/prompt_to_prompt",
            search_aliases=["prompt to prompt", "p2p", *cls.ALIASES, "image editing"], description=cls.DESCRIPTION,
            inputs=target_inputs(cls.EXAMPLE_TARGET) + schedule_inputs(),
            outputs=target_outputs(),
        )

    @classmethod
    def execute(cls, model, clip, store, source_latent, target_prompt, cross_attention_until, word_schedules,
                self_attention_until, self_attention_layers) -> io.NodeOutput:
        target = prompt_from_clip(clip, target_prompt, cls.NODE, "target_prompt")
        if not target.words:
            raise NodeInputError(cls.NODE, "target_prompt", "the target prompt is empty: write the edited prompt")
        try:
            mapper, aligned = cls.mapper(store.prompt, target)
        except PromptError as e:
            raise NodeInputError(cls.NODE, "target_prompt", str(e)) from None
        steps, per_word = cross_steps(cls.NODE, target, cross_attention_until, word_schedules)
        layers = select_layers(model_layers(model, cls.NODE), self_attention_layers)
        editor = build_editor(cls.NODE, model, store, source_latent, target,
                              CrossEdit(mapper, aligned, steps, per_word), layers, self_attention_until)
        return io.NodeOutput(install_editor(model, editor), encode(clip, target_prompt))


class P2PReplace(_P2PEdit):
    NODE, DISPLAY_NAME = "P2PReplace", "P2P Replace (word swap)"
    ALIASES = ["word swap", "replace word"]
    DESCRIPTION = ("Prompt-to-Prompt word swap: the target takes the source's cross-attention maps for the first τ "
                   "of the steps. Source and target prompts need the same number of words.")
    EXAMPLE_TARGET = "a blue circle"
    mapper = staticmethod(lambda s, t: (replace_mapper(s, t), torch.ones(t.length)))


class P2PRefine(_P2PEdit):
    NODE, DISPLAY_NAME = "P2PRefine", "P2P Refine (add words)"
    ALIASES = ["refine prompt", "add words"]
    DESCRIPTION = ("Prompt-to-Prompt refinement: tokens shared with the source (global alignment) take the "
                   "source's maps; added words keep their own.")
    EXAMPLE_TARGET = "a red circle on a black background"
    mapper = staticmethod(refine_mapper)


def parse_weights(node: str, text: str, target) -> torch.Tensor:
    try:
        weights = parse_word_values(text, -2.0, 2.0, "weight")
        eq = torch.ones(target.length)
        for word, c in weights.items():
            eq[target.positions(word)] = c
    except (ScheduleError, PromptError) as e:
        raise NodeInputError(node, "weights", f"{e}; write e.g. 'red=2.0, circle=0.5' with words of the prompt") from None
    if not weights:
        raise NodeInputError(node, "weights", "no word to re-weight: write e.g. 'red=2.0'")
    return eq


class P2PReweight(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return Schema(
            node_id="P2PReweight", display_name="P2P Re-weight", category=CATEGORY + "/prompt_to_prompt",
            search_aliases=["prompt to prompt", "p2p", "reweight", "word weight", "attention re-weighting"],
            description="Scales the attention of chosen words by c in [-2, 2] while the source's maps are injected. "
                        "Use after P2PReplace/P2PRefine, or alone with the source prompt as target.",
            inputs=target_inputs("a red circle") + [
                io.String.Input("weights", default="red=2.0", tooltip="word=c pairs, c in [-2, 2]; several allowed."),
                io.Float.Input("cross_attention_until", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Used when no earlier edit set τ."),
            ],
            outputs=target_outputs(),
        )

    @classmethod
    def execute(cls, model, clip, store, source_latent, target_prompt, weights, cross_attention_until) -> io.NodeOutput:
        node = "P2PReweight"
        target = prompt_from_clip(clip, target_prompt, node, "target_prompt")
        eq = parse_weights(node, weights, target)
        previous = current_editor(model)
        if previous is not None and previous.cross is not None:
            if previous.target is None or previous.target.keys != target.keys:
                raise NodeInputError(node, "target_prompt", "differs from the earlier edit's target prompt: use the same text")
            cross = dataclasses.replace(previous.cross, equalizer=eq)
        else:
            try:
                mapper, aligned = refine_mapper(store.prompt, target)
            except PromptError as e:
                raise NodeInputError(node, "target_prompt", str(e)) from None
            steps, _ = cross_steps(node, target, cross_attention_until, "")
            cross = CrossEdit(mapper, aligned, steps, equalizer=eq)
        editor = build_editor(node, model, store, source_latent, target, cross, [], 0.0)
        return io.NodeOutput(install_editor(model, editor), encode(clip, target_prompt))


class P2PLocalBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return Schema(
            node_id="P2PLocalBlend", display_name="P2P Local Blend", category=CATEGORY + "/prompt_to_prompt",
            search_aliases=["prompt to prompt", "p2p", "local blend", "mask", "keep background"],
            description="Keeps everything outside the edited words' attention mask exactly the source. "
                        "Put after P2PReplace/P2PRefine/P2PReweight.",
            inputs=[
                io.Model.Input("model", tooltip="A model from a P2P edit node."),
                io.String.Input("source_words", default="circle", tooltip="Source-prompt words whose region may change."),
                io.String.Input("target_words", default="circle", tooltip="Target-prompt words whose region may change."),
                io.Float.Input("threshold", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Mask = normalised attention above this."),
                io.Float.Input("start", default=0.2, min=0.0, max=1.0, step=0.05,
                               tooltip="Blend from this fraction of the steps on (P2P: 0.2)."),
                io.String.Input("subtract_words", default="",
                                tooltip="Words whose region must stay the source (looked up in both prompts, as P2P does)."),
                io.Int.Input("dilate", default=1, min=0, max=8, optional=True,
                             tooltip="Grow the mask by this many cells of the word maps (P2P: 1 on 16x16 maps). "
                                     "0 for coarse maps (TinySD's 8x8)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional MASK of where the image may change (painted, from a segmenter, or "
                                      "AttentionMapPreview's): 1 = may change. Met with the words' mask by 'combine'."),
                io.Combo.Input("combine", options=list(COMBINE), default="intersect", optional=True,
                               tooltip="With a mask: intersect = change only where the words' mask and the mask agree; "
                                       "union = where either; mask only = the mask alone (words unused). "
                                       "subtract_words always stay the source."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="Sample the target branch with this model.")],
        )

    @classmethod
    def execute(cls, model, source_words, target_words, threshold, start, subtract_words, dilate=1, mask=None,
                combine="intersect") -> io.NodeOutput:
        node = "P2PLocalBlend"
        editor = current_editor(model)
        if editor is None or editor.target is None:
            raise NodeInputError(node, "model", "carries no P2P edit: connect the MODEL output of P2PReplace, "
                                 "P2PRefine or P2PReweight")
        source, target = editor.record.prompt, editor.target
        words_used = mask is None or combine != "mask only"
        try:
            src = source.positions(source_words) if words_used and split_words(source_words) else []
            tgt = target.positions(target_words) if words_used and split_words(target_words) else []
        except PromptError as e:
            raise NodeInputError(node, "source_words/target_words", f"{e}; name words of the prompts") from None
        if words_used and not (src or tgt):
            raise NodeInputError(node, "source_words/target_words", "name the word(s) whose region may change, "
                                 "e.g. 'cat' (or connect a mask and set combine to 'mask only')")
        sub_src, sub_tgt = [], []
        for word in split_words(subtract_words):
            if not (source.has(word) or target.has(word)):
                raise NodeInputError(node, "subtract_words", f"the word '{word}' is in neither prompt; name words "
                                     "of the source or target prompt")
            sub_src += source.positions(word) if source.has(word) else []
            sub_tgt += target.positions(word) if target.has(word) else []
        region = None
        if mask is not None:
            region = mask.reshape(-1, *mask.shape[-2:]).float().cpu()
            if region.shape[0] not in (1, editor.record.latent_shape[0]):
                raise NodeInputError(node, "mask", f"{region.shape[0]} masks for a batch of "
                                     f"{editor.record.latent_shape[0]}: give one mask, or one per image")
        blend = LocalBlend(src, tgt, threshold, start, sub_src, sub_tgt, int(dilate), region, combine)
        new = Editor(editor.record, editor.run_id, editor.cross, editor.self_layers, editor.self_steps, blend,
                     editor.target, node, attention_fn)
        return io.NodeOutput(install_editor(model, new))
