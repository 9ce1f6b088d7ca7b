"""Activations handed, unwritten, to the quantized linear after them.

A W8A8 linear's first act is to read its input back and quantize it per token, so whatever pass
wrote that input can be skipped when the quantizer can read the input's own sources:

- `DeferredActivation`: a tanh-GELU's output (and, in Flux's single blocks, its concatenation
  after the attention output). In a DiT MLP the GELU output goes straight into the second linear;
  the quantizer applies the GELU itself (triton_quant.per_token_quant_gelu). `DeferredGelu`
  replaces such a GELU (an object patch: ComfyUI's block code is not touched).
- `DeferredHeads`: an attention output still laid out [B, heads, L, head_dim], as SDPA returns it.
  ComfyUI transposes it into [B, L, heads * head_dim], a full copy, before the output projection;
  the quantizer reads the rows from the head layout instead (triton_quant.per_token_quant_heads).
  nodes/heads_handoff.py returns it from ComfyUI's PyTorch attention in Flux-family models.

Both are tensors that know how to compute themselves. A quantized linear whose kernel can read one
directly does; every other use (a bf16 linear, a block that multiplies the activation, a LoRA path)
computes it first with the ordinary torch ops, so results are the same whatever code receives it.
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


class Deferred(torch.Tensor):
    """A tensor not computed yet: `materialize()` computes it with torch's own ops, which every use
    but a consuming kernel gets. Subclasses keep their sources as attributes and may answer some
    calls without computing (`_answer`)."""

    @classmethod
    def _wrapper(cls, shape, like: torch.Tensor) -> "Deferred":
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=like.dtype, device=like.device)
        t._meta = (torch.Size(shape), like.dtype, like.device)
        return t

    # The metadata a quantized linear reads several times per call, as plain attributes: Tensor's
    # own getters go through __torch_function__, about 2 us each (measured on the CPU).
    shape = property(lambda self: self._meta[0])
    dtype = property(lambda self: self._meta[1])
    device = property(lambda self: self._meta[2])
    is_cuda = property(lambda self: self._meta[2].type == "cuda")
    ndim = property(lambda self: len(self._meta[0]))

    def size(self, dim=None):
        return self._meta[0] if dim is None else self._meta[0][dim]

    def dim(self) -> int:
        return len(self._meta[0])

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError

    def rows(self) -> "Deferred":
        """The same activation as [tokens, features], still deferred."""
        raise NotImplementedError

    @classmethod
    def _answer(cls, func, args, kwargs):
        """The result of func without computing, or None to compute first: a deferred GELU after
        a prefix stays deferred (the cat before Flux's linear2, the attention output as prefix)."""
        return _join(*args, **kwargs) if func is torch.cat else None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        answer = cls._answer(func, args, kwargs)
        if answer is not None:
            return answer
        if _writes_in_place(func, args, kwargs):
            # It would write into a temporary, and the caller's tensor would silently stay without it.
            raise RuntimeError(f"QuantDiT: {getattr(func, '__name__', func)} would modify {cls._what} that "
                               f"{cls._handed_off_by} has not computed yet. A custom node or patch changes "
                               "these blocks in a way the hand-off does not expect; please report it to "
                               "ComfyUI-QuantDiT with the workflow.")
        # Only this class's own: another kind in the same call (cat((attention, deferred GELU)) in
        # Flux's single blocks) then gets its own turn, and may stay deferred.
        args, kwargs = tree_map_only(cls, cls.materialize, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by calls that bypass __torch_function__ (C++ internals): compute, then run.
        args, kwargs = tree_map_only(Deferred, lambda t: t.materialize(), (args, kwargs or {}))
        return func(*args, **kwargs)


class DeferredActivation(Deferred):
    """cat((prefix, gelu_tanh(source)), -1), or gelu_tanh(source) without a prefix; not computed yet.
    The prefix (Flux's attention output) may itself be a DeferredHeads."""

    source: torch.Tensor
    prefix: Optional[torch.Tensor]
    _what, _handed_off_by = "a GELU output", "the GELU hand-off (nodes/gelu_handoff.py)"

    @staticmethod
    def __new__(cls, source: torch.Tensor, prefix: Optional[torch.Tensor] = None):
        width = source.shape[-1] + (0 if prefix is None else prefix.shape[-1])
        return cls._wrapper((*source.shape[:-1], width), source)

    def __init__(self, source: torch.Tensor, prefix: Optional[torch.Tensor] = None):
        self.source = source
        self.prefix = prefix

    def materialize(self) -> torch.Tensor:
        act = torch.nn.functional.gelu(self.source, approximate="tanh")
        if self.prefix is None:
            return act
        return torch.cat((self.prefix.materialize() if isinstance(self.prefix, Deferred) else self.prefix, act), -1)

    def rows(self) -> "DeferredActivation":
        """The same activation as [tokens, features] (views, no copies where the sources allow)."""
        src = self.source.reshape(-1, self.source.shape[-1])
        pre = self.prefix
        if pre is not None:
            pre = pre.rows() if isinstance(pre, DeferredHeads) else pre.reshape(-1, pre.shape[-1])
        return DeferredActivation(src, pre)

    def __repr__(self):
        return f"DeferredActivation(shape={tuple(self.shape)}, dtype={self.dtype}, prefix={self.prefix is not None})"


class DeferredHeads(Deferred):
    """heads.transpose(1, 2).reshape(B, L, H * D) for an attention output heads [B, H, L, D], not
    copied yet; with `flat`, the same as [B * L, H * D] rows."""

    heads: torch.Tensor
    flat: bool
    _what, _handed_off_by = "an attention output", "the attention hand-off (nodes/heads_handoff.py)"

    @staticmethod
    def __new__(cls, heads: torch.Tensor, flat: bool = False):
        b, h, tokens, d = heads.shape
        shape = (b * tokens, h * d) if flat else (b, tokens, h * d)
        return cls._wrapper(shape, heads)

    def __init__(self, heads: torch.Tensor, flat: bool = False):
        self.heads = heads
        self.flat = flat

    def materialize(self) -> torch.Tensor:
        b, h, tokens, d = self.heads.shape
        out = self.heads.transpose(1, 2)
        return out.reshape(b * tokens, h * d) if self.flat else out.reshape(b, tokens, h * d)

    def rows(self) -> "DeferredHeads":
        return DeferredHeads(self.heads, flat=True)

    def __getitem__(self, index):
        # Flux's double blocks split the joint attention output into its text and image tokens.
        part = _token_slice(self, index)
        return part if part is not None else super().__getitem__(index)

    def __repr__(self):
        return f"DeferredHeads(shape={tuple(self.shape)}, dtype={self.dtype}, heads={tuple(self.heads.shape)})"


def _token_slice(t: DeferredHeads, index) -> Optional[DeferredHeads]:
    """t[:, a:b] (a plain slice of the tokens) as a deferred view of the same heads; None otherwise."""
    if t.flat or not isinstance(index, tuple) or len(index) != 2:
        return None
    batch, tokens = index
    if batch != slice(None) or not isinstance(tokens, slice) or tokens.step not in (None, 1):
        return None
    if not all(v is None or type(v) is int for v in (tokens.start, tokens.stop)):
        return None
    return DeferredHeads(t.heads[:, :, tokens])


_IN_PLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                     "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__"}


def _writes_in_place(func, args, kwargs) -> bool:
    """An op that writes into a deferred argument (x.mul_(...), x += ..., out=x)."""
    name = getattr(func, "__name__", "")
    into_self = name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))
    if into_self and args and isinstance(args[0], Deferred):
        return True
    out = kwargs.get("out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, Deferred) for o in outs)


def _join(tensors, dim=0, *, out=None) -> Optional[DeferredActivation]:
    """torch.cat((x, deferred gelu), last dim) as one deferred activation (x may be a DeferredHeads);
    None for any other cat."""
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
