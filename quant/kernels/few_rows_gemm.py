"""W8A8 GEMM for a few tokens on Hopper: modulation and time-embedding layers, one row per sample.

At up to FEW_ROWS tokens the GEMM does little but stream the weight once from memory. The kernel
computes y^T = W x^T: the weight's rows take the 64-row side of the tensor-core MMA and the tokens
its 16-wide side, where the usual orientation pads 1-16 tokens to 64 MMA rows and moves that
padding through shared memory at every K step. One program per 64 weight rows.

It is a programmatic dependent launch: its programs start while the activation quant still runs
(triton_quant lets them) and wait for the quantized rows with griddepcontrol.wait, so the gap
between the two kernels is hidden. On an H100 (graph timing, bench/bench_gemm.py) this took Flux's
3072x18432 modulation at one token from 25.8-27.3 us to 23.8 us (bf16 41.7 us)."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreted
from .launch import Launcher, dependent_launch_ok, descriptor, sm_count, tma_descriptor

FEW_ROWS = 16                     # tokens: the MMA's narrow side
BLOCK_N, BLOCK_K, WARPS = 64, 128, 4  # best of 16/32/64/128 weight rows and 2/4 warps on the H100
# K steps in flight: 4 where each SM runs two or more programs, whose loads overlap; 6 where the
# weight has fewer than two 64-row slabs per SM (Flux's 3072x9216 single-block modulation, 144 slabs
# on an H100's 132 SMs: 14.7 -> 13.9 us int8, 14.4 -> 13.6 us fp8; at 18432 rows 6 is no faster).
STAGES, FEW_PROGRAMS_STAGES = 4, 6
USE_KERNEL = os.environ.get("QUANTDIT_FEW_ROWS_KERNEL", "1") != "0"  # 0: the general GEMM (benchmarks)


@triton.jit
def _few_rows_kernel(w_desc, x_desc, y_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, stride_y,
                     HAS_BIAS: tl.constexpr, IS_INT: tl.constexpr, WAIT_FOR_PRODUCER: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    if WAIT_FOR_PRODUCER:  # launched early, as a dependent of the quant kernel: its rows must be written
        tl.extra.cuda.gdc_wait()
    off_n = tl.program_id(0) * BLOCK_N
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.int32 if IS_INT else tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        w = w_desc.load([off_n, k * BLOCK_K])   # beyond N or K the TMA unit reads zeros
        x = x_desc.load([0, k * BLOCK_K])       # tokens beyond M too
        acc = tl.dot(w, x.T, acc, out_dtype=tl.int32 if IS_INT else tl.float32)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    # token scale first, then channel scale: the other GEMMs' order, so int8 results are bit-equal
    out = acc.to(tl.float32) * tl.load(as_ptr + offs_t, mask=offs_t < M, other=0.0)[None, :]
    out = out * tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    mask = (offs_n[:, None] < N) & (offs_t[None, :] < M)
    tl.store(y_ptr + offs_t[None, :] * stride_y + offs_n[:, None], out.to(y_ptr.dtype.element_ty), mask=mask)


_launch = Launcher(_few_rows_kernel)


def stages(n: int, sms: int) -> int:
    """K steps in flight for a weight of n rows on a GPU of `sms` SMs (see STAGES)."""
    return FEW_PROGRAMS_STAGES if triton.cdiv(n, BLOCK_N) < 2 * sms else STAGES


def applies(m: int) -> bool:
    return USE_KERNEL and m <= FEW_ROWS


def gemm(xq: torch.Tensor, a_s: torch.Tensor, wq: torch.Tensor, b_s: torch.Tensor,
         bias: Optional[torch.Tensor], y: torch.Tensor) -> None:
    """y [M, N] = dequantized xq [M, K] @ wq [N, K]^T (+ bias), M <= FEW_ROWS. Operands as
    triton_gemm.hopper_ready accepts them; a_s [M], b_s [N] contiguous fp32; bias None or contiguous."""
    m, k = xq.shape
    n = wq.shape[0]
    dependent = dependent_launch_ok(xq)
    # Everything the launch is specialized on: xq, wq, a_s are fresh or checked (hopper_ready), and
    # the descriptors' blocks are fixed; the launch options follow from n and the device.
    key = (m, n, k, xq.get_device(), xq.dtype, xq.stride(0), wq.stride(0), y.dtype, y.stride(0),
           a_s.data_ptr() % 16 == 0, b_s.data_ptr() % 16 == 0,
           None if bias is None else (bias.dtype, bias.data_ptr() % 16 == 0), dependent)
    options = dict(launch_pdl=True) if dependent else {}
    if not interpreted():
        options.update(num_warps=WARPS, num_stages=stages(n, sm_count(xq.get_device())))
    _launch.launch_keyed(key, (triton.cdiv(n, BLOCK_N),), descriptor(tma_descriptor, wq, (BLOCK_N, BLOCK_K)),
                         descriptor(tma_descriptor, xq, (FEW_ROWS, BLOCK_K)), y, a_s, b_s,
                         y if bias is None else bias, m, n, k, y.stride(0), HAS_BIAS=bias is not None,
                         IS_INT=xq.dtype == torch.int8, WAIT_FOR_PRODUCER=dependent, BLOCK_N=BLOCK_N,
                         BLOCK_T=FEW_ROWS, BLOCK_K=BLOCK_K, **options)
