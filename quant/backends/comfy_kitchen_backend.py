"""comfy-kitchen (ships with ComfyUI >= 0.3.7x): its CUDA int8 linear, per-token int8 activation
quant + CUTLASS/cuBLASLt GEMM with per-channel weight scales."""
from __future__ import annotations

import torch

from ..schemes import Scheme
from .optional_import import try_import
from .registry import Backend, capability_reason, cuda_capability, cuda_missing, register_backend


def _availability():
    ck, why = try_import("comfy_kitchen")
    why = why or cuda_missing()
    if why:
        return why
    status = ck.list_backends().get("cuda", {})
    if not status.get("available"):
        return f"comfy-kitchen's CUDA backend is unavailable ({status.get('unavailable_reason') or 'no reason given'})"
    return None


def _supports(scheme: Scheme, device: torch.device):
    if scheme.name != "int8-w8a8":
        return f"no comfy-kitchen kernel for {scheme.name} with per-channel scales"
    return capability_reason(scheme, device, cuda_capability(device), (7, 5), "comfy-kitchen")


def _linear(x2d, qdata, scale, bias, scheme, in_features):
    ck, _ = try_import("comfy_kitchen")
    out_dtype = x2d.dtype
    b = None if bias is None else bias.to(out_dtype)
    return ck.int8_linear(x2d.contiguous(), qdata, scale.reshape(-1).float(), bias=b, out_dtype=out_dtype)


COMFY_KITCHEN = register_backend(Backend(
    name="comfy-kitchen", priority=15, availability=_availability, supports=_supports, linear=_linear,
    install_hint="Install or update comfy-kitchen (`pip install -U comfy-kitchen`; ComfyUI's requirements include it).",
))
