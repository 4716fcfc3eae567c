"""TinySD: the pack's own small model in Stable Diffusion 1.5's architecture, as ComfyUI builds it.

- UNet: ComfyUI's `UNetModel` with SD1.5's block layout (4 levels, 2 res blocks, one transformer
  block at each of the first three levels and in the middle: 16 attention layers with SD1.5's
  block names and transformer indices), 32 base channels, 2 heads, context 64.
  Latents are 16x16 (images 128x128), so attention runs at 16², 8², 4² and 2².
- Text encoder: ComfyUI's SD1 CLIP tokenizer and `CLIPTextModel` (2 layers, width 64), frozen at a
  seeded random initialisation: distinct words get distinct embeddings from the start, which the
  UNet then learns to read. Only the vocabulary of the domain has non-zero token embeddings.
- VAE: TAESD's architecture (loads through ComfyUI's standard VAE code) with hand-set weights: the
  encoder is a colour transform followed by an 8x8 mean, the decoder its inverse (nearest
  upsampling). Images are 16x16 'pixel art' at 128x128, and decode -> encode is exact.
- eps-prediction on SD's scaled-linear discrete schedule (ComfyUI's SD15 model config).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils

LATENT_SIZE = 16
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 2, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 64, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
CLIP_CONFIG = {
    "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2,
    "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 64, "eos_token_id": 49407, "bos_token_id": 49406,
}
VOCABULARY = ("a", "on", "background", "red", "green", "blue", "yellow", "circle", "square",
              "triangle", "white", "black", "gray")
VAE_SCALE = 0.18215  # SD1's latent scale: the UNet and the TAESD decoder both see latent * this


class TinyClipModel(comfy.sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, model_options=model_options,
                         textmodel_json_config=CLIP_CONFIG, return_projected_pooled=False)


class TinyClip(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TinyClipModel, **kwargs)


class TinySD15(comfy.supported_models.SD15):
    """SD15 with the small unet_config; used directly, never registered in ComfyUI's model list."""
    unet_config = UNET_CONFIG
    unet_extra_config = {"num_heads": 2, "num_head_channels": -1}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClip)


def load_checkpoint(path: str):
    """(MODEL, CLIP, VAE) from a TinySD checkpoint, as CheckpointLoaderSimple would give them."""
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    return load_state_dict(sd)


def load_state_dict(sd: dict):
    sd = dict(sd)
    config = TinySD15(UNET_CONFIG)
    load_device = comfy.model_management.get_torch_device()
    dtype = comfy.model_management.unet_dtype(model_params=0, supported_dtypes=config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, load_device))
    model = config.get_model(sd, "model.diffusion_model.")
    model.load_model_weights(sd, "model.diffusion_model.")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                               offload_device=comfy.model_management.unet_offload_device())
    vae = comfy.sd.VAE(sd=comfy.utils.state_dict_prefix_replace(sd, {"first_stage_model.": ""}, filter_keys=True))
    clip_sd = config.process_clip_state_dict(sd)
    clip = comfy.sd.CLIP(config.clip_target(), tokenizer_data=clip_sd,
                         parameters=comfy.utils.calculate_parameters(clip_sd))
    missing, _ = clip.load_sd(clip_sd, full_model=True)
    if [k for k in missing if "logit_scale" not in k and "text_projection" not in k]:
        raise ValueError(f"TinySD checkpoint lacks text-encoder weights: {missing[:5]}")
    return patcher, clip, vae


# ---- the hand-set TAESD ----------------------------------------------------------------------
# latent e (what the UNet sees) = COLOUR @ (rgb - 0.5), averaged over 8x8 pixels.
_Y, _C1, _C2 = np.array([1, 1, 1]) / 3**0.5, np.array([1, -1, 0]) / 2**0.5, np.array([1, 1, -2]) / 6**0.5
COLOUR = 1.4 * np.stack([_Y, _C1, _C2, (_C1 + _C2) / 2]).astype(np.float32)  # 4x3; |e| <= ~1.2
COLOUR_INV = np.linalg.pinv(COLOUR).astype(np.float32)  # 3x4


def _conv_taps(n_out: int, n_in: int, taps: dict[tuple[int, int], float], pairs: list[tuple[int, int]]) -> torch.Tensor:
    w = torch.zeros(n_out, n_in, 3, 3)
    for o, i in pairs:
        for (dy, dx), value in taps.items():
            w[o, i, dy, dx] = value
    return w


def taesd_state_dict() -> dict[str, torch.Tensor]:
    """Weights for comfy.taesd.taesd.TAESD that make it the linear autoencoder described above.

    Signed values travel through TAESD's ReLUs as (+v, -v) channel pairs; its residual Blocks get
    zero convolutions (so Block(x) = relu(x) = x for x >= 0); the stride-2 convolutions average 2x2;
    the decoder's convolutions after each nearest upsampling copy.
    """
    from comfy.taesd.taesd import TAESD

    taesd = TAESD()
    sd = {k: torch.zeros_like(v) for k, v in taesd.state_dict().items()}
    pairs = [(c, c) for c in range(8)]
    colour = torch.from_numpy(COLOUR)
    # encoder: conv(3,64) -> +-(COLOUR @ (rgb - 0.5)); 3x stride-2 2x2 mean; conv(64,4) -> (+) - (-)
    w = torch.zeros(64, 3, 3, 3)
    w[0:4, :, 1, 1], w[4:8, :, 1, 1] = colour, -colour
    sd["taesd_encoder.0.weight"] = w
    bias = -0.5 * colour.sum(1)
    sd["taesd_encoder.0.bias"] = torch.cat([bias, -bias, torch.zeros(56)])
    for idx in (2, 6, 10):
        sd[f"taesd_encoder.{idx}.weight"] = _conv_taps(64, 64, {(1, 1): .25, (1, 2): .25, (2, 1): .25, (2, 2): .25}, pairs)
    w = torch.zeros(4, 64, 3, 3)
    for c in range(4):
        w[c, c, 1, 1], w[c, c + 4, 1, 1] = 1.0, -1.0
    sd["taesd_encoder.14.weight"] = w
    # decoder: conv(4,64) -> +-e; 3x (nearest upsample, copy); conv(64,3) -> rgb in [0, 1]
    w = torch.zeros(64, 4, 3, 3)
    for c in range(4):
        w[c, c, 1, 1], w[c + 4, c, 1, 1] = 1.0, -1.0
    sd["taesd_decoder.1.weight"] = w
    for idx in (7, 12, 17):
        sd[f"taesd_decoder.{idx}.weight"] = _conv_taps(64, 64, {(1, 1): 1.0}, pairs)
    inv = torch.from_numpy(COLOUR_INV)
    w = torch.zeros(3, 64, 3, 3)
    w[:, 0:4, 1, 1], w[:, 4:8, 1, 1] = inv, -inv
    sd["taesd_decoder.19.weight"] = w
    sd["taesd_decoder.19.bias"] = torch.full((3,), 0.5)
    sd["vae_scale"] = torch.tensor(VAE_SCALE)
    return sd


def encode_images(images: np.ndarray) -> np.ndarray:
    """What the UNet sees for NxHxWx3 images in [0, 1]: the hand-set encoder in closed form."""
    n, h, w, _ = images.shape
    blocks = images.reshape(n, h // 8, 8, w // 8, 8, 3).mean((2, 4)) - 0.5
    return np.einsum("cj,nhwj->nchw", COLOUR, blocks).astype(np.float32)


# ---- the frozen text encoder -------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def vocabulary_token_ids() -> tuple[int, ...]:
    tokenizer = comfy.sd1_clip.SD1Tokenizer()
    ids = {49406, 49407}
    for word in VOCABULARY:
        for token, _ in tokenizer.tokenize_with_weights(word)["l"][0][1:]:
            if token != 49407:
                ids.add(int(token))
    return tuple(sorted(ids))


def text_encoder_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Seeded random CLIPTextModel weights (keys as in an SD1 checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    prefix = "cond_stage_model.transformer.text_model."
    clip = TinyClip()
    sd = {}
    for key, value in clip.state_dict().items():
        key = key.replace("clip_l.transformer.text_model.", "")
        if "clip_l" in key or key.startswith("clip_l") or "logit_scale" in key or "text_projection" in key:
            continue
        if key.endswith("token_embedding.weight"):
            t = torch.zeros_like(value)
            ids = torch.tensor(vocabulary_token_ids())
            t[ids] = torch.randn(len(ids), value.shape[1], generator=g)
        elif key.endswith("position_embedding.weight"):
            t = 0.3 * torch.randn(value.shape, generator=g)
        elif "norm" in key:
            t = torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value)
        elif key.endswith("weight"):
            t = torch.randn(value.shape, generator=g) / value.shape[1] ** 0.5
        else:
            t = torch.zeros_like(value)
        sd[prefix + key] = t
    return sd


def decode_latents(e: np.ndarray) -> np.ndarray:
    """The hand-set decoder in closed form: Nx4xhxw (what the UNet sees) -> NxHxWx3 in [0, 1]."""
    e = np.tanh(np.asarray(e, dtype=np.float32) / 3) * 3  # TAESD's Clamp
    rgb = np.einsum("jc,nchw->nhwj", COLOUR_INV, e) + 0.5
    return np.clip(rgb.repeat(8, 1).repeat(8, 2), 0, 1)
