"""ComfyUI glue: node classes and the custom operations they install. Imports comfy."""
from __future__ import annotations

from .encoder_nodes import (QuantDiTCLIPVisionLoader, QuantDiTQuantizeCLIPVision, QuantDiTQuantizeTextEncoder,
                            QuantDiTT5Loader)
from .loader_nodes import QuantDiTLoader
from .probe_node import QuantDiTHardwareProbe
from .quantize_nodes import QuantDiTLayerwiseFP8Cast, QuantDiTQuantizeModel
from .save_node import QuantDiTSaveQuantized

NODES = [QuantDiTLoader, QuantDiTQuantizeModel, QuantDiTLayerwiseFP8Cast, QuantDiTT5Loader, QuantDiTCLIPVisionLoader,
         QuantDiTQuantizeTextEncoder, QuantDiTQuantizeCLIPVision, QuantDiTHardwareProbe, QuantDiTSaveQuantized]
