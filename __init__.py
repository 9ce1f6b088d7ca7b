"""ComfyUI-QuantDiT: quantized diffusion transformers for ComfyUI.

Registers the nodes through ComfyUI's V3 extension entry point. quant/ is importable without
ComfyUI (pure torch + safetensors); nodes/ is the glue.
"""
from typing_extensions import override

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES

    class QuantDiTExtension(ComfyExtension):
        @override
        async def get_node_list(self):
            return list(NODES)

    return QuantDiTExtension()
