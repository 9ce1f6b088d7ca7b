"""sgl-kernel (SGLang's CUDA kernels): `int8_scaled_mm` / `fp8_scaled_mm` with per-token x
per-channel scales and its per-token fp8 quant. Its wheels are built for one PyTorch version
each; when they do not match, the import error is reported as the reason."""
from __future__ import annotations

import torch

from .. import reference
from ..schemes import Scheme
from .optional_import import try_import
from .registry import Backend, capability_reason, cuda_capability, cuda_missing, register_backend

_MIN_CAPABILITY = {"int8-w8a8": (8, 0), "fp8-w8a8": (8, 9)}


def _availability():
    return try_import("sgl_kernel")[1] or cuda_missing()


def _supports(scheme: Scheme, device: torch.device):
    return capability_reason(scheme, device, cuda_capability(device), _MIN_CAPABILITY.get(scheme.name), "sgl-kernel")


def _quant(x2d, scheme):
    sgl, _ = try_import("sgl_kernel")
    if scheme.name == "fp8-w8a8":
        q = torch.empty(x2d.shape, dtype=reference.FP8_DTYPE, device=x2d.device)
        s = torch.empty((x2d.shape[0], 1), dtype=torch.float32, device=x2d.device)
        sgl.sgl_per_token_quant_fp8(x2d.contiguous(), q, s)
        return q, s
    # sgl-kernel has no int8 activation quant op (SGLang uses Triton for it): use ours, or torch's.
    from .triton_backend import TRITON
    if TRITON.availability() is None:
        from ..kernels.triton_quant import per_token_quant
        return per_token_quant(x2d, torch.int8)
    return reference.quantize_rowwise(x2d, reference.INT8)


def _linear(x2d, qdata, scale, bias, scheme, in_features):
    sgl, _ = try_import("sgl_kernel")
    out_dtype = x2d.dtype
    if in_features % 16 or qdata.shape[0] % 16 or out_dtype not in (torch.bfloat16, torch.float16):
        return reference.emulated_linear(x2d, qdata, scale, scheme, bias, in_features)
    xq, xs = _quant(x2d, scheme)
    mm = sgl.int8_scaled_mm if scheme.name == "int8-w8a8" else sgl.fp8_scaled_mm
    b = None if bias is None else bias.to(out_dtype)
    return mm(xq, qdata.t(), xs, scale.reshape(-1).float(), out_dtype, b)


SGL_KERNEL = register_backend(Backend(
    name="sgl-kernel", priority=25, availability=_availability, supports=_supports, linear=_linear,
    install_hint="Install the optional extra: `pip install comfyui-quantdit[sgl]` (an sgl-kernel build for your "
                 "PyTorch and CUDA).",
))
