"""Dynamic activation quantization kernels: one scale per token (row), or per 1x128 group.

Same math as quant/reference.py, bit for bit: scale = max(amax, 1e-12) / qmax and 1 / scale with
IEEE-rounded divisions (Triton's default `/` is approximate on GPUs), q = x * (1 / scale); int8
rounds half to even and both formats saturate. On the GPU the rounding is one hardware instruction
(cvt.rni / the fp8 convert); Triton's CPU interpreter lacks both, so there it is spelled out.
One program reads a row once when it fits in registers (K <= 16384 covers every DiT width),
otherwise in two passes.

`per_token_quant_gelu` quantizes rows of cat((prefix, gelu_tanh(x)), -1) straight from its two
sources, so a DiT MLP's GELU output (and Flux's concatenation) is never written; `per_token_quant_heads`
reads an attention output in SDPA's [B, H, L, D] layout, so its transposed copy is never written
(quant/deferred.py)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from triton.language.extra import libdevice

from .. import reference
from ..deferred import Deferred, DeferredActivation, DeferredHeads
from . import interpreted
from .launch import Launcher, dependent_launch_ok, next_power_of_2

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
def _round_to_bf16_grid(y):
    # Round an fp32 to the nearest bfloat16 (half to even), keeping it in fp32 (finite inputs).
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


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
                      HW_ROUND: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr):
    if LAUNCH_DEPENDENTS:  # a GEMM launched as a dependent (few_rows_gemm) may start now; it waits for our rows
        tl.extra.cuda.gdc_launch_dependents()
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


@triton.jit
def _gelu_tanh(x, HW_TANH: tl.constexpr):
    # torch's tanh-approximate GELU in fp32, in its order of operations (the CUDA kernel's opmath).
    inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    if HW_TANH:
        return 0.5 * x * (1.0 + libdevice.tanh(inner))
    # Triton's CPU interpreter has no tanh: 0.5 * (1 + tanh(u)) == sigmoid(2u)
    return x / (1.0 + tl.exp(-2.0 * inner))


@triton.jit
def _gelu_as_torch(x, dtype: tl.constexpr, HW: tl.constexpr):
    # What torch's GELU returns for an input of `dtype` (computed in fp32, rounded to dtype), in fp32.
    y = _gelu_tanh(x.to(tl.float32), HW)
    if not HW and dtype == tl.bfloat16:  # the interpreter's bf16 cast truncates
        y = _round_to_bf16_grid(y)
    return y.to(dtype).to(tl.float32)


@triton.jit
def _heads_row(x_ptr, row, TOKENS, stride_b, stride_l):
    """Where token `row` of an attention output [B, H, L, D] starts (L = TOKENS)."""
    return x_ptr + (row // TOKENS) * stride_b + (row % TOKENS) * stride_l


@triton.jit
def _head_cols(col, HEAD_DIM: tl.constexpr, stride_h):
    """Offsets of a token's columns `col` (head col // D, element col % D) from _heads_row; plain
    row offsets when HEAD_DIM is 0."""
    if HEAD_DIM == 0:
        return col
    return (col // HEAD_DIM) * stride_h + col % HEAD_DIM


@triton.jit
def _prefix_gelu_load(p_row, g_row, col, P, G, HW: tl.constexpr, P_HEAD_DIM: tl.constexpr, stride_ph):
    """Columns `col` of cat((prefix row, gelu_tanh(g row))) in fp32; 0 beyond the row."""
    in_p = col < P
    p = tl.load(p_row + _head_cols(col, P_HEAD_DIM, stride_ph), mask=in_p, other=0.0).to(tl.float32)
    g = tl.load(g_row + (col - P), mask=(col >= P) & (col < P + G), other=0.0)
    return tl.where(in_p, p, _gelu_as_torch(g, g.dtype, HW))


# Above GELU's minimum (-0.16997 at x = -0.7518) the function increases, so once the largest input's
# GELU exceeds this bound (|the minimum| rounded up to bf16 / fp16) it is the row's largest |value|.
_GELU_MIN_BOUND = 0.171875


@triton.jit
def _prefix_gelu_per_token_kernel(p_ptr, g_ptr, q_ptr, s_ptr, P, G, stride_p, stride_g, stride_q,
                                  TOKENS, stride_pb, stride_ph,
                                  QMAX: tl.constexpr, IS_INT: tl.constexpr, BLOCK: tl.constexpr,
                                  GELU_MIN_BOUND: tl.constexpr, HW_ROUND: tl.constexpr, P_HEAD_DIM: tl.constexpr):
    # A prefix with P_HEAD_DIM > 0 is an attention output [B, H, L, D] (stride_p: its token stride).
    # The GELU costs more than the memory traffic, so it is computed once per element: the row's
    # amax comes from the plain inputs (pass 1), and only the quantizing pass (2) applies it.
    row = tl.program_id(0).to(tl.int64)
    if P_HEAD_DIM == 0:
        p_row = p_ptr + row * stride_p
    else:
        p_row = _heads_row(p_ptr, row, TOKENS, stride_pb, stride_p)
    g_row = g_ptr + row * stride_g
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    p_amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, P, BLOCK):
        x = tl.load(p_row + _head_cols(start + offs, P_HEAD_DIM, stride_ph), mask=start + offs < P,
                    other=0.0).to(tl.float32)
        p_amax = tl.maximum(p_amax, tl.abs(x))
    g_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for start in range(0, G, BLOCK):
        x = tl.load(g_row + start + offs, mask=start + offs < G, other=float("-inf")).to(tl.float32)
        g_max = tl.maximum(g_max, x)
    amax = tl.max(p_amax, axis=0)
    top = _gelu_as_torch(tl.max(g_max, axis=0), g_ptr.dtype.element_ty, HW_ROUND)
    if top >= GELU_MIN_BOUND:
        amax = tl.maximum(amax, top)
    else:  # every GELU output is small: the negative side may hold the largest, look at all of them
        g_amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, G, BLOCK):
            g_amax = tl.maximum(g_amax, tl.abs(_prefix_gelu_load(p_row, g_row, P + start + offs, P, G, HW_ROUND,
                                                                       P_HEAD_DIM, stride_ph)))
        amax = tl.maximum(amax, tl.max(g_amax, axis=0))
    scale, inv = _reciprocal_scale(amax, QMAX)
    for start in range(0, P + G, BLOCK):
        x = _prefix_gelu_load(p_row, g_row, start + offs, P, G, HW_ROUND, P_HEAD_DIM, stride_ph)
        q = _to_q(x * inv, QMAX, IS_INT, HW_ROUND)
        tl.store(q_row + start + offs, q.to(q_ptr.dtype.element_ty), mask=start + offs < P + G)
    tl.store(s_ptr + row, scale)


@triton.jit
def _heads_per_token_kernel(x_ptr, q_ptr, s_ptr, TOKENS, K, stride_b, stride_h, stride_l, stride_q,
                            HEAD_DIM: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr, BLOCK: tl.constexpr,
                            HW_ROUND: tl.constexpr):
    # Row (b, l) of out.transpose(1, 2).reshape(B, L, H * D) read straight from out [B, H, L, D]:
    # column c is head c // D, element c % D (each head's D values are contiguous).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    src = _heads_row(x_ptr, row, TOKENS, stride_b, stride_l)
    x = tl.load(src + _head_cols(offs, HEAD_DIM, stride_h), mask=mask, other=0.0).to(tl.float32)
    scale, inv = _reciprocal_scale(tl.max(tl.abs(x), axis=0), QMAX)
    tl.store(q_ptr + row * stride_q + offs, _to_q(x * inv, QMAX, IS_INT, HW_ROUND).to(q_ptr.dtype.element_ty),
             mask=mask)
    tl.store(s_ptr + row, scale)


_per_token_launch = Launcher(_per_token_kernel)
_prefix_gelu_launch = Launcher(_prefix_gelu_per_token_kernel)
_per_group_launch = Launcher(_per_group_kernel)
_heads_launch = Launcher(_heads_per_token_kernel)


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D activation, got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _per_token_outputs(m: int, k: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The quantized rows [M, K] of `dtype`, their scales [M, 1] fp32, and the format's largest value."""
    qmax = reference.INT8_MAX if dtype == torch.int8 else reference.FP8_MAX
    return (torch.empty((m, k), dtype=dtype, device=device), torch.empty((m, 1), dtype=torch.float32, device=device),
            qmax)


def per_token_quant(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32) -> (q [M, K] of `dtype` (int8 or float8_e4m3fn), scale [M, 1] fp32)."""
    x = _rows(x)
    m, k = x.shape
    q, s, qmax = _per_token_outputs(m, k, dtype, x.device)
    if m == 0:
        return q, s
    is_int = dtype == torch.int8
    one_pass = k <= _ONE_PASS_MAX
    block = next_power_of_2(k) if one_pass else 4096
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    stride = x.stride(0)
    # q, s are fresh (aligned); the rest of the launch follows from the key
    key = (x.dtype, dtype, k, stride, x.data_ptr() % 16 == 0, x.get_device())
    _per_token_launch.launch_keyed(key, (m,), x, q, s, k, stride, k, QMAX=qmax, IS_INT=is_int,
                                   BLOCK=block, ONE_PASS=one_pass, HW_ROUND=not interpreted(),
                                   LAUNCH_DEPENDENTS=dependent_launch_ok(x), num_warps=warps)
    return q, s


def per_token_quant_gelu(prefix: torch.Tensor | DeferredHeads | None, x: torch.Tensor,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """per_token_quant(cat((prefix, gelu_tanh(x)), -1), dtype) (prefix may be None), bit for bit,
    without writing the GELU output or the concatenation. x [M, G], prefix [M, P], one dtype; the
    prefix may be an attention output still in its head layout (DeferredHeads), read as it lies."""
    x = _rows(x)
    if isinstance(prefix, DeferredHeads) and prefix.heads.stride(-1) != 1:  # heads the kernel cannot read
        prefix = prefix.rows().materialize()
    heads = prefix.heads if isinstance(prefix, DeferredHeads) else None
    if heads is None and prefix is not None:
        prefix = _rows(prefix)
    if prefix is not None and (math.prod(prefix.shape[:-1]) != x.shape[0] or prefix.dtype != x.dtype):
        raise ValueError(f"prefix {tuple(prefix.shape)} {prefix.dtype} does not match the GELU input "
                         f"{tuple(x.shape)} {x.dtype}")
    m, g = x.shape
    p = 0 if prefix is None else prefix.shape[-1]
    q, s, qmax = _per_token_outputs(m, p + g, dtype, x.device)
    if m == 0:
        return q, s
    first = x if prefix is None else prefix if heads is None else heads
    if heads is None:   # plain rows: one token after the other
        head_dim, tokens, stride_b, stride_h, stride_p = 0, 1, 0, 0, 0 if prefix is None else prefix.stride(0)
    else:
        head_dim, tokens = heads.shape[3], heads.shape[2]
        stride_b, stride_h, stride_p = heads.stride(0), heads.stride(1), heads.stride(2)
    key = (x.dtype, dtype, prefix is None, p, g, stride_p, x.stride(0), first.data_ptr() % 16 == 0,
           x.data_ptr() % 16 == 0, x.get_device(), head_dim, tokens, stride_b, stride_h)
    # 2048-wide steps, 8 warps: the fastest on an H100 at Flux's and Wan's widths (measured)
    _prefix_gelu_launch.launch_keyed(key, (m,), first, x, q, s, p, g, stride_p, x.stride(0), q.stride(0), tokens,
                                     stride_b, stride_h, QMAX=qmax, IS_INT=dtype == torch.int8, BLOCK=2048,
                                     GELU_MIN_BOUND=_GELU_MIN_BOUND, HW_ROUND=not interpreted(),
                                     P_HEAD_DIM=head_dim, num_warps=8)
    return q, s


def heads_fit(heads: torch.Tensor) -> bool:
    """per_token_quant_heads takes this attention output [B, H, L, D]: each head's values
    contiguous, and a row (H * D values) that one program holds in registers."""
    return heads.dim() == 4 and heads.stride(-1) == 1 and heads.shape[1] * heads.shape[3] <= _ONE_PASS_MAX


def per_token_quant_heads(heads: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """per_token_quant(heads.transpose(1, 2).reshape(B * L, H * D), dtype) bit for bit, without
    writing that transposed copy: heads [B, H, L, D] is an attention output (see heads_fit)."""
    if not heads_fit(heads):
        raise ValueError(f"attention output {tuple(heads.shape)} with strides {heads.stride()} is not "
                         "[B, H, L, D] with contiguous heads and at most 16384 values per token")
    b, h, tokens, d = heads.shape
    m, k = b * tokens, h * d
    q, s, qmax = _per_token_outputs(m, k, dtype, heads.device)
    if m == 0:
        return q, s
    block = next_power_of_2(k)
    sb, sh, sl, _ = heads.stride()
    key = (heads.dtype, dtype, tokens, k, d, sb, sh, sl, heads.data_ptr() % 16 == 0, heads.get_device())
    _heads_launch.launch_keyed(key, (m,), heads, q, s, tokens, k, sb, sh, sl, k, HEAD_DIM=d, QMAX=qmax,
                               IS_INT=dtype == torch.int8, BLOCK=block, HW_ROUND=not interpreted(),
                               num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    return q, s


def per_token_quant_deferred(x: Deferred, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """per_token_quant(x.rows().materialize(), dtype), reading the activation's own sources: a GELU
    (and concatenation) applied in the same pass, an attention output read in its head layout."""
    if isinstance(x, DeferredActivation):
        return per_token_quant_gelu(x.prefix, x.source, dtype)
    if heads_fit(x.heads):
        return per_token_quant_heads(x.heads, dtype)
    return per_token_quant(x.rows().materialize(), dtype)


def per_group_fp8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8_e4m3fn, scale [M, ceil(K/128)] fp32, stored K-group-major)."""
    x = _rows(x)
    m, k = x.shape
    groups = triton.cdiv(k, _GROUP)
    q = torch.empty((m, k), dtype=reference.FP8_DTYPE, device=x.device)
    s_t = torch.empty((groups, m), dtype=torch.float32, device=x.device)
    if m:
        per_prog = min(8, next_power_of_2(groups))
        _per_group_launch((m, triton.cdiv(groups, per_prog)), x, q, s_t, m, k, x.stride(0), q.stride(0),
                          QMAX=reference.FP8_MAX, GROUP=_GROUP, GROUPS_PER_PROG=per_prog,
                          HW_ROUND=not interpreted(), num_warps=4)
    return q, s_t.t()
