"""SD1.5- and SDXL-architecture models with random weights, built by ComfyUI from its own model
configs: the real layer shapes (for memory and time at real sizes, and for SDXL layer addressing)
without any checkpoint. Weights are seeded; the images they make are noise.

    model, clip = random_models.build("sd15")        # ModelPatcher + CLIP, as a checkpoint loader gives
"""
from __future__ import annotations

import torch

import comfyui_env

comfyui_env.setup()
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402

_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "in_channels": 4, "legacy": False,
           "use_spatial_transformer": True, "use_temporal_attention": False, "use_temporal_resblock": False}
UNET_CONFIGS = {
    # as comfy/model_detection.py reads them from the checkpoints
    "sd15": dict(_COMMON, model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768,
                 use_linear_in_transformer=False, adm_in_channels=None),
    "sdxl": dict(_COMMON, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], context_dim=2048,
                 use_linear_in_transformer=True, adm_in_channels=2816, num_head_channels=64),
}
CONFIG_CLASSES = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops leave weights uninitialised: small seeded normals (norms stay identity)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "norm" in name or p.ndim == 1:
            p.copy_(torch.ones_like(p) if name.endswith("weight") and "norm" in name else torch.zeros_like(p))
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def build(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(MODEL patcher, CLIP) of the given architecture with random weights."""
    config = CONFIG_CLASSES[kind](UNET_CONFIGS[kind])
    device = comfy.model_management.get_torch_device()
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    _randomise(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                               offload_device=comfy.model_management.unet_offload_device())
    target = (comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
              if kind == "sd15" else
              comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel))
    clip = comfy.sd.CLIP(target)
    _randomise(clip.cond_stage_model, seed + 1)
    return patcher, clip
