"""Kernels that ship with PyTorch itself: rowwise fp8 `torch._scaled_mm` (sm89+), and weight-only
upcast + cuBLAS for the weight-only schemes."""
from __future__ import annotations

import torch

from .. import reference
from ..schemes import Scheme, get_scheme
from .registry import Backend, capability_reason, cuda_capability, cuda_missing, register_backend

_FP8 = get_scheme("fp8-w8a8")


def _supports(scheme: Scheme, device: torch.device):
    need = (8, 9) if scheme.name == "fp8-w8a8" else (0, 0) if scheme.is_8bit_weight_only else None
    return capability_reason(scheme, device, cuda_capability(device), need, "torch-native")


def per_token_fp8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp8 quant from torch ops alone (where Triton is missing), bit-equal to
    quant/reference.py: one pass for the row maxima and one multiply that casts to fp8 as it
    stores, instead of fp32 copies written and read back (three times the memory traffic). No
    clamp: |x| * (448 / amax) stays within rounding of 448, which the cast rounds to 448."""
    amax = torch.linalg.vector_norm(x2d, float("inf"), dim=-1, keepdim=True)
    scale = reference.scale_from_amax(amax, reference.FP8_E4M3)
    q = torch.empty(x2d.shape, dtype=torch.float8_e4m3fn, device=x2d.device)
    torch.mul(x2d, scale.reciprocal(), out=q)
    return q, scale


def _linear(x2d, qdata, scale, bias, scheme, in_features):
    if scheme.name == "fp8-w8a8":
        return _fp8_rowwise(x2d, qdata, scale, bias)
    return upcast_linear(x2d, qdata, scale, bias)


def upcast_linear(x2d, qdata, scale, bias):
    """8-bit weight-only: the weight widened to the activation dtype for this call, then cuBLAS."""
    w = qdata.to(x2d.dtype) * scale.to(x2d.dtype)  # [out,1] or scalar scale broadcasts
    return torch.nn.functional.linear(x2d, w, None if bias is None else bias.to(x2d.dtype))


def _fp8_rowwise(x2d, qdata, scale, bias):
    m, k = x2d.shape
    if k % 16 or qdata.shape[0] % 16:
        # _scaled_mm needs K and N multiples of 16; the layer filter normally keeps such layers out.
        return reference.emulated_linear(x2d, qdata, scale, _FP8, bias, k)
    xq, xs = per_token_fp8(x2d)
    out_dtype = torch.bfloat16  # the only output rowwise-scaled _scaled_mm gives
    b = None if bias is None else bias.to(out_dtype)
    y = torch._scaled_mm(xq, qdata.t(), scale_a=xs, scale_b=scale.reshape(1, -1).float(), bias=b, out_dtype=out_dtype)
    return y.to(x2d.dtype)



TORCH_NATIVE = register_backend(Backend(
    name="torch", priority=10, availability=cuda_missing, supports=_supports, linear=_linear,
    install_hint="It needs a CUDA build of PyTorch and an NVIDIA GPU.",
))
