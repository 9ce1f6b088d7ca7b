"""Quantize an activation once for sibling linears that read the same tensor (q, k, v).

Wan's self-attention calls `q(x)`, `k(x)` and `v(x)` on one tensor, and its cross-attention
`k(context)` and `v(context)`; under a per-token W8A8 scheme each of them would quantize that
tensor again (at Wan 14B's 32760 tokens a 0.5 GB read-and-write pass, about a tenth of the layer).
A `SharedQuant` slot is shared by the siblings of one attention module: the first one stores the
quantized rows together with a weak reference to the tensor object it was handed, and a sibling
handed that same object reuses them. The rows are dropped as soon as that tensor is freed or the
slot is refilled, so the slot holds at most one activation's 8-bit copy while its source lives.

The tensor object's identity stands for its contents: it cannot have been freed and its memory
reused (the weak reference would be dead), and where torch tracks versions (outside
inference_mode) an in-place write since the store is a miss too. In inference mode only code that
writes into a linear's input between sibling calls could defeat it; the attention modules the
nodes give a slot to (nodes/shared_quant.py) do not.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class QuantizedRows:
    """A [tokens, in] activation already quantized per token, in place of the activation itself:
    backends with a `row_quantizer` take it in `linear` for their per-token W8A8 schemes."""
    q: torch.Tensor             # [tokens, in] int8 / float8_e4m3fn
    scale: torch.Tensor         # [tokens, 1] float32
    dtype: torch.dtype          # of the activation it came from (the output's dtype)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device


def version_of(x: torch.Tensor) -> Optional[int]:
    """The version counter of x (bumped by in-place writes); None for inference tensors, which have none."""
    return None if x.is_inference() else x._version


class SharedQuant:
    """One slot per attention module (see the module docstring)."""

    def __init__(self):
        self._source: Optional[weakref.ref] = None
        self._stamp: tuple = ()
        self._rows: Optional[QuantizedRows] = None
        self.hits = 0           # reuses so far (reports and tests)

    def rows(self, source: torch.Tensor, x2d: torch.Tensor, key: tuple,
             quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> QuantizedRows:
        """The quantized rows of `x2d` (a [tokens, in] view of `source`, the tensor the layer was
        handed) for a quantizer named by `key`: the stored ones when they were made from this very
        `source` by the same quantizer, else fresh ones, which replace them."""
        stamp = (key, version_of(source), x2d.shape)
        if self._source is not None and self._source() is source and self._stamp == stamp:
            self.hits += 1
            return self._rows
        q, scale = quantize(x2d)
        self._rows = QuantizedRows(q, scale, x2d.dtype)
        self._stamp = stamp
        self._source = weakref.ref(source, self._forget)
        return self._rows

    def _forget(self, ref: weakref.ref) -> None:
        # Runs when a source tensor is freed; an older source's reference must not clear a newer entry.
        if self._source is ref:
            self._source, self._stamp, self._rows = None, (), None

    @property
    def holds(self) -> bool:
        return self._rows is not None
