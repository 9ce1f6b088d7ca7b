"""vLLM's CUTLASS kernels: `cutlass_scaled_mm` (int8 and fp8, per-token x per-channel scales, and
fp8 1x128 / 128x128 blocks on Hopper) with vLLM's own dynamic activation quant ops; and its Marlin
GEMM for int4-g128 (weight-only), on a copy of the weight repacked once (marlin_layout.py).

Only vLLM's kernel library is needed, not vLLM itself: it is found next to an installed `vllm`
package (never imported: importing vllm is slow and pulls a large stack), or at the path in
QUANTDIT_VLLM_LIB. The library registers its ops under torch.ops._C.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import reference
from ..schemes import Scheme
from ..shared_quant import QuantizedRows
from . import marlin_layout as marlin
from .pack_rows import quantized_by_pack, written
from .registry import Backend, capability_reason, cuda_capability, cuda_missing, register_backend

_LIB_NAMES = ("_C_stable_libtorch.abi3.so", "_C.abi3.so")
_CUTLASS_OPS = ("cutlass_scaled_mm", "dynamic_scaled_int8_quant", "dynamic_per_token_scaled_fp8_quant",
                "per_token_group_fp8_quant")
_MARLIN_OPS = ("marlin_gemm", "gptq_marlin_repack")
# scheme -> the library ops its kernel needs: a build lacking one family still serves the other
_OPS = {"int8-w8a8": _CUTLASS_OPS, "fp8-w8a8": _CUTLASS_OPS, "fp8-block128": _CUTLASS_OPS,
        "int4-g128": _MARLIN_OPS}
_MIN_CAPABILITY = {"int8-w8a8": (7, 5), "fp8-w8a8": (8, 9), "fp8-block128": (9, 0), "int4-g128": (8, 0)}


def _library_path() -> Optional[str]:
    env = os.environ.get("QUANTDIT_VLLM_LIB")
    if env:
        return env
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in _LIB_NAMES:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                return path
    return None


def _missing_ops(ops) -> list[str]:
    missing = []
    for op in ops:
        try:
            if not hasattr(torch.ops._C, op):
                missing.append(op)
        except RuntimeError:
            missing.append(op)
    return missing


def _has_ops() -> bool:
    """Whether vLLM's library is registered: any one family of the ops this pack calls is there."""
    return any(not _missing_ops(ops) for ops in (_CUTLASS_OPS, _MARLIN_OPS))


@functools.lru_cache(maxsize=1)
def _load() -> Optional[str]:
    """None once the ops are registered, else why they cannot be."""
    if not torch.cuda.is_available():
        return cuda_missing()
    if _has_ops():  # vllm was imported by something else in this process
        return None
    path = _library_path()
    if path is None:
        return "vLLM is not installed (no vllm package, and QUANTDIT_VLLM_LIB is not set)"
    if not os.path.exists(path):
        return f"QUANTDIT_VLLM_LIB points to {path}, which does not exist"
    try:
        torch.ops.load_library(path)
    except Exception as e:  # OSError for a wrong CUDA/torch build, RuntimeError for ABI mismatches
        return f"vLLM's kernel library {path} does not load with this PyTorch ({type(e).__name__}: {e})"
    if not _has_ops():
        return (f"{path} loaded but has none of the ops {', '.join(_CUTLASS_OPS + _MARLIN_OPS)} "
                f"(a vLLM version this pack does not know)")
    return None


def _supports(scheme: Scheme, device: torch.device):
    cap = cuda_capability(device)
    why = capability_reason(scheme, device, cap, _MIN_CAPABILITY.get(scheme.name), "vLLM")
    if why:
        return why
    missing = _missing_ops(_OPS[scheme.name])
    if missing:
        return (f"this vLLM kernel library lacks {', '.join(missing)}, which {scheme.name} needs "
                f"(a vLLM version this pack does not know)")
    if scheme.name == "fp8-block128" and not torch.ops._C.cutlass_scaled_mm_supports_block_fp8(cap[0] * 10 + cap[1]):
        return "this vLLM build has no block-fp8 CUTLASS kernel for this GPU"
    return None


def _cutlass_ok(k: int, n: int, out_dtype: torch.dtype) -> bool:
    return k % 16 == 0 and n % 16 == 0 and out_dtype in (torch.bfloat16, torch.float16)


def _per_token(x2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    done = quantized_by_pack(x2d, dtype)
    if done is not None:
        return done
    x2d = written(x2d)
    q = torch.empty(x2d.shape, dtype=dtype, device=x2d.device)
    s = torch.empty((x2d.shape[0], 1), dtype=torch.float32, device=x2d.device)
    if dtype == torch.int8:
        torch.ops._C.dynamic_scaled_int8_quant(q, x2d, s, None)
    else:
        torch.ops._C.dynamic_per_token_scaled_fp8_quant(q, x2d, s, None)
    return q, s


def _quantize_rows(x2d: torch.Tensor, scheme) -> tuple[torch.Tensor, torch.Tensor]:
    return _per_token(x2d, reference.activation_dtype(scheme))


def _per_group(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x2d = x2d.contiguous()
    m, k = x2d.shape
    q = torch.empty((m, k), dtype=reference.FP8_DTYPE, device=x2d.device)
    s = torch.empty((k // reference.GROUP, m), dtype=torch.float32, device=x2d.device).t()  # token-major
    torch.ops._C.per_token_group_fp8_quant(x2d, q, s, reference.GROUP, 1e-12, -reference.FP8_MAX,
                                           reference.FP8_MAX, False, True, False)
    return q, s


# Marlin copies of int4 weights, keyed by the storage of the layer's qdata: an entry lives as long
# as that memory does (offloading the model or replacing the weight frees its copy too). Per view
# of the storage: (stamp, repacked weight, shuffled scales, shuffled bias); a stamp that no longer
# matches (the data written in place, other scales or bias, another activation dtype) means repack.
_MARLIN_CACHE = WeakIdKeyDictionary()
_WORKSPACES: dict[torch.device, torch.Tensor] = {}


def _marlin_weights(qdata, scale, bias, k, dtype):
    views = _MARLIN_CACHE.setdefault(qdata.untyped_storage(), {})
    where = (qdata.data_ptr(), tuple(qdata.shape))
    stamp = (qdata._version, scale.data_ptr(), scale._version, dtype,
             None if bias is None else (bias.data_ptr(), bias._version, bias.dtype))
    hit = views.get(where)
    if hit is None or hit[0] != stamp:
        w = torch.ops._C.gptq_marlin_repack(marlin.gptq_weight(qdata), k, qdata.shape[0], 4, False)
        b = None if bias is None else marlin.marlin_bias(bias.to(dtype))
        hit = views[where] = (stamp, w, marlin.marlin_scales(scale, dtype), b)
    return hit[1:]


def _workspace(device: torch.device) -> torch.Tensor:
    ws = _WORKSPACES.get(device)
    if ws is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        ws = _WORKSPACES[device] = torch.zeros(marlin.workspace_numel(sms), dtype=torch.int32, device=device)
    return ws


def _marlin_linear(x2d, qdata, scale, bias, in_features):
    out_dtype = x2d.dtype
    a = x2d if out_dtype in (torch.bfloat16, torch.float16) else x2d.to(torch.bfloat16)
    a = a.contiguous()
    if a.data_ptr() % 16:  # the kernel loads 16-byte vectors of A
        a = a.clone()
    n = qdata.shape[0]
    w, s, b = _marlin_weights(qdata, scale, bias, in_features, a.dtype)
    out = torch.ops._C.marlin_gemm(a, None, w, b, s, None, None, None, _workspace(a.device), marlin.UINT4B8_ID,
                                   a.shape[0], n, in_features, False, True, False)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _linear(x2d, qdata, scale, bias, scheme, in_features):
    out_dtype = x2d.dtype
    m, n = x2d.shape[0], qdata.shape[0]
    if scheme.name == "int4-g128":
        if not marlin.shape_ok(n, in_features):
            return reference.emulated_linear(x2d, qdata, scale, scheme, bias, in_features)
        return _marlin_linear(x2d, qdata, scale, bias, in_features)
    if not _cutlass_ok(in_features, n, out_dtype) or (scheme.name == "fp8-block128" and in_features % 128):
        if isinstance(x2d, QuantizedRows):
            return reference.emulated_linear_quantized(x2d.q, x2d.scale, out_dtype, qdata, scale, scheme, bias,
                                                       in_features)
        return reference.emulated_linear(x2d, qdata, scale, scheme, bias, in_features)
    if scheme.name == "fp8-block128":
        xq, xs = _per_group(x2d)
        ws = scale.float().t()  # [K/128, N/128]
    else:
        xq, xs = _per_token(x2d, reference.activation_dtype(scheme))
        ws = scale.float().reshape(-1, 1).contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=x2d.device)
    b = None if bias is None else bias.to(out_dtype).contiguous()
    if scheme.name == "fp8-block128":  # the blockwise CUTLASS kernel takes no bias
        torch.ops._C.cutlass_scaled_mm(out, xq, qdata.t(), xs, ws, None)
        return out if b is None else out.add_(b)
    torch.ops._C.cutlass_scaled_mm(out, xq, qdata.t(), xs, ws, b)
    return out


VLLM = register_backend(Backend(
    name="vllm", priority=30, availability=_load, supports=_supports, linear=_linear,
    # Marlin beats Triton's dequant + cuBLAS only on few rows (H100, K=5120 N=13824: 7x faster at 1
    # row, 1.9x at 256; 1.1x slower at 1024, 1.7x at 4096); DiT linears see thousands of rows, so
    # "auto" keeps Triton for int4, and Marlin runs where vllm is named.
    scheme_priority={"int4-g128": 18},
    deferred_schemes=frozenset({"int8-w8a8", "fp8-w8a8"}),
    row_quantizer=_quantize_rows,
    install_hint="Install the optional extra: `pip install comfyui-quantdit[vllm]` (a vllm build matching "
                 "your PyTorch), or set QUANTDIT_VLLM_LIB to vLLM's _C_stable_libtorch.abi3.so.",
))
