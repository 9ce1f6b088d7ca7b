"""Object-patch each tanh-GELU whose output only feeds a per-token W8A8 quantized linear with a
`DeferredGelu` (quant/deferred.py): the linear's quantizer then applies the GELU, and in Flux's
single blocks the concatenation before it, in one pass.

Two places in ComfyUI's DiTs have that shape:
- an `nn.Sequential` of Linear, GELU(tanh), Linear: Wan's `ffn`, Flux's `img_mlp` / `txt_mlp`;
- Flux's `SingleStreamBlock`, whose `mlp_act` output is concatenated with the attention output
  and fed to `linear2` (its yak / SiLU variants use other activations and are left alone).
Whatever the block code does with a deferred activation, it is computed first where needed, so
a patch here can only cost speed, never change results. In both places nothing writes into the
GELU's input before the linear reads it (the hand-off reads it then), and nothing writes into its
output (an in-place op on a deferred output is refused with an error, see quant/deferred.py).
"""
from __future__ import annotations

import torch

from ..quant.deferred import DeferredGelu, consumes_deferred
from ..quant.report import QuantReport
from .ops import QuantLinearMixin


def _is_tanh_gelu(module) -> bool:
    return type(module) is torch.nn.GELU and module.approximate == "tanh"


def takes_deferred(module) -> bool:
    """A quantized linear that reads a quant.deferred activation from its sources."""
    return isinstance(module, QuantLinearMixin) and consumes_deferred(module.quant_scheme)


def _handoffs(patcher, root: str):
    """(key of a GELU to replace) for every GELU -> per-token W8A8 linear pair under `root`."""
    top = patcher.get_model_object(root)
    for name, module in top.named_modules():
        path = f"{root}.{name}" if name else root
        if isinstance(module, torch.nn.Sequential):
            children = list(module._modules)
            for act, consumer in zip(children, children[1:]):
                if (_is_tanh_gelu(patcher.get_model_object(f"{path}.{act}"))
                        and takes_deferred(patcher.get_model_object(f"{path}.{consumer}"))):
                    yield f"{path}.{act}"
        elif hasattr(module, "mlp_act") and hasattr(module, "linear2") and not getattr(module, "yak_mlp", False):
            if (_is_tanh_gelu(patcher.get_model_object(f"{path}.mlp_act"))
                    and takes_deferred(patcher.get_model_object(f"{path}.linear2"))):
                yield f"{path}.mlp_act"


def defer_gelus(patcher, report: QuantReport, root: str = "diffusion_model") -> int:
    """Adds the object patches to `patcher` (a clone the caller owns) and a note to `report`;
    returns how many."""
    keys = list(_handoffs(patcher, root))
    for key in keys:
        patcher.add_object_patch(key, DeferredGelu())
    if keys:
        report.notes.append(f"{len(keys)} GELU activations are computed by the quantizer of the layer after "
                            "them (their output is never written)")
    return len(keys)
