"""Test/demo-only custom nodes: load TinySD and TinyFlux, the pack's small SD1.5- and Flux-architecture models.

Linked into ComfyUI's custom_nodes by tools/setup.sh for the demo and the tests; the pack that
users install does not load it. It changes no ComfyUI global (no model config is registered).
"""
import os
import sys

from comfy_api.latest import ComfyExtension, io

sys.path.insert(0, os.path.dirname(__file__))
import tinysd  # noqa: E402

CHECKPOINT = os.path.join(os.path.dirname(__file__), "tinysd.safetensors")
FLUX_CHECKPOINT = os.path.join(os.path.dirname(__file__), "tinyflux.safetensors")


class TinySDCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TinySDCheckpointLoader", display_name="Load TinySD (demo model)", category="loaders",
            description="The attention-edit pack's own small SD1.5-architecture model (128x128 images of "
                        "coloured shapes). Stands in for CheckpointLoaderSimple in the demo and tests.",
            inputs=[],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(*tinysd.load_checkpoint(CHECKPOINT))


class TinyFluxCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TinyFluxCheckpointLoader", display_name="Load TinyFlux (demo model)", category="loaders",
            description="The attention-edit pack's own small Flux-architecture model (128x128 images of "
                        "coloured shapes; T5 tokens under 't5xxl'). Use ordinary CFG (about 4), no FluxGuidance.",
            inputs=[],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        import tinyflux  # imported here: TinySD alone needs no T5 tokenizer

        return io.NodeOutput(*tinyflux.load_checkpoint(FLUX_CHECKPOINT))


class TinySDExtension(ComfyExtension):
    async def get_node_list(self):
        return [TinySDCheckpointLoader, TinyFluxCheckpointLoader]


async def comfy_entrypoint():
    return TinySDExtension()
