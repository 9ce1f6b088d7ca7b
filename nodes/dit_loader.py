"""Turn a pre-quantized DiT file into a ComfyUI MODEL served by this pack's quantized ops."""
from __future__ import annotations

import os

import torch

import comfy.model_detection
import comfy.model_management
import comfy.sd
import comfy.utils

from ..quant.errors import CheckpointError
from ..quant.formats.detect import LayerQuant
from ..quant.formats.load import layout_of, load_checkpoint
from ..quant.hardware import fused_w8a8_kernel
from ..quant.reference import weight_nbytes
from ..quant.report import QuantReport, describe_kernels, layer_group
from ..quant.schemes import get_scheme
from .fused_siblings import fuse_sibling_linears
from .gelu_handoff import defer_gelus
from .heads_handoff import defer_attention_heads
from .ops import make_quant_ops
from .shared_quant import share_row_quant


COMPUTE_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# How per-tensor fp8 layers run (ComfyUI's scaled fp8 files): widened for a float matmul as stored,
# as fp8 W8A8, or (auto) W8A8 where a fused fp8 kernel runs on the device.
SCALED_FP8_MODES = ("auto", "fp8-w8a8", "fp8-scaled")


def scaled_fp8_runs_w8a8(mode: str, backend: str) -> bool:
    if mode not in SCALED_FP8_MODES:
        raise ValueError(f"scaled_fp8 must be one of {', '.join(SCALED_FP8_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "fp8-w8a8"
    return fused_w8a8_kernel("fp8-w8a8", comfy.model_management.get_torch_device(), backend) is not None


def load_quantized_dit(path: str, backend: str = "auto", compute_dtype: str = "default", scaled_fp8: str = "auto"):
    sd, plan, metadata = load_checkpoint(path, scaled_fp8_runs_w8a8(scaled_fp8, backend))
    if not plan.is_quantized:
        raise CheckpointError(path, "holds no quantized layers.",
                              "load plain checkpoints with ComfyUI's 'Load Diffusion Model' node, or pass "
                              "them through 'Quantize Model (QuantDiT)'.")
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    layers = {q.layer: q for q in plan.layers.values()}
    if prefix and any(k.startswith(prefix) for k in sd):
        sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
        layers = {name[len(prefix):]: q for name, q in layers.items() if name.startswith(prefix)}
    ops = make_quant_ops(layers, path, None if backend == "auto" else backend)
    options = {"custom_operations": ops}
    dtype = COMPUTE_DTYPES[compute_dtype] or unquantized_dtype(sd, metadata)
    if dtype is not None:
        options["dtype"] = dtype
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options, metadata=metadata,
                                                     disable_dynamic=True)
    if model is None:
        raise CheckpointError(path, "ComfyUI could not detect which model architecture this is.",
                              "check that the file is a complete DiT (Wan, Flux, Qwen-Image, HunyuanVideo).")
    unclaimed = sorted(set(layers) - ops.loaded_layers)
    if unclaimed:
        raise CheckpointError(path, f"{len(unclaimed)} quantized layers have no matching Linear in the "
                              f"detected model (first: {unclaimed[0]}).",
                              "the file does not match the architecture ComfyUI detected; re-export it from "
                              "the original model.", unclaimed[0])
    report = build_report(path, layout_of(plan), layers)
    report.notes.extend(plan.notes)
    defer_gelus(model, report)
    defer_attention_heads(model, report)
    share_row_quant(model, report)
    fuse_sibling_linears(model, report)
    describe_kernels(report, model.load_device, backend)
    return model, report


def unquantized_dtype(sd: dict, metadata: dict):
    """The dtype stock ComfyUI stores a quantized file's unquantized weights in: its device's choice
    for the architecture. Given custom operations, ComfyUI would take the file's most common dtype
    instead, fp8 in an fp8 file, and on GPUs with fp8 compute store the embeddings, norms and head in
    fp8 without a scale. None where the architecture is not detected (the load then says so)."""
    config = comfy.model_detection.model_config_from_unet(sd, "", metadata=metadata)
    if config is None:
        return None
    return comfy.model_management.unet_dtype(model_params=comfy.utils.calculate_parameters(sd),
                                             supported_dtypes=list(config.supported_inference_dtypes))


def build_report(path: str, layout: str, layers: dict[str, LayerQuant]) -> QuantReport:
    report = QuantReport(source=os.path.basename(path), layout=layout)
    for name, q in layers.items():
        report.schemes[q.scheme] = report.schemes.get(q.scheme, 0) + 1
        report.groups[layer_group(name)] = q.scheme
        out_f, in_f = q.shape
        report.quantized_bytes += weight_nbytes(out_f, in_f, get_scheme(q.scheme))
        report.bf16_equivalent_bytes += out_f * in_f * 2
    return report
