"""Hand Flux's attention output to the next layer's quantizer in SDPA's head layout.

ComfyUI's PyTorch attention returns `out.transpose(1, 2).reshape(B, L, H * D)`: with the flash and
cuDNN kernels SDPA's output is [B, H, L, D] in memory, so that reshape copies the whole attention
output, and a per-token W8A8 linear then reads the copy once more to quantize it. In a Flux double
block the copy is split into text and image tokens for the two `attn.proj` linears; in a single
block it is concatenated with the MLP's GELU output for `linear2`. Through ComfyUI's
`optimized_attention_override` hook (transformer_options) the attention returns a `DeferredHeads`
instead (quant/deferred.py), and those layers' quantizer reads the rows from the head layout
(with the GELU hand-off, the single blocks' GELU in the same pass).

Only where the code after the attention is known: ComfyUI's own Flux model. Any other use of the
output computes it with ComfyUI's own ops, so results do not change by a bit.
"""
from __future__ import annotations

import torch

import comfy.ldm.modules.attention as comfy_attention
from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock
from comfy.ldm.flux.model import Flux

from ..quant.deferred import DeferredGelu, DeferredHeads
from ..quant.report import QuantReport
from .gelu_handoff import takes_deferred


# The hook receives the attention function without ComfyUI's wrapper.
_PYTORCH_ATTENTION = getattr(comfy_attention.attention_pytorch, "__wrapped__", None)


def _defers(func, args, kwargs) -> bool:
    if func is not _PYTORCH_ATTENTION or not kwargs.get("skip_reshape") or kwargs.get("skip_output_reshape"):
        return False
    q = args[0] if args else kwargs.get("q")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[0] > comfy_attention.SDP_BATCH_LIMIT:
        return False  # above the batch limit ComfyUI writes the [B, L, H * D] output itself
    if torch.compiler.is_compiling() or (q.requires_grad and torch.is_grad_enabled()):
        return False
    options = kwargs.get("transformer_options") or {}
    if options.get("patches", {}).get("attn1_output_patch"):
        return False  # a patch of the output would compute it anyway
    # A block another node replaces may use the output in ways not checked here (in place).
    return not options.get("patches_replace", {}).get("dit")


def attention_heads_handoff(func, *args, **kwargs):
    """ComfyUI's optimized_attention_override: the attention, its output deferred where it pays."""
    if _defers(func, args, kwargs):
        return DeferredHeads(func(*args, skip_output_reshape=True, **kwargs))
    return func(*args, **kwargs)


def _readers(patcher, root: str) -> int:
    """How many layers after a Flux attention would read its output in the head layout: the double
    blocks' image and text projections, and the single blocks' linear2 whose GELU is handed off."""
    top = patcher.get_model_object(root)
    if type(top) is not Flux:
        return 0
    count = 0
    for name, module in top.named_modules():
        path = f"{root}.{name}"
        if isinstance(module, DoubleStreamBlock):
            count += sum(takes_deferred(patcher.get_model_object(f"{path}.{stream}_attn.proj"))
                         for stream in ("img", "txt"))
        elif isinstance(module, SingleStreamBlock):
            count += isinstance(patcher.get_model_object(f"{path}.mlp_act"), DeferredGelu)
    return count


def defer_attention_heads(patcher, report: QuantReport, root: str = "diffusion_model") -> int:
    """Sets the attention hook on `patcher` (a clone the caller owns, after defer_gelus) where Flux's
    layers take it, with a note in `report`; returns how many layers read the head layout."""
    count = _readers(patcher, root)
    if not count:
        return 0
    options = patcher.model_options.setdefault("transformer_options", {})
    current = options.get("optimized_attention_override")
    if current is not None and current is not attention_heads_handoff:
        report.notes.append("another node overrides ComfyUI's attention: the attention outputs are copied "
                            "before the output projections, as without this pack")
        return 0
    options["optimized_attention_override"] = attention_heads_handoff
    report.notes.append(f"{count} layers quantize the attention output from the attention's own layout "
                        "(its transposed copy is never written)")
    return count
