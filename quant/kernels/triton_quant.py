"""Dynamic activation quantization kernels: one scale per token (row), or per 1x128 group.

Same math as quant/reference.py, bit for bit: scale = max(amax, 1e-12) / qmax and 1 / scale with
IEEE-rounded divisions (Triton's default `/` is approximate on GPUs), q = x * (1 / scale); int8
rounds half to even and both formats saturate. On the GPU the rounding is one hardware instruction
(cvt.rni / the fp8 convert); Triton's CPU interpreter lacks both, so there it is spelled out.
One program reads a row once when it fits in registers (K <= 16384 covers every DiT width),
otherwise in two passes."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton.language.extra import libdevice

from .. import reference
from . import interpreted
from .launch import Launcher

_ONE_PASS_MAX = 16384
_GROUP = reference.GROUP


@triton.jit
def _round_half_even(y):
    # libdevice.rint has no CPU interpreter version; this is exact for |y| < 2**22.
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0
    return tl.where(((r - y) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _round_to_e4m3_grid(y):
    # Round to the nearest float8_e4m3fn value (half to even) while still in fp32, so the final
    # cast is exact. The hardware cast would round the same way; Triton's CPU interpreter does not.
    exp = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp_exp = tl.maximum(exp, -6) - 3          # 3 mantissa bits; below 2**-6 the spacing is 2**-9
    ulp = ((ulp_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - ulp_exp) << 23).to(tl.float32, bitcast=True)  # powers of two: exact products
    return _round_half_even(y * inv_ulp) * ulp


@triton.jit
def _to_q(y, QMAX: tl.constexpr, IS_INT: tl.constexpr, HW_ROUND: tl.constexpr):
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if HW_ROUND:
        if IS_INT:
            return libdevice.rint(y)
        return y                                 # the fp8 convert rounds to nearest even itself
    if IS_INT:
        return _round_half_even(y)
    return _round_to_e4m3_grid(y)


@triton.jit
def _reciprocal_scale(amax, QMAX: tl.constexpr):
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), QMAX)
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def _per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                      QMAX: tl.constexpr, IS_INT: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                      HW_ROUND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        scale, inv = _reciprocal_scale(tl.max(tl.abs(x), axis=0), QMAX)
        tl.store(q_row + offs, _to_q(x * inv, QMAX, IS_INT, HW_ROUND).to(q_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            mask = start + offs < K
            x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale, inv = _reciprocal_scale(tl.max(amax, axis=0), QMAX)
        for start in range(0, K, BLOCK):
            mask = start + offs < K
            x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
            q = _to_q(x * inv, QMAX, IS_INT, HW_ROUND)
            tl.store(q_row + start + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _per_group_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q,
                      QMAX: tl.constexpr, GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr,
                      HW_ROUND: tl.constexpr):
    # Scales are written K-group-major ([K/128, M] memory, returned as an [M, K/128] view): the
    # block GEMM then reads the scales of BLOCK_M consecutive tokens in one coalesced load.
    row = tl.program_id(0).to(tl.int64)
    g0 = tl.program_id(1) * GROUPS_PER_PROG
    g = g0 + tl.arange(0, GROUPS_PER_PROG)
    col = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = col < K
    x = tl.load(x_ptr + row * stride_x + col, mask=mask, other=0.0).to(tl.float32)
    scale, inv = _reciprocal_scale(tl.max(tl.abs(x), axis=1), QMAX)
    q = _to_q(x * inv[:, None], QMAX, False, HW_ROUND)
    tl.store(q_ptr + row * stride_q + col, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + g.to(tl.int64) * M + row, scale, mask=g * GROUP < K)


_per_token_launch = Launcher(_per_token_kernel)
_per_group_launch = Launcher(_per_group_kernel)


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D activation, got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def per_token_quant(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32) -> (q [M, K] of `dtype` (int8 or float8_e4m3fn), scale [M, 1] fp32)."""
    x = _rows(x)
    m, k = x.shape
    is_int = dtype == torch.int8
    qmax = reference.INT8_MAX if is_int else reference.FP8_MAX
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    one_pass = k <= _ONE_PASS_MAX
    block = triton.next_power_of_2(k) if one_pass else 4096
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _per_token_launch((m,), x, q, s, k, x.stride(0), q.stride(0), QMAX=qmax, IS_INT=is_int, BLOCK=block,
                      ONE_PASS=one_pass, HW_ROUND=not interpreted(), num_warps=warps)
    return q, s


def per_group_fp8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8_e4m3fn, scale [M, ceil(K/128)] fp32, stored K-group-major)."""
    x = _rows(x)
    m, k = x.shape
    groups = triton.cdiv(k, _GROUP)
    q = torch.empty((m, k), dtype=reference.FP8_DTYPE, device=x.device)
    s_t = torch.empty((groups, m), dtype=torch.float32, device=x.device)
    if m:
        per_prog = min(8, triton.next_power_of_2(groups))
        _per_group_launch((m, triton.cdiv(groups, per_prog)), x, q, s_t, m, k, x.stride(0), q.stride(0),
                          QMAX=reference.FP8_MAX, GROUP=_GROUP, GROUPS_PER_PROG=per_prog,
                          HW_ROUND=not interpreted(), num_warps=4)
    return q, s_t.t()
