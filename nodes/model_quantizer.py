"""Quantize the Linear layers of a loaded ComfyUI MODEL without touching the input MODEL.

The result is a ModelPatcher clone whose quantized layers are object patches: ComfyUI swaps them
in when it loads the clone and restores the originals for the input MODEL, and LoRA weight
patches on either side still apply (dequantize -> add -> requantize, see nodes/ops.py).
One layer is quantized at a time, so peak extra memory is the quantized model plus one layer.
"""
from __future__ import annotations

import uuid
from collections import Counter

import torch

import comfy.model_management
import comfy.utils

from ..quant.filters import LayerFilter, is_modulation
from ..quant.reference import weight_nbytes
from ..quant.report import QuantReport, describe_kernels, layer_group
from ..quant.schemes import ResolvedScheme, weight_only_partner
from .dynamic_vram import non_dynamic
from .fused_siblings import fuse_sibling_linears
from .gelu_handoff import defer_gelus
from .heads_handoff import defer_attention_heads
from .ops import QuantizedLinear, QuantLinearMixin
from .shared_quant import share_row_quant

ROOT = "diffusion_model"


def _release_patched_weights(model):
    """If some clone of this model has its LoRA/weight patches baked in right now, unload it so we
    read the original weights (otherwise the patch would be applied twice)."""
    if getattr(model.model, "current_weight_patches_uuid", None) is None:
        return
    for loaded in list(comfy.model_management.current_loaded_models):
        patcher = loaded.model
        if patcher is not None and patcher.model is model.model:
            patcher.unpatch_model(patcher.offload_device)


def _patch_key(root: str, name: str) -> str:
    return f"{root}.{name}" if root else name


def patched_modules(patcher, root: str = ROOT):
    """(name, module) for every module under `root` ("" for the whole model) as the patched model
    runs it: an object patch stands in for the module it replaces."""
    top = patcher.get_model_object(root) if root else patcher.model
    for name, module in top.named_modules():
        yield name, patcher.object_patches.get(_patch_key(root, name), module)


def quantize_model(model, resolved: ResolvedScheme, backend: str, layer_filter: LayerFilter,
                   title: str, root: str = ROOT):
    """`model` is a ModelPatcher; `root` names the module inside it whose Linears are quantized
    ("" for the whole patched model, as for text encoders). The result is never a DynamicVRAM
    patcher (see nodes/dynamic_vram.py); its `.model` may be a fresh load of the input's file."""
    scheme = resolved.scheme
    # 'auto' keeps the alias's kernel (e.g. 'vllm' from int8-vllm); it falls back visibly when missing.
    pref = resolved.backend if backend == "auto" else backend
    model = non_dynamic(model)
    out = model.clone()
    # Its weights differ from the input's: without a uuid of its own, ComfyUI would take the input's
    # loaded weights as this clone's and never move the quantized layers to the GPU.
    out.patches_uuid = uuid.uuid4()
    _release_patched_weights(model)
    report = QuantReport(source=title, layout=f"runtime {scheme.name}")
    skipped: Counter[str] = Counter()
    candidates = []
    for name, module in patched_modules(model, root):
        if isinstance(module, QuantLinearMixin) and module.quant_scheme is not None:
            skipped[f"already quantized ({module.quant_scheme.name})"] += 1
            continue
        if not isinstance(module, torch.nn.Linear):
            if type(module).__name__ == "Linear" and hasattr(module, "quant_format"):
                skipped["already quantized by ComfyUI"] += 1
            continue
        reason = layer_filter.skip_reason(name, tuple(module.weight.shape))
        if reason:
            skipped[reason] += 1
            report.kept_bytes += module.weight.numel() * 2
            continue
        # With keep_small_m_layers, few-row layers (context k/v, text streams, modulation) run
        # weight-only under W8A8.
        few_rows = layer_filter.runs_weight_only(name, scheme)
        candidates.append((name, module, weight_only_partner(scheme) if few_rows else scheme))

    modulation = Counter(s.name for name, _, s in candidates if is_modulation(name))
    work = comfy.model_management.get_torch_device()
    pbar = comfy.utils.ProgressBar(max(len(candidates), 1))
    for name, module, layer_scheme in candidates:
        q = QuantizedLinear.from_linear(module, layer_scheme, pref if layer_scheme is scheme else None, work)
        out.add_object_patch(_patch_key(root, name), q)
        report.schemes[layer_scheme.name] = report.schemes.get(layer_scheme.name, 0) + 1
        report.groups[layer_group(name)] = layer_scheme.name
        report.quantized_bytes += weight_nbytes(module.out_features, module.in_features, layer_scheme)
        report.bf16_equivalent_bytes += module.out_features * module.in_features * 2
        pbar.update(1)
    if root:
        defer_gelus(out, report, root)
        defer_attention_heads(out, report, root)
        share_row_quant(out, report, root)
        fuse_sibling_linears(out, report, root)
    for s, n in sorted(modulation.items()):
        report.notes.append(f"{n} modulation (adaLN) layers run {s} (one row per sample)")
    for reason, n in sorted(skipped.items()):
        report.notes.append(f"kept {n} layers: {reason}")
    if not candidates:
        report.notes.append("nothing new to quantize: the output is the input model")
    describe_kernels(report, out.load_device, pref)
    return out, report
