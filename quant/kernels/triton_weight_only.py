"""Weight-only GEMM for 8-bit weights: y[M, N] = x[M, K] @ (w_q[N, K] * scale)^T, bias, in x's dtype.

The int8 / fp8 (e4m3 or e5m2) weight tile is widened to bf16/fp16 in registers, so the weight is
read at one byte per element and no full-precision copy of it is ever written (the upcast path
writes and re-reads a bf16 weight per call: 5 bytes of traffic per weight instead of 1).
The kernel computes y^T = w x^T: the widened weight is the MMA's first operand, which Hopper takes
straight from registers, and the token count becomes the narrow side of the tile (16 rows and up),
which suits the few-row layers weight-only schemes run on (modulation, context k/v, text streams).
The scale (one per output channel, or one per tensor) and the bias are applied in the epilogue.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreted
from .launch import Launcher, next_power_of_2
from .triton_gemm import _load_k_step, _m_bucket, bias_arg, f32_vector


def _configs():
    out = []
    # (BLOCK_N weight rows, BLOCK_M tokens, BLOCK_K, warps, stages)
    for bn, bm, bk, warps, stages in ((64, 16, 256, 4, 4), (32, 16, 256, 4, 4), (128, 16, 128, 4, 4),
                                      (64, 32, 256, 4, 4), (128, 32, 128, 4, 4), (128, 64, 128, 4, 4),
                                      (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (256, 64, 64, 8, 4),
                                      (256, 128, 64, 8, 3)):
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return out


def _fitting(configs, named_args, **kwargs):
    # Token tiles wider than the token count only waste MMA work.
    rows = max(16, named_args["M_BUCKET"])
    return [c for c in configs if c.kwargs["BLOCK_M"] <= rows] or configs[:1]


@triton.jit
def _scale_bias_store(acc, y_ptr, ws_ptr, bias_ptr, offs_n, offs_m, M, N, stride_y,
                      HAS_BIAS: tl.constexpr, PER_TENSOR: tl.constexpr):
    # acc is y^T ([out channels, tokens]): scale per channel (or one scale), add the bias, store y.
    if PER_TENSOR:
        acc = acc * tl.load(ws_ptr)
    else:
        acc = acc * tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_y + offs_n[:, None],
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_only_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, bias_ptr, M, N, K, M_BUCKET,
                        stride_x, stride_w, stride_y,
                        HAS_BIAS: tl.constexpr, PER_TENSOR: tl.constexpr, EVEN_K: tl.constexpr,
                        WIDEN_TO_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # Token tiles vary fastest: neighbouring programs read the same weight tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    offs_n = (pid // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (pid % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows wrap around instead of being masked: their results are never stored.
    w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_w + offs_k[None, :]
    x_ptrs = x_ptr + (offs_m % M).to(tl.int64)[None, :] * stride_x + offs_k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        w, xt = _load_k_step(w_ptrs, x_ptrs, offs_k, k, K, BLOCK_K, EVEN_K)
        if WIDEN_TO_F32:  # Triton's CPU interpreter gets bf16 dots wrong (3.8); fp32 is exact there
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    _scale_bias_store(acc, y_ptr, ws_ptr, bias_ptr, offs_n, offs_m, M, N, stride_y, HAS_BIAS, PER_TENSOR)


def _gemv_configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
            for bn, bk, warps, stages in ((16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3), (64, 256, 8, 3),
                                          (16, 1024, 8, 2), (8, 1024, 4, 3))]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, bias_ptr, M, N, K, stride_x, stride_w, stride_y,
                 HAS_BIAS: tl.constexpr, PER_TENSOR: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A handful of tokens (modulation sees one per sample): no MMA, the weight is streamed once and
    # every token's dot products are reduced on the CUDA cores; the weight read bounds the time.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_w + offs_k[None, :]
    x_ptrs = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_x + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        left = K - k * BLOCK_K
        w = tl.load(w_ptrs, mask=offs_k[None, :] < left, other=0.0).to(tl.float32)
        x = tl.load(x_ptrs, mask=offs_k[None, :] < left, other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None, :] * x[None, :, :], axis=2)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    _scale_bias_store(acc, y_ptr, ws_ptr, bias_ptr, offs_n, offs_m, M, N, stride_y, HAS_BIAS, PER_TENSOR)


_gemv_launch = Launcher(triton.autotune(configs=_gemv_configs(), key=["N", "K", "ROWS", "PER_TENSOR"])(_gemv_kernel))
GEMV_MAX_ROWS = 4


_launch = Launcher(triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "PER_TENSOR"],
                                   prune_configs_by={"early_config_prune": _fitting})(_weight_only_kernel))
_INTERPRETER_TILE = {"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_K": 128}


def weight_only_gemm(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] bf16/fp16; wq [N, K] int8 / float8_e4m3fn / float8_e5m2; w_scale [N, 1] or one value."""
    if x.dim() != 2 or wq.dim() != 2 or x.shape[1] != wq.shape[1]:
        raise ValueError(f"GEMM shapes do not match: x {tuple(x.shape)}, w {tuple(wq.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the weight-only kernel takes bf16/fp16 activations, not {x.dtype}")
    x = x if x.stride(1) == 1 else x.contiguous()
    wq = wq if wq.stride(1) == 1 else wq.contiguous()
    m, k = x.shape
    n = wq.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    scale = f32_vector(w_scale)
    per_tensor = scale.numel() == 1
    if not per_tensor and scale.numel() != n:
        raise ValueError(f"weight scale has {scale.numel()} values for {n} output channels")
    bias_ptr = bias_arg(bias, y)
    if m <= GEMV_MAX_ROWS:
        args = (x, wq, y, scale, bias_ptr, m, n, k, x.stride(0), wq.stride(0), y.stride(0))
        meta = dict(HAS_BIAS=bias is not None, PER_TENSOR=per_tensor, ROWS=next_power_of_2(m))
        if interpreted():
            _gemv_kernel[(triton.cdiv(n, 16),)](*args, **meta, BLOCK_N=16, BLOCK_K=128)
        else:
            _gemv_launch(lambda cfg: (triton.cdiv(n, cfg["BLOCK_N"]),), *args, **meta)
        return y
    args = (x, wq, y, scale, bias_ptr, m, n, k, _m_bucket(m), x.stride(0), wq.stride(0), y.stride(0))
    meta = dict(HAS_BIAS=bias is not None, PER_TENSOR=per_tensor, WIDEN_TO_F32=interpreted())
    if interpreted():
        t = _INTERPRETER_TILE
        grid = (triton.cdiv(m, t["BLOCK_M"]) * triton.cdiv(n, t["BLOCK_N"]),)
        _weight_only_kernel[grid](*args, **meta, EVEN_K=k % t["BLOCK_K"] == 0, **t)
    else:
        grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)  # noqa: E731
        _launch(grid, *args, **meta, EVEN_K=k % 256 == 0)
    return y
