"""Weights of one width as one stacked [a; b; ...] tensor, without a copy in memory.

Sibling linears that read the same input (Wan's cross-attention k and v, Qwen-Image's q, k and v)
run as one GEMM over their stacked weights when each one's rows follow the previous one's in one
buffer: `stacked` gives that [sum of rows, K] view, `into_one_buffer` copies separate weights into
such a buffer once (the caller then drops the separate ones, so the group takes no more memory
than before).
"""
from __future__ import annotations

from typing import Optional

import torch


def stacked(*parts: torch.Tensor) -> Optional[torch.Tensor]:
    """The parts stacked as one view when all are contiguous 2-D rows of one storage, each right
    after the one before; None otherwise (different buffers, devices, dtypes or widths)."""
    first = parts[0]
    if len(parts) < 2 or any(p.dim() != 2 or p.shape[1] != first.shape[1] or p.dtype != first.dtype
                             or p.device != first.device or not p.is_contiguous() for p in parts):
        return None
    for before, after in zip(parts, parts[1:]):
        if after.data_ptr() != before.data_ptr() + before.numel() * before.element_size():
            return None
    storage = first.untyped_storage().data_ptr()
    if any(p.untyped_storage().data_ptr() != storage for p in parts[1:]):
        return None  # adjacent by chance in separate allocations: one view must not span them
    return first.as_strided((sum(p.shape[0] for p in parts), first.shape[1]), (first.shape[1], 1))


def into_one_buffer(*parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Copies of the parts as consecutive slices of one new buffer (on the first's device), for
    `stacked`."""
    first = parts[0]
    if any(p.dim() != 2 or p.shape[1] != first.shape[1] or p.dtype != first.dtype for p in parts):
        raise ValueError("cannot stack weights " + ", ".join(f"{tuple(p.shape)} {p.dtype}" for p in parts))
    # Outside inference mode, so the slices can become Parameters of the caller's modules.
    with torch.inference_mode(False), torch.no_grad():
        buf = torch.empty((sum(p.shape[0] for p in parts), first.shape[1]), dtype=first.dtype, device=first.device)
        out, row = [], 0
        for p in parts:
            piece = buf[row:row + p.shape[0]]
            piece.copy_(p.to(first.device))
            out.append(piece)
            row += p.shape[0]
    return tuple(out)
