"""Which layers of a checkpoint are quantized, in which layout and scheme.

Layouts understood (detected per layer, never guessed silently):
- LightX2V / LLMC export: ``X.weight`` int8 or fp8 e4m3 with ``X.weight_scale`` float32 of shape
  [out, 1] (per channel, W8A8) or [ceil(out/128), ceil(in/128)] (fp8 block-128); LightX2V's mxfp8
  (e4m3 bytes with E8M0 block scales, as ComfyUI's mxfp8).
- ComfyUI scaled fp8: a ``scaled_fp8`` marker tensor and ``X.scale_weight`` per-tensor scales.
- ComfyUI's per-layer quantization entries, ``X.comfy_quant`` tensors (what ComfyUI saves) or the
  ``_quantization_metadata`` header: float8_e4m3fn / float8_e5m2 with a per-tensor ``X.weight_scale``,
  int8_tensorwise with a per-tensor or per-channel one, mxfp8 with its per-32 E8M0 block scales (read
  onto one scale per channel, quant/formats/block_scaled.py). Its other formats are refused by name.
- A plain fp8 cast file (fp8 weights, no scales anywhere): scale 1.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional

from ..errors import CheckpointError
from .block_scaled import MX_BLOCK, swizzled_scale_shape
from .safetensors_file import SafetensorsFile

QUANT_DTYPES = {"I8": "int8", "F8_E4M3": "fp8_e4m3"}
FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}

LIGHTX2V = "lightx2v"
COMFY_SCALED_FP8 = "comfyui-scaled-fp8"
COMFY_QUANT_METADATA = "comfyui-quantization-metadata"
FP8_CAST = "fp8-cast-unscaled"

# ComfyUI's quantization formats (comfy.quant_ops.QUANT_ALGOS): served ones -> (weight dtype, scheme).
# int8_tensorwise is W8A8 with per-row activations in ComfyUI too; its scalar scale serves every channel.
# mxfp8 (W8A8 with per-32 activation blocks on Blackwell) runs fp8 W8A8 with per-token activations.
_COMFY_FORMATS = {"float8_e4m3fn": ("F8_E4M3", "fp8-scaled"), "float8_e5m2": ("F8_E5M2", "fp8-e5m2-scaled"),
                  "int8_tensorwise": ("I8", "int8-w8a8"), "mxfp8": ("F8_E4M3", "fp8-w8a8")}
_COMFY_UNSERVED = {"nvfp4": "4-bit NVFP4 weights and activations, for Blackwell tensor cores",
                   "convrot_w4a4": "4-bit weights and activations with a Hadamard rotation"}
MXFP8 = "mxfp8"
# mxfp8 block scales: E8M0 (what marks a LightX2V mxfp8 layer), or its bytes as uint8 (ComfyUI reads both)
MX_SCALE_DTYPE = "F8_E8M0"
# What a W8A8 layer runs where the file asks for a full-precision matmul (full_precision_matrix_mult):
# the same weight, widened for a matmul in the model dtype, as ComfyUI computes it.
_FLOAT_MATMUL_OF = {"fp8-w8a8": "fp8-weight-only", "int8-w8a8": "int8-weight-only"}
COMFY_QUANT_KEY = "comfy_quant"


@dataclass(frozen=True)
class LayerQuant:
    layer: str              # module path without ".weight"
    scheme: str             # canonical scheme name (quant.schemes)
    layout: str             # one of the layout constants above
    weight_key: str
    scale_key: Optional[str]  # None: unscaled fp8 cast (scale 1)
    shape: tuple[int, int]  # [out, in]
    float_matmul: bool = False  # the file asks for a float matmul (ComfyUI's full_precision_matrix_mult)
    block_scaled: Optional[str] = None  # MXFP8: the weight and its block scales are read together


@dataclass
class CheckpointPlan:
    path: str
    layers: dict[str, LayerQuant] = field(default_factory=dict)
    ignored_keys: list[str] = field(default_factory=list)   # e.g. the scaled_fp8 marker
    notes: list[str] = field(default_factory=list)          # for the loader's report

    @property
    def is_quantized(self) -> bool:
        return bool(self.layers)

    def layouts(self) -> set[str]:
        return {q.layout for q in self.layers.values()}

    def scheme_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for q in self.layers.values():
            counts[q.scheme] = counts.get(q.scheme, 0) + 1
        return counts


def _layer_of(key: str, suffix: str) -> Optional[str]:
    return key[: -len(suffix)] if key.endswith(suffix) else None


def plan_checkpoint(f: SafetensorsFile) -> CheckpointPlan:
    """Inspect the header, and the few bytes of ComfyUI's per-layer `comfy_quant` entries, and return
    the per-layer plan (no weight is read)."""
    confs = _comfy_layer_confs(f)
    if confs or "_quantization_metadata" in f.metadata:
        plan = _plan_comfy_native(f, confs)
    elif any(k == "scaled_fp8" or k.endswith(".scaled_fp8") for k in f.keys()):
        plan = _plan_comfy_scaled_fp8(f)
    else:
        plan = _plan_lightx2v(f)
    _check_no_stray_quantized(f, plan)
    return plan


def _require_linear(f: SafetensorsFile, layer: str, weight_key: str) -> tuple[int, int]:
    shape = f.shape(weight_key)
    if len(shape) != 2:
        raise CheckpointError(f.path, f"quantized weight has shape {list(shape)}; only Linear "
                              "(2-D) weights can be quantized.",
                              "re-export the checkpoint keeping convolutions in bf16/fp16.", layer)
    return shape[0], shape[1]


def _check_dtype(f: SafetensorsFile, key: str, layer: str):
    dt = f.dtype_name(key)
    if dt not in QUANT_DTYPES and dt not in FLOAT_DTYPES:
        raise CheckpointError(f.path, f"weight dtype {dt} is not one QuantDiT can read "
                              f"(expected int8, float8_e4m3fn, or a float type).",
                              "re-export the layer as int8 or float8_e4m3fn with a float32 scale.", layer)


def _plan_lightx2v(f: SafetensorsFile) -> CheckpointPlan:
    plan = CheckpointPlan(f.path)
    keys = set(f.keys())
    any_scale = any(k.endswith(".weight_scale") for k in keys)
    weight_only = _weight_only_layers(f)
    for key in sorted(keys):
        layer = _layer_of(key, ".weight")
        if layer is None:
            continue
        dt = f.dtype_name(key)
        scale_key = layer + ".weight_scale"
        if scale_key in keys and f.dtype_name(scale_key) == MX_SCALE_DTYPE:
            plan.layers[layer] = _lightx2v_mx_layer(f, layer, key, scale_key)
            continue
        if dt == "U8" and scale_key in keys:
            raise CheckpointError(f.path, "is stored as packed 4-bit (LightX2V's w4a4-nvfp4 or mxfp4/mxfp6), "
                                  "which QuantDiT has no kernel for.",
                                  "convert the original model to int8 or fp8 (python -m quant.convert, or "
                                  "LightX2V's converter).", layer)
        _check_dtype(f, key, layer)
        if dt not in QUANT_DTYPES:
            if scale_key in keys:
                raise CheckpointError(f.path, f"has a weight_scale but its weight is {dt}, not "
                                      "int8/fp8: the file is half-converted.",
                                      "re-export the checkpoint from the original model.", layer)
            continue
        out_f, in_f = _require_linear(f, layer, key)
        fmt = QUANT_DTYPES[dt]
        if scale_key not in keys:
            if fmt == "fp8_e4m3" and not any_scale:
                plan.layers[layer] = LayerQuant(layer, "fp8-scaled", FP8_CAST, key, None, (out_f, in_f))
                continue
            raise CheckpointError(f.path, f"{fmt} weight has no '{scale_key}' tensor, so its values "
                                  "cannot be interpreted.",
                                  "use a complete LightX2V/LLMC export (every quantized weight needs its "
                                  "float32 weight_scale).", layer)
        scheme = _scheme_from_scale_shape(f, layer, fmt, f.shape(scale_key), out_f, in_f)
        if layer in weight_only and scheme in _WEIGHT_ONLY_OF:
            scheme = _WEIGHT_ONLY_OF[scheme]
        plan.layers[layer] = LayerQuant(layer, scheme, LIGHTX2V, key, scale_key, (out_f, in_f))
    return plan


# A per-channel int8/fp8 layer reads as W8A8 unless this pack's metadata lists it as weight-only
# (quant/convert.py and Save Quantized DiT write the list): the tensors are the same.
WEIGHT_ONLY_KEY = "quantdit_weight_only"
_WEIGHT_ONLY_OF = {"int8-w8a8": "int8-weight-only", "fp8-w8a8": "fp8-weight-only"}


def _weight_only_layers(f: SafetensorsFile) -> set[str]:
    raw = f.metadata.get(WEIGHT_ONLY_KEY)
    if raw is None:
        return set()
    try:
        layers = json.loads(raw)
        if isinstance(layers, list) and all(isinstance(x, str) for x in layers):
            return set(layers)
    except ValueError:
        pass
    raise CheckpointError(f.path, f"its '{WEIGHT_ONLY_KEY}' metadata is not a JSON list of layer names.",
                          "re-export the checkpoint, or remove that metadata entry to load every 8-bit "
                          "per-channel layer as W8A8.")


def _scheme_from_scale_shape(f, layer, fmt, sshape, out_f, in_f) -> str:
    numel = math.prod(sshape) if sshape else 1
    if tuple(sshape) in ((out_f, 1), (out_f,)):
        return "int8-w8a8" if fmt == "int8" else "fp8-w8a8"
    blocks = (math.ceil(out_f / 128), math.ceil(in_f / 128))
    if fmt == "fp8_e4m3" and tuple(sshape) == blocks:
        return "fp8-block128"
    if fmt == "fp8_e4m3" and numel == 1:
        return "fp8-scaled"
    expected = f"[{out_f}, 1] (per channel)" + (f" or {list(blocks)} (128x128 blocks)" if fmt == "fp8_e4m3" else "")
    raise CheckpointError(f.path, f"weight_scale has shape {list(sshape)} but the {fmt} weight is "
                          f"[{out_f}, {in_f}]; expected {expected}.",
                          "re-export the checkpoint; the scale does not belong to this weight.", layer)


def _lightx2v_mx_layer(f: SafetensorsFile, layer: str, key: str, scale_key: str) -> LayerQuant:
    """LightX2V's w8a8-mxfp8: the e4m3 bytes (stored as uint8 or fp8) and E8M0 block scales in the
    same tile order as ComfyUI's mxfp8."""
    if f.dtype_name(key) not in ("U8", "F8_E4M3"):
        raise CheckpointError(f.path, f"has E8M0 block scales but its weight is {f.dtype_name(key)}, not the "
                              "fp8 bytes of mxfp8.", "re-export the checkpoint.", layer)
    out_f, in_f = _require_linear(f, layer, key)
    _check_mx_scale(f, layer, scale_key, out_f, in_f)
    return LayerQuant(layer, "fp8-w8a8", LIGHTX2V, key, scale_key, (out_f, in_f), block_scaled=MXFP8)


def _plan_comfy_scaled_fp8(f: SafetensorsFile) -> CheckpointPlan:
    markers = [k for k in f.keys() if k.endswith("scaled_fp8")]
    plan = CheckpointPlan(f.path, ignored_keys=markers)
    # A two-element marker asks for a float matmul, as ComfyUI reads it (comfy.utils.convert_old_quants).
    float_matmul = any(math.prod(f.shape(k)) == 2 for k in markers)
    keys = set(f.keys())
    for key in sorted(keys):
        layer = _layer_of(key, ".weight")
        if layer is None:
            continue
        _check_dtype(f, key, layer)
        if f.dtype_name(key) != "F8_E4M3":
            continue
        out_f, in_f = _require_linear(f, layer, key)
        scale_key = layer + ".scale_weight"
        if scale_key not in keys:
            raise CheckpointError(f.path, f"fp8 weight has no '{scale_key}' although the file is "
                                  "marked scaled_fp8.", "re-export the checkpoint.", layer)
        if math.prod(f.shape(scale_key)) != 1:
            raise CheckpointError(f.path, f"scale_weight has shape {list(f.shape(scale_key))}; "
                                  "ComfyUI scaled fp8 uses one scalar per weight.", "re-export the checkpoint.", layer)
        plan.layers[layer] = LayerQuant(layer, "fp8-scaled", COMFY_SCALED_FP8, key, scale_key, (out_f, in_f),
                                        float_matmul)
    return plan


def _comfy_layer_confs(f: SafetensorsFile) -> dict[str, dict]:
    """{layer: its ComfyUI quantization entry}. ComfyUI writes them as a `X.comfy_quant` uint8 tensor
    holding JSON per layer (what it saves today) or in the `_quantization_metadata` header entry, which
    wins where both name a layer (as comfy.utils.convert_old_quants does)."""
    confs: dict[str, dict] = {}
    for key in f.keys():
        layer = _layer_of(key, "." + COMFY_QUANT_KEY)
        if layer is None:
            continue
        try:
            if f.dtype_name(key) != "U8":
                raise ValueError
            conf = json.loads(bytes(f.get(key).reshape(-1).tolist()).decode("utf-8"))
            if not isinstance(conf, dict):
                raise ValueError
        except ValueError:
            raise CheckpointError(f.path, f"its '{key}' entry is not JSON text stored as uint8.",
                                  "re-save the checkpoint with ComfyUI.", layer) from None
        confs[layer] = conf
    if "_quantization_metadata" in f.metadata:
        try:
            layers = json.loads(f.metadata["_quantization_metadata"])["layers"]
            if not isinstance(layers, dict):
                raise TypeError("layers is not a map")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f.path, "its _quantization_metadata is not valid JSON with a 'layers' map.",
                                  "re-export the checkpoint with ComfyUI's quantization tools.") from None
        for layer, conf in layers.items():
            confs[layer] = conf if isinstance(conf, dict) else {}
    return confs


def _plan_comfy_native(f: SafetensorsFile, confs: dict[str, dict]) -> CheckpointPlan:
    plan = CheckpointPlan(f.path)
    static_inputs = 0
    for layer, conf in sorted(confs.items()):
        fmt = conf.get("format")
        key, scale_key = layer + ".weight", layer + ".weight_scale"
        if layer + "." + COMFY_QUANT_KEY in f:
            plan.ignored_keys.append(layer + "." + COMFY_QUANT_KEY)
        if fmt in _COMFY_UNSERVED:
            raise CheckpointError(f.path, f"is stored as ComfyUI's {fmt} ({_COMFY_UNSERVED[fmt]}), which "
                                  f"QuantDiT has no kernel for (it serves {', '.join(_COMFY_FORMATS)}).",
                                  "load this file with ComfyUI's own 'Load Diffusion Model' node.", layer)
        if fmt not in _COMFY_FORMATS:
            raise CheckpointError(f.path, f"quantization format {fmt!r} is not supported by QuantDiT "
                                  f"(supported: {', '.join(_COMFY_FORMATS)}).",
                                  "load this file with ComfyUI's own 'Load Diffusion Model' node.", layer)
        dtype, scheme = _COMFY_FORMATS[fmt]
        params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
        if conf.get("convrot", params.get("convrot", False)):
            raise CheckpointError(f.path, f"is stored as {fmt} with ConvRot (Hadamard-rotated weights), which "
                                  "QuantDiT has no kernel for.",
                                  "load this file with ComfyUI's own 'Load Diffusion Model' node.", layer)
        if key not in f:
            raise CheckpointError(f.path, f"is listed as {fmt} but has no weight.", "re-export the checkpoint.",
                                  layer)
        if f.dtype_name(key) != dtype:
            raise CheckpointError(f.path, f"is listed as {fmt} but its weight is {f.dtype_name(key)}.",
                                  "re-export the checkpoint.", layer)
        out_f, in_f = _require_linear(f, layer, key)
        if scale_key not in f:
            raise CheckpointError(f.path, f"has no '{scale_key}'.", "re-export the checkpoint.", layer)
        if fmt == MXFP8:
            _check_mx_scale(f, layer, scale_key, out_f, in_f)
        else:
            _check_scalar_or_channel_scale(f, layer, fmt, scale_key, out_f)
        if layer + ".input_scale" in f:
            # A static activation scale: the pack quantizes activations per token at run time instead.
            plan.ignored_keys.append(layer + ".input_scale")
            static_inputs += 1
        float_matmul = bool(conf.get("full_precision_matrix_mult", False))
        if float_matmul:
            scheme = _FLOAT_MATMUL_OF.get(scheme, scheme)
        plan.layers[layer] = LayerQuant(layer, scheme, COMFY_QUANT_METADATA, key, scale_key, (out_f, in_f),
                                        float_matmul, MXFP8 if fmt == MXFP8 else None)
    if static_inputs:
        plan.notes.append(f"{static_inputs} layers carry a static input_scale, not used: activations are "
                          "quantized per token at run time")
    return plan


def _check_scalar_or_channel_scale(f: SafetensorsFile, layer: str, fmt: str, scale_key: str, out_f: int):
    sshape = f.shape(scale_key)
    per_channel = tuple(sshape) in ((out_f, 1), (out_f,)) and fmt == "int8_tensorwise"
    if math.prod(sshape) != 1 and not per_channel:
        expected = "one scalar per weight" + (f" or [{out_f}, 1] per channel" if fmt == "int8_tensorwise" else "")
        raise CheckpointError(f.path, f"weight_scale has shape {list(sshape)}; {fmt} uses {expected}.",
                              "re-export the checkpoint.", layer)


def _check_mx_scale(f: SafetensorsFile, layer: str, scale_key: str, out_f: int, in_f: int):
    if in_f % MX_BLOCK:
        raise CheckpointError(f.path, f"is mxfp8 with {in_f} input features, not a multiple of {MX_BLOCK}.",
                              "re-export the checkpoint.", layer)
    expected = swizzled_scale_shape(out_f, in_f // MX_BLOCK)
    dt = f.dtype_name(scale_key)
    if dt not in (MX_SCALE_DTYPE, "U8") or tuple(f.shape(scale_key)) != expected:
        raise CheckpointError(f.path, f"weight_scale is {dt} {list(f.shape(scale_key))}; an mxfp8 weight of "
                              f"[{out_f}, {in_f}] has E8M0 block scales of {list(expected)} (cuBLAS tile order).",
                              "re-export the checkpoint; the scale does not belong to this weight.", layer)


def _check_no_stray_quantized(f: SafetensorsFile, plan: CheckpointPlan):
    """A quantized tensor the plan does not account for would load as garbage: refuse."""
    claimed = {q.weight_key for q in plan.layers.values()}
    for key in f.keys():
        if f.dtype_name(key) in QUANT_DTYPES and key not in claimed and key not in plan.ignored_keys:
            raise CheckpointError(f.path, f"tensor '{key}' is {f.dtype_name(key)} but no scale or "
                                  "metadata says how to read it.",
                                  "re-export the checkpoint so every quantized tensor has its scale.",
                                  _layer_of(key, ".weight") or key)
