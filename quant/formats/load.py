"""Read a (possibly quantized) DiT safetensors file into one normalized state dict.

Every quantized layer comes out as ``X.weight`` (int8/fp8 data) + ``X.weight_scale`` (float32,
[out,1] per channel, a scalar per tensor, or [out/128, in/128] blocks), whatever layout it had
on disk (mxfp8 block scales are folded onto one per channel); the plan says which scheme each
layer uses.
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import CheckpointError
from .block_scaled import MX_BLOCK, mxfp8_to_per_channel, unswizzle
from .detect import COMFY_SCALED_FP8, MXFP8, CheckpointPlan, LayerQuant, plan_checkpoint
from .safetensors_file import SafetensorsFile


def load_checkpoint(path: str, scaled_fp8_w8a8: bool = False) -> tuple[dict[str, torch.Tensor], CheckpointPlan, dict]:
    """`scaled_fp8_w8a8`: run the per-tensor fp8 layers as fp8 W8A8 (`scaled_fp8_as_w8a8`)."""
    f = SafetensorsFile(path)
    plan = plan_checkpoint(f)
    if scaled_fp8_w8a8:
        plan = scaled_fp8_as_w8a8(plan)
    return normalized_state_dict(f, plan), plan, dict(f.metadata)


def scaled_fp8_as_w8a8(plan: CheckpointPlan) -> CheckpointPlan:
    """The plan with its per-tensor e4m3 layers (ComfyUI's scaled fp8) run as fp8 W8A8: the same weight,
    its one scale serving every channel, the activations quantized per token for the fp8 GEMM, as
    ComfyUI itself quantizes them on fp8 GPUs. Layers whose file asks for a float matmul keep it."""
    moved = {name: dataclasses.replace(q, scheme="fp8-w8a8") for name, q in plan.layers.items()
             if q.scheme == "fp8-scaled" and not q.float_matmul}
    kept = sum(q.scheme == "fp8-scaled" for q in plan.layers.values()) - len(moved)
    notes = list(plan.notes)
    if moved:
        notes.append(f"{len(moved)} per-tensor fp8 layers run fp8 W8A8 (activations quantized per token)")
    if kept:
        notes.append(f"{kept} per-tensor fp8 layers keep a bf16 matmul, as the file asks")
    return dataclasses.replace(plan, layers={**plan.layers, **moved}, notes=notes)


def normalized_state_dict(f, plan: CheckpointPlan) -> dict[str, torch.Tensor]:
    """Every tensor of `f` (a SafetensorsFile or PthFile), scales renamed and reshaped as above; what it
    folded (mxfp8 block scales) is added to `plan.notes` for the report."""
    by_scale_key = {q.scale_key: q for q in plan.layers.values() if q.scale_key}
    block_scaled = {q.weight_key: q for q in plan.layers.values() if q.block_scaled == MXFP8}
    ignored = set(plan.ignored_keys)
    sd: dict[str, torch.Tensor] = {}
    rounded = 0
    for key in f.keys():
        if key in ignored:
            continue
        q = block_scaled.get(key)
        if q is not None:
            sd[key], sd[q.layer + ".weight_scale"], n = _mxfp8_per_channel(f, q)
            rounded += n
            continue
        if key in by_scale_key and by_scale_key[key].block_scaled:
            continue  # read with its weight
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
    if block_scaled:
        plan.notes.append(f"{len(block_scaled)} mxfp8 layers read onto one power-of-two scale per channel"
                          + (f" ({rounded} values below fp8's normal range rounded)" if rounded else " (exactly)"))
    return sd


def _mxfp8_per_channel(f, q: LayerQuant) -> tuple[torch.Tensor, torch.Tensor, int]:
    out_f, in_f = q.shape
    exponents = unswizzle(f.get(q.scale_key).view(torch.uint8), out_f, in_f // MX_BLOCK)
    weight = f.get(q.weight_key)
    if weight.dtype == torch.uint8:  # LightX2V stores the e4m3 bytes as uint8
        weight = weight.view(torch.float8_e4m3fn)
    try:
        return mxfp8_to_per_channel(weight, exponents)
    except ValueError as e:
        raise CheckpointError(f.path, f"mxfp8 weight_scale is unusable: {e}.",
                              "re-export the checkpoint; the file is damaged.", q.layer) from None


def _layer_quantized(plan: CheckpointPlan, key: str, suffix: str) -> bool:
    return key[: -len(suffix)] in plan.layers


def _normalize_scale(scale: torch.Tensor, scheme: str, shape: tuple[int, int]) -> torch.Tensor:
    scale = scale.to(torch.float32)
    if scheme in ("fp8-w8a8", "int8-w8a8", "fp8-weight-only", "int8-weight-only"):
        # [out, 1]; a per-tensor scale (ComfyUI's formats) serves every channel
        return scale.reshape(-1, 1).expand(shape[0], 1).contiguous()
    if scheme == "fp8-scaled":
        return scale.reshape(())
    return scale


def layout_of(plan: CheckpointPlan) -> str:
    names = sorted(plan.layouts())
    return "+".join(names) if names else "unquantized"


__all__ = ["load_checkpoint", "normalized_state_dict", "layout_of", "COMFY_SCALED_FP8"]
