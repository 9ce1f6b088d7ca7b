"""A tanh-GELU whose output is handed, unwritten, to the quantized linear after it.

In a DiT MLP the GELU's output goes straight into a W8A8 linear, whose first act is to read it
back and quantize it per token. In Flux's single blocks it is also concatenated with the
attention output first. Writing the GELU output and the concatenation costs a full pass over the
block's widest activation, twice; the quantizer can instead read the GELU's input and apply the
GELU itself (triton_quant.per_token_quant_gelu).

`DeferredGelu` replaces such a GELU (an object patch: ComfyUI's block code is not touched). It
returns a `DeferredActivation`: a tensor that knows how to compute itself. A quantized linear
whose kernel can read it directly does; every other use (a bf16 linear, a block that multiplies
the activation, a LoRA path) computes it first with the ordinary torch ops, so results
are the same whatever code receives it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils._pytree import tree_map_only

from .schemes import PER_TOKEN, Scheme

# Tensor attributes that read only the wrapper's metadata, which is already right.
_METADATA = {torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
             torch.Tensor.ndim.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.requires_grad.__get__,
             torch.Tensor.size, torch.Tensor.dim}


def consumes_deferred(scheme: Optional[Scheme]) -> bool:
    """Whether a linear of this scheme can take a DeferredActivation: its activation is quantized per
    token, which is what the fused GELU quantizer produces."""
    return scheme is not None and scheme.quantizes_activation and scheme.activation_granularity == PER_TOKEN


class DeferredActivation(torch.Tensor):
    """cat((prefix, gelu_tanh(source)), -1), or gelu_tanh(source) without a prefix; not computed yet."""

    source: torch.Tensor
    prefix: Optional[torch.Tensor]

    @staticmethod
    def __new__(cls, source: torch.Tensor, prefix: Optional[torch.Tensor] = None):
        width = source.shape[-1] + (0 if prefix is None else prefix.shape[-1])
        return torch.Tensor._make_wrapper_subclass(cls, (*source.shape[:-1], width), dtype=source.dtype,
                                                   device=source.device)

    def __init__(self, source: torch.Tensor, prefix: Optional[torch.Tensor] = None):
        self.source = source
        self.prefix = prefix

    def materialize(self) -> torch.Tensor:
        act = torch.nn.functional.gelu(self.source, approximate="tanh")
        return act if self.prefix is None else torch.cat((self.prefix, act), -1)

    def rows(self) -> "DeferredActivation":
        """The same activation as [tokens, features] (views, no copies where the sources allow)."""
        src = self.source.reshape(-1, self.source.shape[-1])
        pre = None if self.prefix is None else self.prefix.reshape(-1, self.prefix.shape[-1])
        return DeferredActivation(src, pre)

    def __repr__(self):
        return f"DeferredActivation(shape={tuple(self.shape)}, dtype={self.dtype}, prefix={self.prefix is not None})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is torch.cat:
            joined = _join(*args, **kwargs)
            if joined is not None:
                return joined
        if _writes_in_place(func, args, kwargs):
            # It would write into a temporary, and the caller's tensor would silently stay without it.
            raise RuntimeError(f"QuantDiT: {getattr(func, '__name__', func)} would modify a GELU output that the "
                               "GELU hand-off (nodes/gelu_handoff.py) has not computed yet. A custom node or "
                               "patch changes these blocks in a way the hand-off does not expect; please report "
                               "it to ComfyUI-QuantDiT with the workflow.")
        args, kwargs = tree_map_only(DeferredActivation, DeferredActivation.materialize, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by calls that bypass __torch_function__ (C++ internals): compute, then run.
        args, kwargs = tree_map_only(DeferredActivation, DeferredActivation.materialize, (args, kwargs or {}))
        return func(*args, **kwargs)


_IN_PLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                     "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__"}


def _writes_in_place(func, args, kwargs) -> bool:
    """An op that writes into a DeferredActivation argument (x.mul_(...), x += ..., out=x)."""
    name = getattr(func, "__name__", "")
    into_self = name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))
    if into_self and args and isinstance(args[0], DeferredActivation):
        return True
    out = kwargs.get("out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, DeferredActivation) for o in outs)


def _join(tensors, dim=0, *, out=None) -> Optional[DeferredActivation]:
    """torch.cat((x, deferred gelu), last dim) as one deferred activation; None for any other cat."""
    if out is not None or len(tensors) != 2:
        return None
    prefix, act = tensors
    if (not isinstance(act, DeferredActivation) or act.prefix is not None or isinstance(prefix, DeferredActivation)
            or not isinstance(prefix, torch.Tensor)):
        return None
    src = act.source
    if (prefix.dim() != src.dim() or dim not in (-1, src.dim() - 1) or prefix.shape[:-1] != src.shape[:-1]
            or prefix.dtype != src.dtype or prefix.device != src.device):
        return None
    return DeferredActivation(src, prefix)


class DeferredGelu(torch.nn.Module):
    """nn.GELU(approximate="tanh") for a GELU whose only consumer is a quantized linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
            return torch.nn.functional.gelu(x, approximate="tanh")
        return DeferredActivation(x)

    def extra_repr(self) -> str:
        return "approximate='tanh', output deferred to the next quantized linear"
