"""This pack's own Triton kernels (quant/kernels): the fast path with only torch + triton installed.

- int8 W8A8: Triton per-token quant + a GEMM with the dequant fused into its epilogue (on Hopper
  written in Gluon, whose MMAs overlap; elsewhere in Triton). Both W8A8 schemes also take a
  deferred GELU or attention output (quant/deferred.py), which the quantizer reads from its sources.
- fp8 W8A8: Triton per-token quant + the Triton GEMM (TMA, persistent, Hopper's fast fp8
  accumulation, as vLLM's CUTLASS fp8 kernels do); before Hopper, cuBLASLt's rowwise
  `torch._scaled_mm`.
- fp8 block-128: Triton 1x128 group quant + Triton block-scaled GEMM.
- int4 g128 weight-only: Triton unpack/dequant into a per-call bf16 weight + cuBLAS.
- 8-bit weight-only (int8, fp8 e4m3/e5m2, per channel or per tensor): a Triton GEMM that widens
  the weight tile in registers, up to WEIGHT_ONLY_KERNEL_MAX_ROWS tokens; beyond that the GEMM is
  compute-bound and a per-call bf16 weight + cuBLAS is faster.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from .. import reference
from ..deferred import Deferred
from ..kernels import interpreted, triton_missing
from ..schemes import Scheme
from ..shared_quant import QuantizedRows
from .registry import Backend, capability_reason, cuda_capability, cuda_missing, register_backend
from .torch_native import upcast_linear

log = logging.getLogger("quantdit")

# scheme -> minimum compute capability of the kernel used for it
_MIN_CAPABILITY = {"int8-w8a8": (8, 0), "fp8-w8a8": (8, 9), "fp8-block128": (8, 9), "int4-g128": (8, 0),
                   "int8-weight-only": (8, 0), "fp8-weight-only": (8, 9), "fp8-scaled": (8, 9),
                   "fp8-e5m2-weight-only": (8, 9), "fp8-e5m2-scaled": (8, 9)}
WEIGHT_ONLY_KERNEL_MAX_ROWS = 2048


def _tokens_setting(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:  # a typo in the environment must not stop ComfyUI from loading the pack
        log.warning("QuantDiT: %s=%r is not a token count; using %d", name, raw, default)
        return default


# Inputs from this many tokens run here under `auto` on Hopper even where a higher-ranked provider
# (vLLM) is installed. This pack's Hopper GEMMs take less GPU time from about 2048 tokens
# (bench_gemm --tokens), but a Triton linear costs more host time than a vLLM one, and a Flux step at
# 1024x1024 (4608 tokens) waits on the host: it ran 0-4% slower handed over. 0 turns this off.
LARGE_INPUTS_FROM = _tokens_setting("QUANTDIT_TRITON_FROM_TOKENS", 8192)


@functools.lru_cache(maxsize=1)
def _kernels():
    from ..kernels import triton_gemm, triton_int4, triton_quant, triton_weight_only
    return triton_quant, triton_gemm, triton_int4, triton_weight_only


def _availability():
    return triton_missing() or cuda_missing()


def _supports(scheme: Scheme, device: torch.device):
    return capability_reason(scheme, device, cuda_capability(device), _MIN_CAPABILITY.get(scheme.name), "Triton")


def _scaled_mm_ok(xq: torch.Tensor, n: int) -> bool:
    k = xq.shape[1]
    return (xq.is_cuda and not interpreted() and k % 16 == 0 and n % 16 == 0
            and cuda_capability(xq.device) >= (8, 9))


def _large_inputs_from(scheme: Scheme, device: torch.device):
    """Where this pack's Hopper W8A8 kernels (Gluon int8, persistent TMA fp8) run: from
    LARGE_INPUTS_FROM tokens, on sm_90 only (the GPU they were measured on)."""
    if LARGE_INPUTS_FROM <= 0 or scheme.name not in ("int8-w8a8", "fp8-w8a8") or cuda_capability(device) != (9, 0):
        return None
    return LARGE_INPUTS_FROM if _kernels()[1].persistent_hopper_gemm_on(scheme.name == "int8-w8a8") else None


def _per_token(quant, x2d, dtype):
    if isinstance(x2d, QuantizedRows):      # quantized by a sibling layer reading the same tensor
        return x2d.q, x2d.scale
    if isinstance(x2d, Deferred):  # a GELU (and concatenation), or a transposed copy, not yet made: one pass
        return quant.per_token_quant_deferred(x2d, dtype)
    return quant.per_token_quant(x2d, dtype)


def _quantize_rows(x2d, scheme):
    return _kernels()[0].per_token_quant(x2d, reference.activation_dtype(scheme))


def _linear(x2d, qdata, scale, bias, scheme, in_features):
    quant, gemm, int4, weight_only = _kernels()
    out_dtype = x2d.dtype
    if scheme.is_8bit_weight_only:
        if out_dtype in (torch.bfloat16, torch.float16) and x2d.shape[0] <= WEIGHT_ONLY_KERNEL_MAX_ROWS:
            return weight_only.weight_only_gemm(x2d, qdata, scale, None if bias is None else bias.to(out_dtype))
        return upcast_linear(x2d, qdata, scale, bias)
    if scheme.name == "int8-w8a8":
        xq, xs = _per_token(quant, x2d, reference.activation_dtype(scheme))
        return gemm.w8a8_gemm(xq, xs, qdata, scale, bias, out_dtype)
    if scheme.name == "fp8-w8a8":
        xq, xs = _per_token(quant, x2d, reference.activation_dtype(scheme))
        n = qdata.shape[0]
        if (not gemm.hopper_ready(xq, qdata) and _scaled_mm_ok(xq, n)
                and out_dtype in (torch.bfloat16, torch.float16)):
            # Before Hopper the Triton GEMM has no TMA path; cuBLASLt's rowwise fp8 GEMM runs there.
            b = None if bias is None else bias.to(out_dtype)
            return torch._scaled_mm(xq, qdata.t(), scale_a=xs, scale_b=scale.reshape(1, -1).float(),
                                    bias=b, out_dtype=out_dtype)
        return gemm.w8a8_gemm(xq, xs, qdata, scale, bias, out_dtype)
    if scheme.name == "fp8-block128":
        xq, xs = quant.per_group_fp8_quant(x2d)
        return gemm.block_fp8_gemm(xq, xs, qdata, scale, bias, out_dtype)
    if scheme.name == "int4-g128":
        w = int4.dequantize_int4(qdata, scale, in_features, out_dtype)
        return torch.nn.functional.linear(x2d, w, None if bias is None else bias.to(out_dtype))
    raise ValueError(f"the triton backend has no kernel for {scheme.name}")


TRITON = register_backend(Backend(
    name="triton", priority=20, availability=_availability, supports=_supports, linear=_linear,
    install_hint="Install Triton (`pip install triton`; it ships with PyTorch's CUDA wheels on Linux, "
                 "and as `triton-windows` on Windows).",
    deferred_schemes=frozenset({"int8-w8a8", "fp8-w8a8"}),
    row_quantizer=_quantize_rows,
    large_inputs_from=_large_inputs_from,
))
