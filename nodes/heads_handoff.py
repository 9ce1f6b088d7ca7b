"""Hand Flux's attention output to the output projections' quantizer in SDPA's head layout.

ComfyUI's PyTorch attention returns `out.transpose(1, 2).reshape(B, L, H * D)`: with the flash and
cuDNN kernels SDPA's output is [B, H, L, D] in memory, so that reshape copies the whole attention
output. In a Flux double block the copy is split into text and image tokens and read by the two
`attn.proj` linears; a per-token W8A8 linear reads it once more to quantize it. Through ComfyUI's
`optimized_attention_override` hook (transformer_options) the attention returns a `DeferredHeads`
instead (quant/deferred.py), and the projections' quantizer reads the rows from the head layout.

Only where the code after the attention is known: ComfyUI's own Flux model, whose double blocks
slice the output and whose single blocks concatenate it (which computes it first, as before).
Any other use computes it with ComfyUI's own ops, so results do not change by a bit.
"""
from __future__ import annotations

import torch

import comfy.ldm.modules.attention as comfy_attention
from comfy.ldm.flux.layers import DoubleStreamBlock
from comfy.ldm.flux.model import Flux

from ..quant.deferred import DeferredHeads
from ..quant.report import QuantReport
from .gelu_handoff import takes_deferred


def _is_pytorch_attention(func) -> bool:
    # The hook receives the attention function without ComfyUI's wrapper.
    return func is getattr(comfy_attention.attention_pytorch, "__wrapped__", None)


def _defers(func, args, kwargs) -> bool:
    if not _is_pytorch_attention(func) or not kwargs.get("skip_reshape") or kwargs.get("skip_output_reshape"):
        return False
    q = args[0] if args else kwargs.get("q")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[0] > comfy_attention.SDP_BATCH_LIMIT:
        return False  # above the batch limit ComfyUI writes the [B, L, H * D] output itself
    if torch.compiler.is_compiling() or (q.requires_grad and torch.is_grad_enabled()):
        return False
    patches = (kwargs.get("transformer_options") or {}).get("patches", {})
    return not patches.get("attn1_output_patch")  # a patch of the output would compute it anyway


def attention_heads_handoff(func, *args, **kwargs):
    """ComfyUI's optimized_attention_override: the attention, its output deferred where it pays."""
    if _defers(func, args, kwargs):
        return DeferredHeads(func(*args, skip_output_reshape=True, **kwargs))
    return func(*args, **kwargs)


def _projections(patcher, root: str) -> int:
    """How many Flux double-block projections (image and text) take a deferred activation."""
    top = patcher.get_model_object(root)
    if type(top) is not Flux:
        return 0
    count = 0
    for name, module in top.named_modules():
        if isinstance(module, DoubleStreamBlock):
            path = f"{root}.{name}"
            count += sum(takes_deferred(patcher.get_model_object(f"{path}.{stream}_attn.proj"))
                         for stream in ("img", "txt"))
    return count


def defer_attention_heads(patcher, report: QuantReport, root: str = "diffusion_model") -> int:
    """Sets the attention hook on `patcher` (a clone the caller owns) where Flux's projections take
    it, with a note in `report`; returns how many projections read the head layout."""
    count = _projections(patcher, root)
    if not count:
        return 0
    options = patcher.model_options.setdefault("transformer_options", {})
    current = options.get("optimized_attention_override")
    if current is not None and current is not attention_heads_handoff:
        report.notes.append("another node overrides ComfyUI's attention: the attention outputs are copied "
                            "before the output projections, as without this pack")
        return 0
    options["optimized_attention_override"] = attention_heads_handoff
    report.notes.append(f"{count} attention output projections quantize their input from the attention's own "
                        "layout (its transposed copy is never written)")
    return count
