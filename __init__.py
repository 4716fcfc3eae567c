"""comfyui-attention-edit: Prompt-to-Prompt and Free-Prompt-Editing as ComfyUI nodes."""
try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # imported outside ComfyUI (e.g. by pytest collecting the repo): no nodes
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import NODES

    class AttentionEditExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    async def comfy_entrypoint() -> AttentionEditExtension:
        return AttentionEditExtension()
