"""torchao: its dynamic fp8 activation path (per-row float8 scale choice + rowwise `_scaled_mm`),
the one torchao W8A8 recipe that beats bf16 on DiT shapes. torchao's int8 dynamic-activation
recipe measured 0.14x of bf16 on an H200 (see DESIGN.md), so it is not offered for int8."""
from __future__ import annotations

import torch

from ..schemes import Scheme
from .optional_import import try_import
from .registry import Backend, capability_reason, cuda_capability, cuda_missing, register_backend


def _primitives():
    prims, why = try_import("torchao.quantization.quant_primitives")
    if why:
        return None, why
    missing = [f for f in ("_choose_scale_float8", "_quantize_affine_float8") if not hasattr(prims, f)]
    if missing:
        return None, f"this torchao version lacks {', '.join(missing)}"
    return prims, None


def _availability():
    return _primitives()[1] or cuda_missing()


def _supports(scheme: Scheme, device: torch.device):
    if scheme.name == "int8-w8a8":
        return "torchao's int8 dynamic-activation kernel is slower than bf16 (0.14x measured); use triton or vllm"
    need = (8, 9) if scheme.name == "fp8-w8a8" else None
    return capability_reason(scheme, device, cuda_capability(device), need, "torchao")


def _linear(x2d, qdata, scale, bias, scheme, in_features):
    prims, _ = _primitives()
    out_dtype = x2d.dtype
    xs = prims._choose_scale_float8(x2d, block_size=[1, in_features], float8_dtype=torch.float8_e4m3fn)
    xq = prims._quantize_affine_float8(x2d, xs, torch.float8_e4m3fn)
    b = None if bias is None else bias.to(out_dtype)
    return torch._scaled_mm(xq, qdata.t(), scale_a=xs.reshape(-1, 1).float(), scale_b=scale.reshape(1, -1).float(),
                            bias=b, out_dtype=out_dtype)


TORCHAO = register_backend(Backend(
    name="torchao", priority=5, availability=_availability, supports=_supports, linear=_linear,
    install_hint="Install the optional extra: `pip install comfyui-quantdit[torchao]`.",
))
