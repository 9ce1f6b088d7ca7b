"""sgl-kernel (SGLang's CUDA kernels, on PyPI as `sglang-kernel`, formerly `sgl-kernel`):
`int8_scaled_mm` / `fp8_scaled_mm` with per-token x per-channel scales and its per-token fp8 quant.
Its wheels are built for one PyTorch version each (sglang-kernel 0.4.2-0.4.6 for torch 2.11,
0.4.6.post1-0.4.8 for 2.13, 0.4.9 on for 2.14.1); when they do not match, the import error is
reported as the reason."""
from __future__ import annotations

import torch

from .. import reference
from ..schemes import Scheme
from ..shared_quant import QuantizedRows
from .optional_import import try_import
from .pack_rows import quantized_by_pack, triton_quant, written
from .registry import Backend, capability_reason, cuda_capability, cuda_missing, register_backend

_MIN_CAPABILITY = {"int8-w8a8": (8, 0), "fp8-w8a8": (8, 9)}
_OPS = ("int8_scaled_mm", "fp8_scaled_mm", "sgl_per_token_quant_fp8")


def _availability():
    sgl, why = try_import("sgl_kernel")
    if why:
        return why
    missing = [op for op in _OPS if not hasattr(sgl, op)]
    if missing:  # a release that renamed or dropped them (0.4.x dropped its dense blockwise GEMM)
        return f"this sgl-kernel version lacks {', '.join(missing)} (a version this pack does not know)"
    return cuda_missing()


def _supports(scheme: Scheme, device: torch.device):
    return capability_reason(scheme, device, cuda_capability(device), _MIN_CAPABILITY.get(scheme.name), "sgl-kernel")


def _per_token(x2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    done = quantized_by_pack(x2d, dtype)
    if done is not None:
        return done
    x2d = written(x2d)
    if dtype == torch.int8:  # sgl-kernel has no per-token int8 quant op (SGLang uses Triton for it)
        tq = triton_quant()
        return tq.per_token_quant(x2d, dtype) if tq is not None else reference.quantize_rowwise(x2d, reference.INT8)
    q = torch.empty(x2d.shape, dtype=dtype, device=x2d.device)
    s = torch.empty((x2d.shape[0], 1), dtype=torch.float32, device=x2d.device)
    try_import("sgl_kernel")[0].sgl_per_token_quant_fp8(x2d, q, s)
    return q, s


def _quantize_rows(x2d, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    return _per_token(x2d, reference.activation_dtype(scheme))


def _linear(x2d, qdata, scale, bias, scheme, in_features):
    sgl, _ = try_import("sgl_kernel")
    out_dtype = x2d.dtype
    if in_features % 16 or qdata.shape[0] % 16 or out_dtype not in (torch.bfloat16, torch.float16):
        if isinstance(x2d, QuantizedRows):
            return reference.emulated_linear_quantized(x2d.q, x2d.scale, out_dtype, qdata, scale, scheme, bias,
                                                       in_features)
        return reference.emulated_linear(written(x2d), qdata, scale, scheme, bias, in_features)
    xq, xs = _quantize_rows(x2d, scheme)
    mm = sgl.int8_scaled_mm if scheme.name == "int8-w8a8" else sgl.fp8_scaled_mm
    b = None if bias is None else bias.to(out_dtype)
    return mm(xq, qdata.t(), xs, scale.reshape(-1).float(), out_dtype, b)


SGL_KERNEL = register_backend(Backend(
    name="sgl-kernel", priority=25, availability=_availability, supports=_supports, linear=_linear,
    deferred_schemes=frozenset({"int8-w8a8", "fp8-w8a8"}),
    row_quantizer=_quantize_rows,
    install_hint="Install the optional extra: `pip install comfyui-quantdit[sgl]`, or the sglang-kernel "
                 "release built for your PyTorch (0.4.2-0.4.6 for torch 2.11, 0.4.9+ for torch 2.14.1).",
))
