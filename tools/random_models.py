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
                 use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
                 num_head_channels=64),
}
# SDXL's layout (levels, transformer depths 2/10, context 2048, pooled adm 2816, 64-channel heads) at a
# fifth of its width, so that a test builds it in seconds: the same 70 attention layers and keys.
UNET_CONFIGS["sdxl_small"] = dict(UNET_CONFIGS["sdxl"], model_channels=64)
CONFIG_CLASSES = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL,
                  "sdxl_small": comfy.supported_models.SDXL}
_CLIP = {"intermediate_size": 1024, "num_attention_heads": 4, "num_hidden_layers": 3, "vocab_size": 49408,
         "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "eos_token_id": 49407, "bos_token_id": 49406}


class SmallSDXLClip(comfy.sdxl_clip.SDXLClipModel):
    """SDXL's two text encoders (CLIP-L and bigG: same outputs, widths 768 + 1280 and pooled 1280) with
    three layers each: ComfyUI's own SDXL tokenizer and encoding path at a fraction of the size."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        torch.nn.Module.__init__(self)
        self.clip_l = comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
            model_options=model_options,
            textmodel_json_config=dict(_CLIP, hidden_size=768, projection_dim=768, hidden_act="quick_gelu"))
        self.clip_g = comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
            special_tokens={"start": 49406, "end": 49407, "pad": 0}, return_projected_pooled=True,
            model_options={**model_options, "model_name": "clip_g"},
            textmodel_json_config=dict(_CLIP, hidden_size=1280, projection_dim=1280, hidden_act="gelu"))
        self.dtypes = {dtype}


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops leave weights uninitialised: seeded normals scaled by fan-in, zero biases, and
    identity norms (so activations keep a sane scale through the whole network)."""
    g = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        norm = isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        for name, p in sub.named_parameters(recurse=False):
            if p.ndim == 0:  # e.g. CLIP's logit_scale
                continue
            if norm:
                p.copy_(torch.ones_like(p) if name == "weight" else torch.zeros_like(p))
            elif p.ndim == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


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
    target = {"sd15": comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
              "sdxl": comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
              "sdxl_small": comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, SmallSDXLClip)}[kind]
    clip = comfy.sd.CLIP(target)
    _randomise(clip.cond_stage_model, seed + 1)
    return patcher, clip
