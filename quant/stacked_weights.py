"""Two weights of one width as one [a; b] tensor, without a copy in memory.

Two linears that read the same input (Wan's cross-attention k and v) run as one GEMM over their
stacked weights when b's rows follow a's in one buffer: `stacked` gives that [rows_a + rows_b, K]
view, `into_one_buffer` copies two separate weights into such a buffer once (the caller then
drops the separate ones, so the pair takes no more memory than before).
"""
from __future__ import annotations

from typing import Optional

import torch


def stacked(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """[a; b] as a view when both are contiguous 2-D rows of one storage with b right after a;
    None otherwise (different buffers, devices, dtypes or widths)."""
    if (a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or a.dtype != b.dtype or a.device != b.device
            or not a.is_contiguous() or not b.is_contiguous()):
        return None
    if b.data_ptr() != a.data_ptr() + a.numel() * a.element_size():
        return None
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return None  # adjacent by chance in two allocations: one view must not span both
    return a.as_strided((a.shape[0] + b.shape[0], a.shape[1]), (a.shape[1], 1))


def into_one_buffer(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of a and b as the two halves of one new buffer (on a's device), for `stacked`."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or a.dtype != b.dtype:
        raise ValueError(f"cannot stack weights {tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}")
    # Outside inference mode, so the halves can become Parameters of the caller's modules.
    with torch.inference_mode(False), torch.no_grad():
        buf = torch.empty((a.shape[0] + b.shape[0], a.shape[1]), dtype=a.dtype, device=a.device)
        buf[:a.shape[0]].copy_(a)
        buf[a.shape[0]:].copy_(b.to(a.device))
    return buf[:a.shape[0]], buf[a.shape[0]:]
