"""TinyFlux: the pack's own small model in Flux's architecture, as ComfyUI builds it.

- Transformer: ComfyUI's `comfy.ldm.flux.model.Flux` (double-stream then single-stream blocks,
  joint text+image attention, 3-axis RoPE) built by `comfy.model_base.Flux` from `TinyFluxConfig`,
  a subclass of ComfyUI's Flux config used directly, never registered. Width 96, 3 heads of 32
  (RoPE axes 4+14+14 as Flux's 16+56+56), 3 double and 3 single blocks, no guidance embedding.
  Patch 2 as Flux: a 16x16 latent is 8x8 = 64 image tokens (see docs/demo-model.md for why).
- Sampling: rectified flow (velocity prediction) on ComfyUI's `ModelSamplingFlux` with Flux's
  default shift 1.15, so KSampler's euler etc. work unchanged; ordinary classifier-free guidance
  (cfg ~4) instead of Flux-dev's distilled guidance input (trained with 10% empty captions).
- Text encoder: ComfyUI's T5 (`comfy.text_encoders.t5.T5`, 2 layers, width 64) on ComfyUI's own
  T5 SentencePiece tokenizer, frozen at a seeded random initialisation (only the domain's tokens
  have non-zero embeddings). Tokens go under "t5xxl" as in ComfyUI's FluxTokenizer, unpadded, so the
  conditioning's text tokens are exactly the tokenizer's. No pooled text path: Flux's pooled vector
  input (CLIP-L's in Flux) is a zero vector, so `vector_in` adds only a constant to the modulation
  and the text reaches the image only through the joint attention (a word's image->text map then
  localises where the word is drawn, as P2P's local blend needs).
- VAE and latents: TinySD's hand-set TAESD and SD1's latent scale (`tinysd.taesd_state_dict`).
"""
from __future__ import annotations

import functools
import os

import torch

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.t5
import comfy.utils
from transformers import T5TokenizerFast

import tinysd

LATENT_SIZE = tinysd.LATENT_SIZE
TEXT_DIM = 64
FLUX_CONFIG = {
    "image_model": "flux", "in_channels": 4, "out_channels": 4, "vec_in_dim": TEXT_DIM,
    "context_in_dim": TEXT_DIM, "hidden_size": 96, "mlp_ratio": 4.0, "num_heads": 3, "depth": 3,
    "depth_single_blocks": 3, "axes_dim": [4, 14, 14], "theta": 10000, "patch_size": 2,
    "qkv_bias": True, "guidance_embed": False,
}
T5_CONFIG = {
    "d_ff": 128, "d_kv": 32, "d_model": TEXT_DIM, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
    "layer_norm_epsilon": 1e-6, "model_type": "t5", "num_heads": 2, "num_layers": 2, "vocab_size": 32128,
}
T5_PREFIX = "text_encoders.t5xxl.transformer."
T5_TOKENIZER = os.path.join(os.path.dirname(os.path.realpath(comfy.text_encoders.t5.__file__)), "t5_tokenizer")


class TinyT5Tokenizer(comfy.sd1_clip.SDTokenizer):
    """ComfyUI's T5 tokenizer as Flux uses it, without Flux's padding to 256 tokens."""
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(T5_TOKENIZER, embedding_directory=embedding_directory, pad_with_end=False,
                         embedding_size=TEXT_DIM, embedding_key="t5xxl", tokenizer_class=T5TokenizerFast,
                         has_start_token=False, pad_to_max_length=False, max_length=99999999, min_length=1,
                         tokenizer_data=tokenizer_data)


class TinyFluxTokenizer(comfy.sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                         name="t5xxl", tokenizer=TinyT5Tokenizer)


class TinyT5Model(comfy.sd1_clip.SDClipModel):
    """ComfyUI's T5 encoder with the tiny config; its pooled output is zeros (no pooled text path)."""
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, layer="last", textmodel_json_config=T5_CONFIG, dtype=dtype,
                         special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                         model_options={**model_options, "model_name": "t5xxl"})

    def forward(self, tokens):
        z, _ = super().forward(tokens)[:2]
        return z, torch.zeros(z.shape[0], TEXT_DIM, dtype=z.dtype, device=z.device)


class TinyFluxTextEncoder(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options=model_options, name="t5xxl",
                         clip_model=TinyT5Model, **kwargs)


class TinyFluxConfig(comfy.supported_models.Flux):
    """Flux with the small unet_config and SD1's 4-channel latents; used directly, never registered."""
    unet_config = FLUX_CONFIG
    latent_format = comfy.latent_formats.SD15
    supported_inference_dtypes = [torch.float32]

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(TinyFluxTokenizer, TinyFluxTextEncoder)


def load_checkpoint(path: str):
    """(MODEL, CLIP, VAE) from a TinyFlux checkpoint, as CheckpointLoaderSimple would give them."""
    return load_state_dict(comfy.utils.load_torch_file(path, safe_load=True))


def load_state_dict(sd: dict):
    sd = dict(sd)
    config = TinyFluxConfig(FLUX_CONFIG)
    load_device = comfy.model_management.get_torch_device()
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, "model.diffusion_model.")
    model.load_model_weights(sd, "model.diffusion_model.")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                               offload_device=comfy.model_management.unet_offload_device())
    vae = comfy.sd.VAE(sd=comfy.utils.state_dict_prefix_replace(dict(sd), {"vae.": ""}, filter_keys=True))
    clip_sd = comfy.utils.state_dict_prefix_replace(dict(sd), {T5_PREFIX: ""}, filter_keys=True)  # pops from its input
    clip = comfy.sd.CLIP(config.clip_target(), parameters=comfy.utils.calculate_parameters(clip_sd))
    missing, unexpected = clip.load_sd(clip_sd)
    if missing:
        raise ValueError(f"TinyFlux checkpoint lacks text-encoder weights: {missing[:5]}")
    return patcher, clip, vae


# ---- the frozen text encoder -------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def vocabulary_token_ids() -> tuple[int, ...]:
    tokenizer = TinyT5Tokenizer()
    ids = {0, 1}  # pad, end
    for word in tinysd.VOCABULARY:
        ids.update(int(t) for t, _ in tokenizer.tokenize_with_weights(word)[0])
    return tuple(sorted(ids))


def text_encoder_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Seeded random T5 weights (keys as the checkpoint stores them, under T5_PREFIX).

    Random projections scaled by 1/sqrt(fan_in) keep the activations O(1) through both layers,
    so distinct words stay distinct after the frozen encoder."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in TinyT5Model().transformer.state_dict().items():
        if key == "shared.weight":
            t = torch.zeros_like(value)
            ids = torch.tensor(vocabulary_token_ids())
            t[ids] = torch.randn(len(ids), value.shape[1], generator=g)
        elif "layer_norm" in key:
            t = torch.ones_like(value)
        elif "relative_attention_bias" in key:
            t = 0.5 * torch.randn(value.shape, generator=g)
        else:
            t = torch.randn(value.shape, generator=g) / value.shape[1] ** 0.5
        sd[T5_PREFIX + key] = t
    return sd
