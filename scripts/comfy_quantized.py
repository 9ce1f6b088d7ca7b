"""A state dict quantized by ComfyUI's own quantizer (comfy.quant_ops, comfy-kitchen), in the
`_quantization_metadata` layout ComfyUI reads: for the tests and the benchmark that compare the
pack with stock ComfyUI on ComfyUI's files. Needs ComfyUI importable."""
from __future__ import annotations

import json
from typing import Callable, Optional

import torch

# ComfyUI's format name -> its layout class (comfy.quant_ops.QUANT_ALGOS)
LAYOUT_OF = {"float8_e4m3fn": "TensorCoreFP8E4M3Layout", "int8_tensorwise": "TensorWiseINT8Layout",
             "nvfp4": "TensorCoreNVFP4Layout", "mxfp8": "TensorCoreMXFP8Layout"}


def comfy_quantized(sd: dict[str, torch.Tensor], fmt: str, quantize: Callable[[str], bool],
                    device: Optional[str] = None, **kw) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata): the 2-D `.weight`s whose key `quantize` accepts, quantized to `fmt`
    (on `device`, results back on the CPU), every other tensor as it is."""
    from comfy.quant_ops import QuantizedTensor
    out, layers = {}, {}
    for key, t in sd.items():
        if key.endswith(".weight") and t.dim() == 2 and quantize(key):
            q = QuantizedTensor.from_float(t if device is None else t.to(device), LAYOUT_OF[fmt], **kw)
            out.update({k: v.cpu() for k, v in q.state_dict(key).items()})
            layers[key[:-len(".weight")]] = {"format": fmt}
        else:
            out[key] = t
    return out, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
