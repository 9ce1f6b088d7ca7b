"""Give the sibling q/k/v (or k/v) linears of each attention module one SharedQuant slot
(quant/shared_quant.py), so that a per-token W8A8 scheme quantizes the input they share once.

Only sibling names of attention modules that call them back to back on one tensor, with nothing
writing into it between the calls, get a slot:
- Wan: self-attention `q(x)`, `k(x)`, `v(x)`; cross-attention `k(context)`, `v(context)` and, for
  image-to-video, `k_img` / `v_img` on the image context;
- diffusers-style attention (Qwen-Image, LTX-Video): `to_q` / `to_k` / `to_v` and the text stream's
  `add_q_proj` / `add_k_proj` / `add_v_proj`.
Siblings that read different tensors (Wan's cross-attention q and k) just miss and quantize their
own; Flux and HunyuanVideo compute q, k and v in one fused linear and have nothing to share.
"""
from __future__ import annotations

from ..quant.deferred import consumes_deferred
from ..quant.report import QuantReport
from ..quant.shared_quant import SharedQuant
from .ops import QuantLinearMixin

SIBLINGS = frozenset({"q", "k", "v", "k_img", "v_img", "to_q", "to_k", "to_v",
                      "add_q_proj", "add_k_proj", "add_v_proj"})


def _per_token_w8a8(module) -> bool:
    return isinstance(module, QuantLinearMixin) and consumes_deferred(module.quant_scheme)


def share_row_quant(patcher, report: QuantReport, root: str = "diffusion_model") -> int:
    """Sets one slot on the quantized sibling linears of each attention module under `root` (the
    modules are this pack's: object patches of the caller's clone, or a model this pack loaded);
    notes it in `report`; returns how many modules got one."""
    groups = 0
    for name, module in patcher.get_model_object(root).named_modules():
        path = f"{root}.{name}" if name else root
        members = [patcher.get_model_object(f"{path}.{child}") for child in module._modules if child in SIBLINGS]
        members = [m for m in members if _per_token_w8a8(m)]
        if len(members) < 2:
            continue
        slot = SharedQuant()
        for member in members:
            member.quant_share = slot
        groups += 1
    if groups:
        report.notes.append(f"{groups} attention modules quantize the input of their q/k/v linears once "
                            "for all of them")
    return groups
