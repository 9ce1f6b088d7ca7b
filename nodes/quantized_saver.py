"""Writes a quantized MODEL's diffusion model to a checkpoint that Load Quantized DiT reads back as
the same model: LightX2V's layout for W8A8, block-128 and 8-bit weight-only layers (the file's
metadata lists the weight-only ones), ComfyUI's scaled fp8 for per-tensor fp8, or on request
ComfyUI's own layout for int8 W8A8 and per-tensor fp8 (stock ComfyUI loads those two too). One
tensor is produced and written at a time."""
from __future__ import annotations

import json

import torch

import comfy.utils

from ..quant.convert import layout_extras, layout_holding, quantized_entries
from ..quant.formats.writer import PlannedTensor, write_safetensors
from .model_quantizer import ROOT, patched_modules
from .ops import QuantLinearMixin

class SaveRefused(ValueError):
    """The MODEL cannot be written as it runs; the message says why and what to do."""


def quantized_layers(patcher) -> dict[str, torch.nn.Module]:
    """{layer name in the diffusion model: quantized module}: object patches (Quantize Model) or the
    model's own modules (Load Quantized DiT)."""
    return {name: module for name, module in patched_modules(patcher)
            if isinstance(module, QuantLinearMixin) and module.quant_scheme is not None}


def _check(patcher, layers: dict[str, torch.nn.Module], wanted: str) -> str:
    if not layers:
        raise SaveRefused("this MODEL has no quantized layers: connect Quantize Model, Layerwise FP8 Cast "
                          "(per-tensor) or Load Quantized DiT before Save Quantized DiT")
    if patcher.patches:
        raise SaveRefused(f"this MODEL carries LoRA patches on {len(patcher.patches)} weights, which the file "
                          "would not hold: save the model before LoraLoader, then apply the LoRA after loading it")
    schemes = {m.quant_scheme.name for m in layers.values()}
    try:
        return layout_holding(schemes, wanted)
    except ValueError as e:
        first = {s: next(n for n, m in layers.items() if m.quant_scheme.name == s) for s in sorted(schemes)}
        examples = ", ".join(f"{n} is {s}" for s, n in first.items())
        hint = ("Models quantized with int8/fp8 W8A8, fp8-block128 or 8-bit weight-only, or with Layerwise "
                "FP8 Cast per-tensor, can be saved" if wanted == "auto" else "pick layout 'auto'")
        raise SaveRefused(f"{e} ({examples}). {hint}") from None


def plan(patcher, wanted: str = "auto") -> tuple[list[PlannedTensor], dict[str, str], str, dict[str, int]]:
    """The tensors to write, the file's metadata, its layout (`wanted`, or chosen under "auto") and
    {scheme: layers}."""
    layers = quantized_layers(patcher)
    layout = _check(patcher, layers, wanted)
    state = patcher.get_model_object(ROOT).state_dict(keep_vars=True)
    planned, counts = [], {}
    for name, module in layers.items():
        scheme = module.quant_scheme
        planned += quantized_entries(name, tuple(module.weight.shape), scheme, layout,
                                     lambda m=module: m.weight, lambda m=module: m.weight_scale)
        if module.bias is not None:
            planned.append(_unquantized(name + ".bias", module.bias))
        counts[scheme.name] = counts.get(scheme.name, 0) + 1
    replaced = {f"{n}.{p}" for n in layers for p in ("weight", "weight_scale", "bias", "scale_weight")}
    for key, tensor in state.items():
        if key in replaced:
            continue
        if tensor.is_meta:
            raise SaveRefused(f"{key} has no data (it lives on the meta device): load the model fully first")
        planned.append(_unquantized(key, tensor))
    # ComfyUI builds some models partly from the file's "config" metadata (Wan's text_dim, for one):
    # the config this model was built with, so the file builds the same model again.
    metadata: dict[str, str] = {"quantdit_layout": layout, "config": json.dumps({"transformer": _model_config(patcher)})}
    weight_only = [n for n, m in layers.items() if not m.quant_scheme.quantizes_activation]
    planned += layout_extras(layout, list(layers), metadata, weight_only)
    metadata["quantdit_schemes"] = ",".join(f"{s}:{n}" for s, n in sorted(counts.items()))
    return planned, metadata, layout, counts


def _unquantized(key: str, tensor: torch.Tensor) -> PlannedTensor:
    """An fp32 tensor whose values are all bf16 values (ComfyUI upcast a bf16 checkpoint for the
    CPU) is written as bf16, keeping the source's size; any other tensor keeps its dtype."""
    dtype = tensor.dtype
    if dtype == torch.float32 and torch.equal(tensor.detach().to(torch.bfloat16).float(), tensor.detach()):
        dtype = torch.bfloat16
    return PlannedTensor(key, dtype, tuple(tensor.shape), lambda: tensor.detach().to(dtype))


def _model_config(patcher) -> dict:
    plain = (int, float, str, bool, type(None))
    config = getattr(getattr(patcher.model, "model_config", None), "unet_config", {}) or {}
    return {k: v for k, v in config.items()
            if isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))}


def write(planned: list[PlannedTensor], metadata: dict[str, str], path: str) -> int:
    """Writes the file atomically (a partial file never takes the name); returns its size in bytes."""
    pbar = comfy.utils.ProgressBar(len(planned))
    write_safetensors(path, planned, metadata, progress=lambda done, total: pbar.update_absolute(done, total))
    return sum(t.nbytes for t in planned)
