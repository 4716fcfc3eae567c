"""Test/demo-only custom nodes: load TinySD and TinyFlux, the pack's small SD1.5- and Flux-architecture models.

Linked into ComfyUI's custom_nodes by tools/setup.sh for the demo and the tests; the pack that
users install does not load it. It changes no ComfyUI global (no model config is registered).
"""
import importlib
import os
import sys

from comfy_api.latest import ComfyExtension, io

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)


class _DemoLoader(io.ComfyNode):
    """A demo model's checkpoint as CheckpointLoaderSimple gives one: MODEL, CLIP, VAE."""
    NODE_ID = DISPLAY_NAME = DESCRIPTION = ""
    MODULE, CHECKPOINT = "", ""  # the model's module here (imported when loading) and its weights

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID, display_name=cls.DISPLAY_NAME, category="loaders", description=cls.DESCRIPTION,
            inputs=[],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(*importlib.import_module(cls.MODULE).load_checkpoint(cls.CHECKPOINT))


class TinySDCheckpointLoader(_DemoLoader):
    NODE_ID, DISPLAY_NAME = "TinySDCheckpointLoader", "Load TinySD (demo model)"
    DESCRIPTION = ("The attention-edit pack's own small SD1.5-architecture model (128x128 images of coloured "
                   "shapes). Stands in for CheckpointLoaderSimple in the demo and tests.")
    MODULE, CHECKPOINT = "tinysd", os.path.join(HERE, "tinysd.safetensors")


class TinyFluxCheckpointLoader(_DemoLoader):
    NODE_ID, DISPLAY_NAME = "TinyFluxCheckpointLoader", "Load TinyFlux (demo model)"
    DESCRIPTION = ("The attention-edit pack's own small Flux-architecture model (128x128 images of coloured "
                   "shapes; T5 tokens under 't5xxl'). Use ordinary CFG (about 4), no FluxGuidance.")
    MODULE, CHECKPOINT = "tinyflux", os.path.join(HERE, "tinyflux.safetensors")  # imported when loaded: T5's tokenizer


class TinySDExtension(ComfyExtension):
    async def get_node_list(self):
        return [TinySDCheckpointLoader, TinyFluxCheckpointLoader]


async def comfy_entrypoint():
    return TinySDExtension()
