"""AttentionStore: the source branch's recorder."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention.controllers import Recorder
from ..attention.inversion import Trajectory
from ..attention.layers import PRESETS, select_layers
from ..attention.record import RecordSpec, SourceRecord
from ..attention.schedule import ScheduleError, StepRange
from .invert import InversionType
from .common import NodeInputError, attention_fn, encode, install, model_id, model_layers, prompt_from_clip
from .common import CATEGORY, Schema

AttentionStoreType = io.Custom("ATTENTION_STORE")


class AttentionStore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return Schema(
            node_id="AttentionStore",
            display_name="Attention Store (source branch)",
            category=CATEGORY,
            search_aliases=["prompt to prompt", "p2p", "free prompt editing", "fpe", "attention store", "source branch",
                            "image editing"],
            description="Records the source branch's attention while an ordinary sampler samples it. "
                        "Sample the source with this MODEL and CONDITIONING; the edit nodes read the store.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL (after any LoRA); the target branch uses the "
                                                "same one."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP: encodes the source prompt and finds its words."),
                io.String.Input("source_prompt", multiline=True, default="a red circle",
                                tooltip="The source prompt. For a real image it describes the image (P2P); "
                                        "FPE also works with an empty prompt."),
                io.Float.Input("cross_attention_until", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Keep cross-attention queries for this first fraction of the steps "
                                       "(P2P edits inject for their own fraction, at most this)."),
                io.Combo.Input("self_attention_layers", options=list(PRESETS), default="fpe",
                               tooltip="Layers whose self-attention is kept (fpe: <= 32² at 512 px, FPE's code; p2p_16/p2p_32: "
                                       "resolutions <= 16²/32² at 512 px; none saves memory for P2P-only edits)."),
                io.Float.Input("self_attention_until", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Keep self-attention for this first fraction of the steps."),
                io.Combo.Input("storage", options=["model dtype", "fp16"], default="model dtype",
                               tooltip="fp16 halves the store's memory at a tiny loss of exactness."),
                io.Boolean.Input("correct_target", default=False,
                                 tooltip="With an inversion: also add the source's per-step corrections to the target "
                                         "branch. Off by default: they were computed for the source's own "
                                         "prediction, and on the target they push what the prompts do not name "
                                         "(a background) off the image (docs/real-images.md)."),
                io.Combo.Input("strategy", options=["auto", "keep", "recompute"], default="auto", optional=True,
                               tooltip="keep: store the source's attention (an edit costs about two generations; "
                                       "the store grows with the steps). recompute: store only the source's "
                                       "per-step inputs (latent-sized) and re-run the source beside the target "
                                       "while injecting (slower; no attention kept). auto: keep if it fits budget_mb."),
                io.Int.Input("budget_mb", default=2048, min=0, max=1 << 20, step=64, optional=True,
                             tooltip="With strategy auto: the most memory (MiB) the kept attention may take, "
                                     "estimated from the first step; above it the store recomputes."),
                io.Combo.Input("token_map_level", options=["auto", "level 0", "level 1", "level 2", "level 3"],
                               default="auto", optional=True,
                               tooltip="Resolution of the word maps kept for local blend and previews. auto: P2P's "
                                       "rule, the finest level with at most 16x16 positions (16² at 512 px). "
                                       "Choose another level where a model's words localise better (TinySD: level 1)."),
                InversionType.Input("inversion", optional=True,
                                             tooltip="A real image's DDIMInvert trajectory: the source branch is "
                                                     "re-anchored to it every step (direct inversion), so it "
                                                     "reconstructs the image exactly. Both branches must use "
                                                     "sampler euler or ddim (others are refused)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="Sample the source branch with this model."),
                io.Conditioning.Output(display_name="source_positive", tooltip="The source prompt's conditioning: the "
                                                                               "source sampler's positive."),
                AttentionStoreType.Output(display_name="store", tooltip="Connect to the edit nodes of the target branch."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, source_prompt, cross_attention_until, self_attention_layers,
                self_attention_until, storage, correct_target=False, inversion=None, strategy="auto",
                budget_mb=2048, token_map_level="auto") -> io.NodeOutput:
        prompt = prompt_from_clip(clip, source_prompt, "AttentionStore", "source_prompt")
        layers = model_layers(model, "AttentionStore")
        self_layers = select_layers(layers, self_attention_layers)
        try:
            spec = RecordSpec(
                cross_layers=frozenset(l.key for l in layers), cross_steps=StepRange(0, cross_attention_until, cross=True),
                self_layers=frozenset(l.key for l in self_layers), self_steps=StepRange(0, self_attention_until),
                storage_dtype=torch.float16 if storage == "fp16" else None,
                strategy=strategy, budget_bytes=int(budget_mb) << 20,
                map_level=None if token_map_level == "auto" else int(token_map_level.split()[-1]))
        except ScheduleError as e:
            raise NodeInputError("AttentionStore", "cross_attention_until/self_attention_until", str(e)) from None
        record = SourceRecord(spec, prompt, model_id(model), {l.key: l for l in layers})
        positive = encode(clip, source_prompt)
        if inversion is not None:
            if not isinstance(inversion, Trajectory):
                raise NodeInputError("AttentionStore", "inversion", "expects the inversion output of DDIMInvert")
            if inversion.model_id != record.model_id:
                raise NodeInputError("AttentionStore", "inversion", "the image was inverted with another model: "
                                     "give DDIMInvert the same MODEL as AttentionStore")
            inverted = inversion.prompt
            if inverted is not None and (inverted.shape != positive[0][0].shape
                                         or not torch.allclose(inverted, positive[0][0].float().cpu(), atol=1e-5)):
                raise NodeInputError("AttentionStore", "source_prompt", "differs from the prompt DDIMInvert inverted "
                                     "the image with: give both the same source prompt (one text node feeding both)")
            record.inversion, record.correct_target = inversion, bool(correct_target)
        m = model.clone()
        install(m, Recorder(record, attention_fn), {"attn1": self_layers, "attn2": layers})
        return io.NodeOutput(m, positive, record)
