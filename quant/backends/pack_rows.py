"""Inputs a foreign provider's quant op should not quantize itself.

Rows a sibling layer already quantized (`QuantizedRows`) are used as they are. A deferred input
(a GELU, or an attention output's transposed copy, not yet made) goes to the pack's Triton
quantizer, which reads its sources in one pass; the provider's op would need it written first.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..deferred import Deferred
from ..kernels import triton_missing
from ..shared_quant import QuantizedRows


@functools.lru_cache(maxsize=1)
def triton_quant():
    """The pack's Triton quant kernels, or None where Triton does not import."""
    if triton_missing() is not None:
        return None
    from ..kernels import triton_quant as module
    return module


def quantized_by_pack(x2d, dtype: torch.dtype) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(q [tokens, in], scale [tokens, 1] fp32) where the pack has or makes them, else None."""
    if isinstance(x2d, QuantizedRows):
        return x2d.q, x2d.scale
    if isinstance(x2d, Deferred) and triton_quant() is not None:
        return triton_quant().per_token_quant_deferred(x2d, dtype)
    return None


def written(x2d) -> torch.Tensor:
    """The input as a plain contiguous tensor, for a provider's own quant op."""
    if isinstance(x2d, Deferred):
        x2d = x2d.materialize()
    return x2d.contiguous()
