"""ComfyUI in-process with this pack and TinySD, for the measurement scripts (and the tests)."""
from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import numpy as np
import torch

import comfyui_env


@functools.lru_cache(maxsize=1)
def node_classes() -> dict:
    path = comfyui_env.setup()
    torch.set_num_threads(1)
    import nodes

    import make_workflows  # the example workflows' core extras (PrimitiveInt, ...), as the server has them

    make_workflows.load_core_extras(nodes, path)
    for name in ("comfyui-attention-edit", "comfyui-attention-edit-demo-model"):
        folder = path / "custom_nodes" / name
        if not folder.exists():
            raise SystemExit(f"{folder} missing: run tools/setup.sh")
        if not asyncio.run(nodes.load_custom_node(str(folder))):
            raise SystemExit(f"ComfyUI failed to load {name}")
    return nodes.NODE_CLASS_MAPPINGS


@dataclass
class Tiny:
    """TinySD loaded through its loader node, with the few calls the scripts need."""
    model: object
    clip: object
    vae: object
    steps: int = 20
    cfg: float = 5.0
    sampler: str = "euler"
    scheduler: str = "normal"
    size: int = 128  # image size in pixels

    @classmethod
    def load(cls, loader: str = "TinySDCheckpointLoader", **kw) -> "Tiny":
        """A demo model through its loader node (TinySDCheckpointLoader, TinyFluxCheckpointLoader)."""
        return cls(*node_classes()[loader].execute().result, **kw)

    def node(self, name: str):
        return node_classes()[name]

    def encode(self, text: str):
        import nodes
        return nodes.CLIPTextEncode().encode(self.clip, text)[0]

    def latent(self, batch: int = 1) -> dict:
        """An empty latent with the model's channels (4 for SD, 16 for Flux and SD3)."""
        import torch
        channels = self.model.model.latent_format.latent_channels
        return {"samples": torch.zeros(batch, channels, self.size // 8, self.size // 8)}

    def sample(self, model, positive, seed: int, batch: int = 1, negative=None, **kw) -> dict:
        import nodes
        negative = negative if negative is not None else self.encode("")
        opts = dict(steps=self.steps, cfg=self.cfg, sampler=self.sampler, scheduler=self.scheduler) | kw
        return nodes.common_ksampler(model, seed, opts["steps"], opts["cfg"], opts["sampler"], opts["scheduler"],
                                     positive, negative, self.latent(batch), disable_noise=False)[0]

    def sample_from(self, model, positive, latent: dict, negative=None, **kw) -> dict:
        """KSamplerAdvanced with add_noise disabled: sample from `latent` as it is (inverted noise)."""
        import nodes
        negative = negative if negative is not None else self.encode("")
        opts = dict(steps=self.steps, cfg=self.cfg, sampler=self.sampler, scheduler=self.scheduler) | kw
        return nodes.common_ksampler(model, 0, opts["steps"], opts["cfg"], opts["sampler"], opts["scheduler"],
                                     positive, negative, latent, disable_noise=True, force_full_denoise=True)[0]

    @property
    def flow(self) -> bool:
        """A flow-matching model (TinyFlux, Flux, SD3): its branches need DDIMInvert's noise."""
        import comfy.model_sampling
        return isinstance(self.model.get_model_object("model_sampling"), comfy.model_sampling.CONST)

    def sample_branch(self, model, positive, inverted: tuple, negative=None, **kw) -> dict:
        """A branch of a real-image edit from DDIMInvert's outputs, as the workflows wire it:
        KSamplerAdvanced (add_noise disabled) for UNets, SamplerCustomAdvanced for flow models."""
        if self.flow:
            return self.sample_inverted(model, positive, inverted, negative, **kw)
        return self.sample_from(model, positive, inverted[0], negative, **kw)

    def sample_inverted(self, model, positive, inverted: tuple, negative=None, **kw) -> dict:
        """SamplerCustomAdvanced from DDIMInvert's (LATENT, inversion, noise): the branch of a real-image
        edit as the flow-model workflows wire it (CFGGuider, KSamplerSelect, BasicScheduler)."""
        latent, _, noise = inverted
        negative = negative if negative is not None else self.encode("")
        opts = dict(steps=self.steps, cfg=self.cfg, sampler=self.sampler, scheduler=self.scheduler) | kw
        node = self.node
        guider = node("CFGGuider").execute(model, positive, negative, opts["cfg"]).result[0]
        sampler = node("KSamplerSelect").execute(opts["sampler"]).result[0]
        sigmas = node("BasicScheduler").execute(model, opts["scheduler"], opts["steps"], 1.0).result[0]
        return node("SamplerCustomAdvanced").execute(noise, guider, sampler, sigmas, latent).result[0]

    def encode_images(self, images: np.ndarray) -> dict:
        """NxHxWx3 images in [0, 1] through the VAE, as VAEEncode does."""
        with torch.no_grad():
            return {"samples": self.vae.encode(torch.from_numpy(np.ascontiguousarray(images)).float())}

    def images(self, latent: dict) -> np.ndarray:
        with torch.no_grad():
            return self.vae.decode(latent["samples"]).float().cpu().numpy()
