"""int4 g128 weight-only: unpack + scale the packed weight into a bf16/fp16 tile in one pass.

At DiT token counts the GEMM that follows (cuBLAS) costs ~100x more than this pass, so
dequantize-then-GEMM runs at bf16 speed while the weight lives in memory at ~0.27x of bf16."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .launch import Launcher


@triton.jit
def _dequant_int4_kernel(p_ptr, s_ptr, w_ptr, N, K, KP, stride_p, stride_s, stride_w,
                         BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, GROUP: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kp = tl.program_id(1) * BLOCK_KP + tl.arange(0, BLOCK_KP)
    rows = offs_n.to(tl.int64)[:, None]
    packed = tl.load(p_ptr + rows * stride_p + offs_kp[None, :],
                     mask=(offs_n[:, None] < N) & (offs_kp[None, :] < KP), other=0).to(tl.int32)
    # Even column in the low nibble (quant/reference.pack_int4); join + reshape interleaves them back.
    vals = tl.join(packed & 0xF, (packed >> 4) & 0xF).reshape(BLOCK_N, 2 * BLOCK_KP)
    vals = tl.where(vals >= 8, vals - 16, vals).to(tl.float32)
    offs_k = tl.program_id(1) * 2 * BLOCK_KP + tl.arange(0, 2 * BLOCK_KP)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    scale = tl.load(s_ptr + rows * stride_s + (offs_k // GROUP)[None, :], mask=mask, other=0.0)
    tl.store(w_ptr + rows * stride_w + offs_k[None, :], (vals * scale).to(w_ptr.dtype.element_ty), mask=mask)


_dequant_launch = Launcher(_dequant_int4_kernel)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 [N, ceil(K/2)], scale [N, ceil(K/128)] -> weight [N, K] of `dtype`."""
    n, kp = packed.shape
    if kp != triton.cdiv(in_features, 2) or scale.shape != (n, triton.cdiv(in_features, reference.GROUP)):
        raise ValueError(f"int4 weight {tuple(packed.shape)} with scale {tuple(scale.shape)} does not have "
                         f"{in_features} input features")
    packed = packed.contiguous()
    scale = scale.float().contiguous()
    w = torch.empty((n, in_features), dtype=dtype, device=packed.device)
    block_n, block_kp = 32, 64
    _dequant_launch((triton.cdiv(n, block_n), triton.cdiv(kp, block_kp)),
                    packed, scale, w, n, in_features, kp, packed.stride(0), scale.stride(0), w.stride(0),
                    BLOCK_N=block_n, BLOCK_KP=block_kp, GROUP=reference.GROUP, num_warps=4)
    return w
