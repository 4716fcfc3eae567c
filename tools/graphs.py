"""ComfyUI graphs in API format (the JSON that POST /prompt takes) for the demo and the tests.

Every builder returns a plain dict {node_id: {"class_type": ..., "inputs": {...}}}; a link is
[node_id, output_index]. The model comes from `loader`: TinySDCheckpointLoader (the demo model,
the default) or `checkpoint_loader("some.safetensors")` (CheckpointLoaderSimple); both give
MODEL, CLIP, VAE as outputs 0, 1, 2, so the graphs are otherwise identical.

Node ids are fixed names, so results can be found in a history entry: SOURCE_SAVE holds the
source image, EDITED_SAVE the edited one (PLAIN_SAVE in `plain_graph`).
"""
from __future__ import annotations

import copy

TINYSD = {"class_type": "TinySDCheckpointLoader", "inputs": {}}
TINYFLUX = {"class_type": "TinyFluxCheckpointLoader", "inputs": {}}  # the Flux-architecture demo model
SOURCE_SAVE, EDITED_SAVE, PLAIN_SAVE = "source_save", "edited_save", "plain_save"
EDITS = ("replace", "refine", "reweight", "local_blend", "fpe")
P2P_DEFAULTS = {"cross_attention_until": 0.8, "self_attention_until": 0.4, "self_attention_layers": "p2p_16"}  # the nodes'
# P2P's schedule on TinySD; the nodes' defaults are the paper's SD1.5 values (cross-attention for 0.8 of
# the steps, self-attention at <= 16² for 0.4). TinySD's latent is 16², so "<= 16² at 512 px" (level >= 2)
# is 4² and 2² there, too coarse to hold a layout: its layout lives at 8² (level 1, p2p_32). Its 16²
# cross-attention does not localise, so self-attention carries the structure for longer (0.8), and the
# swapped word gets its own map sooner (0.6), or the old colour stays (tools/eval_edits.py measures both).
TINYSD_P2P = {"cross_attention_until": 0.6, "self_attention_until": 0.8, "self_attention_layers": "p2p_32"}
# TinyFlux (the flow transformer demo model, docs/flow-transformers.md): its schedule and cfg
TINYFLUX_P2P = {"cross_attention_until": 0.6, "self_attention_until": 0.8, "self_attention_layers": "all"}
TINYFLUX_CFG = 4.0
TINYFLUX_SCHEDULER = "simple"  # the scheduler TinyFlux was evaluated with (docs/demo-model.md)
FPE_DEFAULTS = {"layers": "fpe", "until": 0.8}  # FPESelfAttnInject's defaults: FPE's official code

# Real images (tools/eval_real.py measures these; docs/real-images.md has the table): DDIMInvert at cfg 1
# with the source prompt (FPE: an empty one), AttentionStore re-anchored to the inversion (direct
# inversion) with correct_target OFF, both branches KSamplerAdvanced add_noise disable, euler, normal.
# The source's per-step corrections were computed for the source's own prediction; added to the target
# they push what the prompts do not name (the background) off the image.
REAL_IMAGE = {"inversion": "direct without target correction", "invert_cfg": 1.0, "correct_target": False,
              "steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}
REAL_INVERSIONS = ("ddim", "direct", "direct without target correction", "negative-prompt", "null-text")


def checkpoint_loader(ckpt_name: str) -> dict:
    """CheckpointLoaderSimple for a checkpoint in ComfyUI's models/checkpoints."""
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}


def _node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def _sampler(model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler) -> dict:
    return _node("KSampler", model=model, positive=positive, negative=negative, latent_image=latent, seed=seed,
                 steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=1.0)


def _base(loader: dict | None, negative: str, size: int) -> dict:
    return {
        "loader": copy.deepcopy(loader or TINYSD),
        "negative": _node("CLIPTextEncode", clip=["loader", 1], text=negative),
        "latent": _node("EmptyLatentImage", width=size, height=size, batch_size=1),
    }


def _decode_save(graph: dict, name: str, latent: list, prefix: str) -> None:
    graph[f"{name}_decode"] = _node("VAEDecode", samples=latent, vae=["loader", 2])
    graph[f"{name}_save"] = _node("SaveImage", images=[f"{name}_decode", 0], filename_prefix=prefix)


def plain_graph(prompt: str, seed: int, *, steps: int = 20, cfg: float = 5.0, size: int = 128,
                loader: dict | None = None, negative: str = "", sampler_name: str = "euler",
                scheduler: str = "normal", prefix: str = "attention_edit/plain") -> dict:
    """Loader -> CLIPTextEncode -> KSampler -> VAEDecode -> SaveImage, without any node of the pack."""
    g = _base(loader, negative, size)
    g["positive"] = _node("CLIPTextEncode", clip=["loader", 1], text=prompt)
    g["plain_sampler"] = _sampler(["loader", 0], ["positive", 0], ["negative", 0], ["latent", 0], seed, steps, cfg,
                                  sampler_name, scheduler)
    _decode_save(g, "plain", ["plain_sampler", 0], prefix)
    return g


def edit_graph(edit: str, source_prompt: str, target_prompt: str, seed: int, *, steps: int = 20,
               cfg: float = 5.0, size: int = 128, loader: dict | None = None, negative: str = "",
               sampler_name: str = "euler", scheduler: str = "normal", prefix: str = "attention_edit/edit",
               store: dict | None = None, edit_inputs: dict | None = None, blend: dict | None = None) -> dict:
    """Source branch (AttentionStore -> KSampler) and target branch (edit node(s) -> KSampler, same seed).

    edit: "replace" (P2PReplace), "refine" (P2PRefine), "reweight" (P2PReweight), "local_blend"
    (P2PReplace, or P2PRefine when `edit_inputs` has "node": "P2PRefine", then P2PLocalBlend) or
    "fpe" (FPESelfAttnInject; the target prompt goes through a plain CLIPTextEncode).
    store / edit_inputs / blend override the widget values of AttentionStore, the edit node and
    P2PLocalBlend.
    """
    if edit not in EDITS:
        raise ValueError(f"unknown edit '{edit}'; choose one of {', '.join(EDITS)}")
    g = _base(loader, negative, size)
    g["store"] = _node("AttentionStore", model=["loader", 0], clip=["loader", 1], source_prompt=source_prompt,
                       **{"cross_attention_until": 1.0, "self_attention_layers": "all", "self_attention_until": 1.0,
                          "storage": "model dtype", "correct_target": True, **(store or {})})
    g["source_sampler"] = _sampler(["store", 0], ["store", 1], ["negative", 0], ["latent", 0], seed, steps, cfg,
                                   sampler_name, scheduler)
    _decode_save(g, "source", ["source_sampler", 0], f"{prefix}_source")

    link = {"model": ["loader", 0], "store": ["store", 2], "source_latent": ["source_sampler", 0]}
    extra = dict(edit_inputs or {})
    if edit == "fpe":
        g["edit"] = _node("FPESelfAttnInject", **link, **{**FPE_DEFAULTS, **extra})
        g["target_positive"] = _node("CLIPTextEncode", clip=["loader", 1], text=target_prompt)
        model, positive = ["edit", 0], ["target_positive", 0]
    else:
        link.update(clip=["loader", 1], target_prompt=target_prompt)
        if edit == "reweight":
            g["edit"] = _node("P2PReweight", **link, **{"weights": "red=2.0", "cross_attention_until": 0.8, **extra})
        else:
            default_node = "P2PRefine" if edit == "refine" else "P2PReplace"
            node = extra.pop("node", default_node)
            g["edit"] = _node(node, **link, **{"word_schedules": "", **P2P_DEFAULTS, **extra})
        model, positive = ["edit", 0], ["edit", 1]
        if edit == "local_blend":
            g["blend"] = _node("P2PLocalBlend", model=model, **{"source_words": "circle", "target_words": "circle",
                                                               "threshold": 0.3, "start": 0.2, "subtract_words": "",
                                                               **(blend or {})})
            model = ["blend", 0]
    g["target_sampler"] = _sampler(model, positive, ["negative", 0], ["latent", 0], seed, steps, cfg,
                                   sampler_name, scheduler)
    _decode_save(g, "edited", ["target_sampler", 0], f"{prefix}_edited")
    return g


# The example workflows' real-checkpoint settings (tools/make_workflows.py writes workflows/ from them).
# The real-image ones load ComfyUI's own input/example.png (a child's drawing of a girl in a pink dress
# on a hill under a blue sky): their prompts describe that image, so they run as they are in any ComfyUI.
SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
FLUX_CHECKPOINT = "flux1-dev-fp8.safetensors"  # Comfy-Org's all-in-one Flux.1-dev (model, CLIP-L + T5-XXL, VAE)
SD35_CHECKPOINT = "sd3.5_large_fp8_scaled.safetensors"  # Comfy-Org's SD3.5 Large with its three text encoders
CHECKPOINT_URLS = {  # properties.models of the loader: the frontend offers the download when the file is absent
    SD15_CHECKPOINT: "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                     "v1-5-pruned-emaonly.safetensors",
    SDXL_CHECKPOINT: "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                     "sd_xl_base_1.0.safetensors",
    FLUX_CHECKPOINT: "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors",
    SD35_CHECKPOINT: "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/"
                     "sd3.5_large_fp8_scaled.safetensors",
}
SD15_SETTINGS = {"size": 512, "steps": 50, "cfg": 7.5, "seed": 42}
SDXL_SETTINGS = {"size": 1024, "steps": 30, "cfg": 6.0, "seed": 42}
FLUX_SETTINGS = {"size": 1024, "steps": 20, "cfg": 1.0, "seed": 42}  # guidance-distilled: cfg 1, Flux guidance 3.5 (its default)
SD35_SETTINGS = {"size": 1024, "steps": 28, "cfg": 4.5, "seed": 42}
REAL_IMAGE_EXAMPLE = {
    "image": "example.png",
    "source": "a child's drawing of a girl in a pink dress on a green hill",
    "target": "a child's drawing of a girl in a blue dress on a green hill",
    "source_words": "pink dress", "target_words": "blue dress",  # local blend: the region that may change
}
REAL_IMAGE_FPE_TARGET = "a child's drawing of a girl in a blue dress on a snowy hill"  # FPE: any new prompt
NULL_TEXT = {"inner_steps": 10, "early_stop": 1e-5}  # NullTextInversion's widgets in the SDXL real-image workflow
