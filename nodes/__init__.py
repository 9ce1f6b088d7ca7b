"""ComfyUI glue: node classes and the custom operations they install. Imports comfy."""
from __future__ import annotations

from .loader_nodes import QuantDiTLoader
from .quantize_nodes import QuantDiTLayerwiseFP8Cast, QuantDiTQuantizeModel

NODES = [QuantDiTLoader, QuantDiTQuantizeModel, QuantDiTLayerwiseFP8Cast]
