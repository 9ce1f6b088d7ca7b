"""Streaming converter: a bf16/fp16/fp32 DiT safetensors file -> a quantized one.

One tensor is read, quantized and written at a time. The source is never modified; the output
is written to a temp file and renamed only when complete.

    python -m quant.convert SRC.safetensors DST.safetensors --scheme int8-vllm --layout lightx2v
    python -m quant.convert SRC.safetensors DST.safetensors --scheme int8-w8a8 --layout comfyui
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

import torch

from . import reference
from .errors import CheckpointError
from .filters import DEFAULT_FILTER, LayerFilter
from .formats.detect import WEIGHT_ONLY_KEY
from .formats.safetensors_file import SafetensorsFile
from .formats.writer import PlannedTensor, write_safetensors
from .schemes import BLOCK_128, FP8_E4M3, INT8, PER_CHANNEL, PER_TENSOR, Scheme, resolve

LIGHTX2V = "lightx2v"
COMFY_SCALED = "comfyui-scaled-fp8"
COMFY_METADATA = "comfyui-metadata"
COMFY_NATIVE = "comfyui"   # ComfyUI's own: a comfy_quant entry per layer, as its ModelSave writes
LAYOUTS = (LIGHTX2V, COMFY_NATIVE, COMFY_SCALED, COMFY_METADATA)

_DTYPE_OF_FORMAT = {FP8_E4M3: torch.float8_e4m3fn, INT8: torch.int8}


# The schemes a file in each layout holds and reloads as (quant/formats/detect.py). LightX2V's
# per-channel int8/fp8 layers read as W8A8 unless the file's metadata lists them as weight-only.
HOLDS = {LIGHTX2V: {"int8-w8a8", "fp8-w8a8", "fp8-block128", "int8-weight-only", "fp8-weight-only"},
         COMFY_NATIVE: {"int8-w8a8", "fp8-scaled"}, COMFY_SCALED: {"fp8-scaled"}, COMFY_METADATA: {"fp8-scaled"}}
# fp8-scaled means a bf16 matmul on the widened weight, so the ComfyUI layouts ask for ComfyUI's
# full-precision matmul: stock ComfyUI then computes as this pack does, and Load Quantized DiT does
# not run these layers as fp8 W8A8 (full_precision_matrix_mult / a two-element scaled_fp8 marker).
# ComfyUI's int8_tensorwise is int8 W8A8 with per-row activations, per-channel weight scales included.
COMFY_ENTRY = {"int8-w8a8": {"format": "int8_tensorwise"},
               "fp8-scaled": {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}}


def _check_layout_name(layout: str):
    if layout not in HOLDS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def _check_layout(scheme: Scheme, layout: str):
    _check_layout_name(layout)
    if scheme.name not in HOLDS[layout]:
        raise ValueError(f"the {layout} layout cannot hold scheme {scheme.name}; it holds "
                         f"{', '.join(sorted(HOLDS[layout]))}")


def layout_holding(scheme_names: set[str], wanted: str = "auto") -> str:
    """The file layout that holds every one of these schemes: `wanted`, or under "auto" LightX2V's,
    else ComfyUI's scaled fp8; ValueError otherwise."""
    if wanted != "auto":
        _check_layout_name(wanted)
        if not scheme_names <= HOLDS[wanted]:
            raise ValueError(f"the {wanted} layout holds {', '.join(sorted(HOLDS[wanted]))}, not "
                             f"{', '.join(sorted(scheme_names - HOLDS[wanted]))}")
        return wanted
    for layout in (LIGHTX2V, COMFY_SCALED):
        if scheme_names <= HOLDS[layout]:
            return layout
    raise ValueError(f"no checkpoint layout reloads {', '.join(sorted(scheme_names))} as such: LightX2V's holds "
                     f"{', '.join(sorted(HOLDS[LIGHTX2V]))}, ComfyUI's scaled fp8 holds fp8-scaled")


def quantized_entries(layer: str, shape: tuple[int, int], scheme: Scheme, layout: str,
                      qdata: Callable[[], torch.Tensor], scale: Callable[[], torch.Tensor]) -> list[PlannedTensor]:
    """A quantized layer's tensors as `layout` names them: the 8-bit weight and its float32 scale."""
    out_f, in_f = shape
    scale_shape = _scale_shape(scheme, out_f, in_f)
    scale_key = layer + (".scale_weight" if layout == COMFY_SCALED else ".weight_scale")
    entries = [PlannedTensor(layer + ".weight", _DTYPE_OF_FORMAT[scheme.weight_format], shape, qdata),
               PlannedTensor(scale_key, torch.float32, scale_shape, lambda: scale().float().reshape(scale_shape))]
    if layout == COMFY_NATIVE:
        entry = torch.tensor(list(json.dumps(COMFY_ENTRY[scheme.name]).encode("utf-8")), dtype=torch.uint8)
        entries.append(PlannedTensor(layer + ".comfy_quant", torch.uint8, tuple(entry.shape), lambda: entry))
    return entries


def layout_extras(layout: str, quantized_layers: list[str], metadata: dict[str, str],
                  weight_only: list[str] = ()) -> list[PlannedTensor]:
    """What a layout adds besides the layers: ComfyUI's scaled-fp8 marker tensor (two elements: a
    full-precision matmul), or its metadata; the list of weight-only layers, which read as W8A8
    without it."""
    if weight_only and layout == LIGHTX2V:
        metadata[WEIGHT_ONLY_KEY] = json.dumps(sorted(weight_only))
    if layout == COMFY_METADATA:
        metadata["_quantization_metadata"] = json.dumps(
            {"format_version": "1.0", "layers": {n: COMFY_ENTRY["fp8-scaled"] for n in quantized_layers}})
    if layout == COMFY_SCALED:
        return [PlannedTensor("scaled_fp8", torch.float8_e4m3fn, (2,), lambda: torch.zeros(2, dtype=torch.float8_e4m3fn))]
    return []


def _scale_shape(scheme: Scheme, out_f: int, in_f: int) -> tuple[int, ...]:
    g = scheme.weight_granularity
    if g == PER_CHANNEL:
        return (out_f, 1)
    if g == PER_TENSOR:
        return ()
    if g == BLOCK_128:
        return (-(-out_f // 128), -(-in_f // 128))
    raise ValueError(f"no file layout for {scheme.name} weights yet")


def convert(src: str, dst: str, scheme_name: str, layout: str = LIGHTX2V,
            layer_filter: LayerFilter = DEFAULT_FILTER,
            progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Quantize `src` into `dst`; returns a report {quantized: [...], skipped: {name: reason}}."""
    scheme = resolve(scheme_name).scheme
    _check_layout(scheme, layout)
    if os.path.realpath(src) == os.path.realpath(dst):  # realpath: a symlink to src is src
        raise CheckpointError(src, "the output path is the source file.",
                              "choose another output name; the source checkpoint is never overwritten.")
    f = SafetensorsFile(src)
    # Only weights count: some files carry byte blobs such as a tokenizer (`spiece_model`).
    if any(f.dtype_name(k) in ("I8", "F8_E4M3", "U8") for k in f.keys() if k.endswith(".weight")):
        raise CheckpointError(src, "is already quantized.", "convert from the original bf16/fp16 checkpoint.")
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def quantized(key: str):
        if key not in cache:
            cache.clear()  # only the layer being written is ever held
            cache[key] = reference.quantize_weight_streaming(f.get(key), scheme)
        return cache[key]

    planned, report = [], {"quantized": [], "skipped": {}}
    for key in f.keys():
        shape = f.shape(key)
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        reason = layer_filter.skip_reason(layer, shape) if layer else "not a weight"
        if layer is None or reason is not None:
            if layer is not None and len(shape) == 2:
                report["skipped"][layer] = reason
            planned.append(PlannedTensor(key, _torch_dtype(f, key), shape, lambda k=key: f.get(k)))
            continue
        planned += quantized_entries(layer, shape, scheme, layout, lambda k=key: quantized(k)[0],
                                     lambda k=key: quantized(k)[1])
        report["quantized"].append(layer)
    metadata = dict(f.metadata)
    planned += layout_extras(layout, report["quantized"], metadata,
                             report["quantized"] if not scheme.quantizes_activation else ())
    metadata["quantdit_scheme"] = scheme.name
    write_safetensors(dst, planned, metadata, progress)
    return report


_DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
       "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}


def _torch_dtype(f: SafetensorsFile, key: str) -> torch.dtype:
    return _DT[f.dtype_name(key)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quant.convert", description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--scheme", required=True, help="a scheme or alias, e.g. int8-vllm, fp8-sgl, fp8-scaled")
    p.add_argument("--layout", default=LIGHTX2V, choices=LAYOUTS)
    a = p.parse_args(argv)
    report = convert(a.src, a.dst, a.scheme, a.layout,
                     progress=lambda i, n: print(f"\r{i}/{n} tensors", end="", file=sys.stderr))
    print(f"\nwrote {a.dst}: {len(report['quantized'])} layers quantized, {len(report['skipped'])} kept", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
