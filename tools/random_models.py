"""SD1.5-, SDXL-, Flux.1- and SD3.5-architecture models with random weights, built by ComfyUI from
its own model configs: the real layer shapes (for memory and time at real sizes, and for layer
addressing) without any checkpoint. Weights are seeded; the images they make are noise.

The flow transformers keep their real depth (Flux.1: 19 double + 38 single blocks; SD3.5 Medium:
24 joint blocks, the first 13 with MM-DiT-X's second, image-only attention) at a reduced width,
with ComfyUI's own Flux/SD3 tokenizers and encoders of a few layers.

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
import comfy.text_encoders.flux  # noqa: E402
import comfy.text_encoders.sd3_clip  # noqa: E402
import comfy.text_encoders.t5  # noqa: E402

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
# Flux.1-dev's layout (model_detection.py: 19 double, 38 single blocks, patch 2, guidance embedding)
# at 128 channels, 4 heads of 32 (RoPE axes 8 + 12 + 12), text width 64.
UNET_CONFIGS["flux_small"] = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64,
                              "context_in_dim": 64, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 4,
                              "depth": 19, "depth_single_blocks": 38, "axes_dim": [8, 12, 12], "theta": 10000,
                              "qkv_bias": True, "guidance_embed": True, "patch_size": 2}
# SD3.5 Medium's layout (24 joint blocks, MM-DiT-X self-attention in blocks 0-12, RMS q/k norm) with
# MMDiT's width rule at depth 2 (128 channels, 2 heads of 64); context 4096 wide, as SD3's encoders give it.
UNET_CONFIGS["sd35_small"] = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "num_blocks": 24,
                              "input_size": None, "adm_in_channels": 2048, "pos_embed_scaling_factor": None,
                              "context_embedder_config": {"target": "torch.nn.Linear",
                                                          "params": {"in_features": 4096, "out_features": 128}},
                              "num_patches": 32 * 32, "pos_embed_max_size": 32, "qk_norm": "rms",
                              "x_block_self_attn_layers": list(range(13))}
CONFIG_CLASSES = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL,
                  "sdxl_small": comfy.supported_models.SDXL, "flux_small": comfy.supported_models.Flux,
                  "sd35_small": comfy.supported_models.SD3}
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


_T5 = {"d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2, "vocab_size": 32128, "dense_act_fn": "gelu_pytorch_tanh",
       "is_gated_act": True, "layer_norm_epsilon": 1e-6, "model_type": "t5", "relative_attention_num_buckets": 32,
       "relative_attention_max_distance": 128}


def small_t5(width: int, device, dtype, model_options) -> comfy.sd1_clip.SDClipModel:
    """T5's encoder as ComfyUI runs T5-XXL (end token 1, padding 0), two layers of `width`."""
    return comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=dict(_T5, d_model=width),
                                      special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                                      enable_attention_masks=False, return_attention_masks=False,
                                      model_options={**model_options, "model_name": "t5xxl"})


class SmallFluxClip(comfy.text_encoders.flux.FluxClipModel):
    """Flux's CLIP-L (pooled vector) and T5 (the context) at widths 64, on ComfyUI's Flux tokenizer."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        torch.nn.Module.__init__(self)
        self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                 model_options=model_options,
                                                 textmodel_json_config=dict(_CLIP, hidden_size=64, projection_dim=64,
                                                                            hidden_act="quick_gelu"))
        self.t5xxl = small_t5(64, device, dtype, model_options)
        self.dtypes = {dtype}


class SmallSD3Clip(comfy.text_encoders.sd3_clip.SD3ClipModel):
    """SD3's CLIP-L and G (SDXL's small pair) without T5, as SD3 also runs: ComfyUI pads their 77
    tokens to SD3's context width 4096 (a T5 at that width would weigh 0.5 GB for its vocabulary alone)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        torch.nn.Module.__init__(self)
        pair = SmallSDXLClip(device=device, dtype=dtype, model_options=model_options)
        self.clip_l, self.clip_g = pair.clip_l, pair.clip_g
        self.t5xxl, self.t5_attention_mask = None, False
        self.dtypes = {dtype}


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops leave weights uninitialised: seeded normals scaled by fan-in, zero biases, and
    identity norms (so activations keep a sane scale through the whole network)."""
    g = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        norm = isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or "Norm" in type(sub).__name__  # Flux's RMSNorm
        for name, p in sub.named_parameters(recurse=False):
            if p.ndim == 0:  # e.g. CLIP's logit_scale
                continue
            if norm:
                p.copy_(torch.ones_like(p) if name in ("weight", "scale") else torch.zeros_like(p))
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
    if getattr(model.diffusion_model, "pos_embed", None) is not None:  # SD3's buffer is left uninitialised
        model.diffusion_model.pos_embed.copy_(torch.randn(model.diffusion_model.pos_embed.shape,
                                                          generator=torch.Generator().manual_seed(seed)) * 0.1)
    model.diffusion_model.to(dtype)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                               offload_device=comfy.model_management.unet_offload_device())
    target = {"sd15": comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
              "sdxl": comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
              "sdxl_small": comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, SmallSDXLClip),
              "flux_small": comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, SmallFluxClip),
              "sd35_small": comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                                                                   SmallSD3Clip)}[kind]
    clip = comfy.sd.CLIP(target)
    _randomise(clip.cond_stage_model, seed + 1)
    return patcher, clip
