"""DeepGEMM (DeepSeek's Hopper fp8 GEMM, JIT-compiled with nvcc): 1x128 activation groups x
128x128 weight blocks. Activation scales must be token-major and TMA-aligned, which DeepGEMM's
own helper arranges; the group quant is ours (Triton)."""
from __future__ import annotations

import torch

from ..schemes import Scheme
from .optional_import import try_import
from .registry import Backend, cuda_capability, register_backend

_GEMM_NAMES = ("fp8_gemm_nt", "gemm_fp8_fp8_bf16_nt")  # newer and older DeepGEMM spell it differently


def _gemm():
    dg, why = try_import("deep_gemm")
    if why:
        return None, None, why
    for name in _GEMM_NAMES:
        if hasattr(dg, name):
            return dg, getattr(dg, name), None
    return None, None, f"this deep_gemm version has none of {', '.join(_GEMM_NAMES)}"


def _availability():
    _, _, why = _gemm()
    if why:
        return why
    from .triton_backend import TRITON
    triton_why = TRITON.availability()
    return f"the activation group quant needs Triton: {triton_why}" if triton_why else None


def _supports(scheme: Scheme, device: torch.device):
    if scheme.name != "fp8-block128":
        return f"DeepGEMM only runs fp8-block128 (not {scheme.name})"
    cap = cuda_capability(device)
    if cap is None:
        return f"runs on CUDA devices only (got {device})"
    if cap[0] != 9:
        return f"DeepGEMM's kernels are Hopper-only (sm90), this GPU is {cap[0]}.{cap[1]}"
    return None


def _shape_ok(k: int, n: int) -> bool:
    """The shapes DeepGEMM ran on the GPU machine: whole 128-blocks both ways (every DiT linear here)."""
    return k % 128 == 0 and n % 128 == 0


def _linear(x2d, qdata, scale, bias, scheme, in_features):
    if not _shape_ok(in_features, qdata.shape[0]):  # a partial block: the pack's own block-128 kernel
        from .triton_backend import TRITON
        return TRITON.linear(x2d, qdata, scale, bias, scheme, in_features)
    from ..kernels.triton_quant import per_group_fp8_quant
    dg, gemm, _ = _gemm()
    xq, xs = per_group_fp8_quant(x2d)
    if hasattr(dg, "get_col_major_tma_aligned_tensor"):
        xs = dg.get_col_major_tma_aligned_tensor(xs)
    out = torch.empty((x2d.shape[0], qdata.shape[0]), dtype=torch.bfloat16, device=x2d.device)
    gemm((xq, xs), (qdata, scale.float()), out)
    if bias is not None:
        out += bias.to(out.dtype)
    return out.to(x2d.dtype)


# Ranked above vLLM: on the H100 its block-128 GEMM took 5-34% less time than vLLM's CUTLASS
# blockwise kernel on 18 of 20 DiT layers; on the other two (1-2 row modulation) they are within 2%.
DEEP_GEMM = register_backend(Backend(
    name="deep-gemm", priority=32, availability=_availability, supports=_supports, linear=_linear,
    install_hint="Install a DeepGEMM built for your PyTorch: the sgl-deep-gemm wheel of your torch version, or "
                 "a build from DeepGEMM's repository (it needs nvcc, CUDA 12.3+ and a Hopper GPU).",
))
