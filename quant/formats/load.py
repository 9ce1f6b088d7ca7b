"""Read a (possibly quantized) DiT safetensors file into one normalized state dict.

Every quantized layer comes out as ``X.weight`` (int8/fp8 data) + ``X.weight_scale`` (float32,
[out,1] per channel, a scalar per tensor, or [out/128, in/128] blocks), whatever layout it had
on disk; the plan says which scheme each layer uses.
"""
from __future__ import annotations

import torch

from .detect import COMFY_SCALED_FP8, CheckpointPlan, plan_checkpoint
from .safetensors_file import SafetensorsFile


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], CheckpointPlan, dict]:
    f = SafetensorsFile(path)
    plan = plan_checkpoint(f)
    return normalized_state_dict(f, plan), plan, dict(f.metadata)


def normalized_state_dict(f, plan: CheckpointPlan) -> dict[str, torch.Tensor]:
    """Every tensor of `f` (a SafetensorsFile or PthFile), scales renamed and reshaped as above."""
    by_scale_key = {q.scale_key: q for q in plan.layers.values() if q.scale_key}
    sd: dict[str, torch.Tensor] = {}
    for key in f.keys():
        if key in plan.ignored_keys:
            continue
        if plan.layers and key.endswith(".scale_input") and _layer_quantized(plan, key, ".scale_input"):
            continue  # static input scales: the fp8-scaled path computes in the model dtype
        q = by_scale_key.get(key)
        if q is not None:
            sd[q.layer + ".weight_scale"] = _normalize_scale(f.get(key), q.scheme, q.shape)
            continue
        sd[key] = f.get(key)
    for q in plan.layers.values():
        if q.scale_key is None:
            sd[q.layer + ".weight_scale"] = torch.ones((), dtype=torch.float32)
    return sd


def _layer_quantized(plan: CheckpointPlan, key: str, suffix: str) -> bool:
    return key[: -len(suffix)] in plan.layers


def _normalize_scale(scale: torch.Tensor, scheme: str, shape: tuple[int, int]) -> torch.Tensor:
    scale = scale.to(torch.float32)
    if scheme in ("fp8-w8a8", "int8-w8a8"):
        return scale.reshape(shape[0], 1)
    if scheme == "fp8-scaled":
        return scale.reshape(())
    return scale


def layout_of(plan: CheckpointPlan) -> str:
    names = sorted(plan.layouts())
    return "+".join(names) if names else "unquantized"


__all__ = ["load_checkpoint", "normalized_state_dict", "layout_of", "COMFY_SCALED_FP8"]
