"""Scaled GEMMs for quantized linears: y[M, N] = x_q[M, K] @ w_q[N, K]^T, dequantized in the epilogue.

- `w8a8_gemm`: int8 or fp8 operands, one scale per token x one scale per output channel, bias,
  cast to the output dtype, all in the epilogue (torch._int_mm + a separate dequant writes and
  re-reads an int32 [M, N] tensor and ends slower than bf16).
- `block_fp8_gemm`: fp8 with 1x128 activation groups and 128x128 weight blocks (the DeepGEMM
  recipe): the partial product of each 128-wide K step is scaled before it is accumulated.
Tile sizes are autotuned per (M bucket, N, K) on the GPU; the CPU interpreter uses one small tile.
int8 on Hopper runs gluon_gemm.py's kernel instead: Triton keeps int8 MMAs synchronous (see there);
up to 16 tokens both formats run few_rows_gemm.py's kernel on Hopper.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import few_rows_gemm, gluon_gemm, interpreted, launch
from .launch import TENSOR_DESCRIPTOR, Launcher, tma_descriptor

log = logging.getLogger("quantdit")


def _configs():
    out = []
    for bm, bn, warps, stages in ((128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4),
                                  (64, 128, 4, 4), (64, 64, 4, 5)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8},
                                 num_warps=warps, num_stages=stages))
    return out


def _block_configs():
    # The block recipe needs BLOCK_K == 128 and BLOCK_N dividing 128 (one weight scale per tile column).
    out = []
    for bm, bn, warps, stages in ((128, 128, 8, 4), (128, 128, 4, 4), (64, 128, 4, 4), (128, 64, 4, 4)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8},
                                 num_warps=warps, num_stages=stages))
    return out


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row tiles share the weight tiles they read while those sit in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _epilogue(acc, y_ptr, bias_ptr, offs_m, offs_n, M, N, stride_y, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_y + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_rows_cols(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns wrap around instead of being masked: their results are never stored.
    return offs_m, offs_n, (offs_m % M).to(tl.int64), (offs_n % N).to(tl.int64)


@triton.jit
def _load_k_step(a_ptrs, b_ptrs, offs_k, k, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < left, other=0.0)
    return a, b


@triton.jit
def _w8a8_kernel(a_ptr, b_ptr, y_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, M_BUCKET,
                 stride_a, stride_b, stride_y,
                 HAS_BIAS: tl.constexpr, IS_INT: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n, rows, cols = _tile_rows_cols(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + cols[None, :] * stride_b + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a, b = _load_k_step(a_ptrs, b_ptrs, offs_k, k, K, BLOCK_K, EVEN_K)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32 if IS_INT else tl.float32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    a_s = tl.load(as_ptr + rows)
    b_s = tl.load(bs_ptr + cols)
    out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    _epilogue(out, y_ptr, bias_ptr, offs_m, offs_n, M, N, stride_y, HAS_BIAS)


@triton.jit
def _block_fp8_kernel(a_ptr, b_ptr, y_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, M_BUCKET,
                      stride_a, stride_b, stride_y, stride_as_k, stride_bs_n,
                      HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n, rows, cols = _tile_rows_cols(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + cols[None, :] * stride_b + offs_k[:, None]
    as_ptrs = as_ptr + rows                      # scale[k_group, token], K-group-major
    bs_ptrs = bs_ptr + (cols // 128) * stride_bs_n  # scale[n_block, k_block]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a, b = _load_k_step(a_ptrs, b_ptrs, offs_k, k, K, BLOCK_K, EVEN_K)
        a_s = tl.load(as_ptrs + k * stride_as_k)
        b_s = tl.load(bs_ptrs + k)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _epilogue(acc, y_ptr, bias_ptr, offs_m, offs_n, M, N, stride_y, HAS_BIAS)


@triton.jit
def _w8a8_tma_kernel(a_desc, b_desc, y_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, M_BUCKET, stride_y,
                     HAS_BIAS: tl.constexpr, IS_INT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Hopper: the tensor-memory accelerator fetches the tiles (out-of-range parts read as zero).
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, k * BLOCK_K])
        b = b_desc.load([off_n, k * BLOCK_K])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32 if IS_INT else tl.float32)  # see _w8a8_persistent_kernel
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    a_s = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
    b_s = tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    _epilogue(out, y_ptr, bias_ptr, offs_m, offs_n, M, N, stride_y, HAS_BIAS)


@triton.jit
def _w8a8_persistent_kernel(a_desc, b_desc, y_desc, as_ptr, bs_ptr, bias_ptr, M, N, K, M_BUCKET,
                            HAS_BIAS: tl.constexpr, IS_INT: tl.constexpr, NUM_SMS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, SPLIT_EPILOGUE: tl.constexpr):
    # Hopper, persistent: one program per SM walks the output tiles, so the loads of the next tile
    # overlap the epilogue of this one (the flattened loop is pipelined across tile boundaries).
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * tiles_n
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=True):
        first_m = (tile // per_group) * GROUP_M
        size_m = min(tiles_m - first_m, GROUP_M)
        off_m = (first_m + (tile % per_group) % size_m) * BLOCK_M
        off_n = ((tile % per_group) // size_m) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
        for k in range(k_steps):
            a = a_desc.load([off_m, k * BLOCK_K])
            b = b_desc.load([off_n, k * BLOCK_K])
            # fp8 on Hopper: the MMA accumulates with a shortened mantissa ("fast accumulation", the
            # default of vLLM's CUTLASS fp8 kernels too). Measured on Wan/Flux shapes it moves the
            # output's error against bf16 by under 0.5% of the fp8 quantization error itself, while
            # promoting partial sums to fp32 every K step costs 20-30% of the speed in Triton.
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32 if IS_INT else tl.float32)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        out = acc.to(tl.float32) * tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
        out = out * tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out = out.to(y_desc.dtype)
        if SPLIT_EPILOGUE:  # two half-width stores: half the shared memory for the output tile
            left, right = tl.split(tl.permute(tl.reshape(out, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            y_desc.store([off_m, off_n], left)
            y_desc.store([off_m, off_n + BLOCK_N // 2], right)
        else:
            y_desc.store([off_m, off_n], out)


USE_TMA = os.environ.get("QUANTDIT_TRITON_TMA", "1") != "0"  # escape hatch, and for benchmarks
PERSISTENT = os.environ.get("QUANTDIT_TRITON_PERSISTENT", "1") != "0"
# int8 on Hopper runs the Gluon kernel (gluon_gemm.py) unless this is off or it failed to build once.
USE_GLUON = os.environ.get("QUANTDIT_GLUON", "1") != "0"
gluon_failure: Optional[str] = gluon_gemm.available()
INTERPRET_TMA = False  # tests set it to run the Hopper (TMA) kernels in Triton's CPU interpreter


# ROCm builds of torch report AMD GPUs as CUDA devices, with capabilities such as (9, 4) (MI300):
# the Hopper kernels (TMA, wgmma, Gluon's NVIDIA dialect) must not be chosen there.
ROCM = torch.version.hip is not None


def _y_desc_ok(y: torch.Tensor) -> bool:
    return y.stride(0) * y.element_size() % 16 == 0 and y.data_ptr() % 16 == 0


def _set_tma_blocks(nargs):
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _tma_configs():
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_tma_blocks)
            for c in _configs()]


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def hopper_ready(xq: torch.Tensor, wq: torch.Tensor) -> bool:
    """The Hopper kernels (TMA, persistent) can take these operands."""
    if TENSOR_DESCRIPTOR is None:
        return False
    # Device TMA: Hopper or newer, row pitches 16-byte aligned.
    if interpreted():
        if not (USE_TMA and INTERPRET_TMA):
            return False
    elif not USE_TMA or not xq.is_cuda or ROCM or _capability(_index(xq)) < (9, 0):
        return False
    return xq.stride(0) % 16 == 0 and wq.stride(0) % 16 == 0 and xq.data_ptr() % 16 == 0 and wq.data_ptr() % 16 == 0


def persistent_hopper_gemm_on(is_int: bool) -> bool:
    """The persistent Hopper W8A8 GEMM that w8a8_gemm runs on sm_90 operands passing hopper_ready
    (Gluon for int8, Triton's TMA kernel for fp8) is switched on and builds with this Triton."""
    return (TENSOR_DESCRIPTOR is not None and USE_TMA and PERSISTENT and not ROCM
            and (not is_int or (USE_GLUON and gluon_failure is None)))


def _index(t: torch.Tensor) -> int:
    return t.get_device()  # a CUDA tensor's device index, without building a torch.device


def _set_persistent_blocks(nargs):
    _set_tma_blocks(nargs)
    split = 2 if nargs["SPLIT_EPILOGUE"] else 1
    nargs["y_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"] // split]


def _persistent_configs():
    out = []
    for bm, bn, warps, stages, split in ((128, 256, 8, 3, True), (128, 256, 8, 4, True), (256, 128, 8, 3, True),
                                         (128, 128, 8, 4, False), (128, 128, 4, 4, False), (128, 128, 4, 5, False),
                                         (64, 128, 4, 5, False)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_EPILOGUE": split},
                                 num_warps=warps, num_stages=stages, pre_hook=_set_persistent_blocks))
    return out


_w8a8_tma_launch = Launcher(triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "N", "K", "IS_INT"])(
    _w8a8_tma_kernel))
_w8a8_persistent_launch = Launcher(triton.autotune(configs=_persistent_configs(), key=["M_BUCKET", "N", "K", "IS_INT"])(
    _w8a8_persistent_kernel))
_w8a8_launch = Launcher(triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "IS_INT"])(_w8a8_kernel))
_block_launch = Launcher(triton.autotune(configs=_block_configs(), key=["M_BUCKET", "N", "K"])(_block_fp8_kernel))
_INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 4}


def _m_bucket(m: int) -> int:
    # Autotune once per power-of-two token count, not for every prompt length.
    return min(launch.next_power_of_2(max(m, 16)), 1 << 16)


def _prepare(xq, wq, out_dtype):
    """Checked shapes (m, k, n) and the empty [m, n] output."""
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"GEMM shapes do not match: x {tuple(xq.shape)}, w {tuple(wq.shape)}")
    if xq.stride(1) != 1 or wq.stride(1) != 1:
        raise ValueError("GEMM operands must be row-major with contiguous rows")
    m, k = xq.shape
    n = wq.shape[0]
    return m, k, n, torch.empty((m, n), dtype=out_dtype, device=xq.device)


def f32_vector(t: torch.Tensor) -> torch.Tensor:
    """A scale as contiguous float32 (the kernels index it flat); no op when it already is."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def bias_arg(bias: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """The bias pointer argument: the bias as a contiguous vector, or any tensor (`y`) when there
    is none (HAS_BIAS=False keeps the kernel from reading it)."""
    return y if bias is None else bias if bias.is_contiguous() else bias.contiguous()


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _launch(launcher, plain, m, n, *args, **meta):
    if interpreted():
        plain[_grid(m, n)](*args, **meta, **_INTERPRETER_TILE)
    else:
        launcher(_grid(m, n), *args, **meta)


def _operand_descriptors(xq, wq, block_m: int, block_n: int):
    return tma_descriptor(xq, (block_m, 128)), tma_descriptor(wq, (block_n, 128))


def _descriptors(xq, wq, y, block_m: int, block_n: int, y_block_n: int):
    return (*_operand_descriptors(xq, wq, block_m, block_n), tma_descriptor(y, (block_m, y_block_n)))


# (shapes, strides, dtypes, alignments, device) -> (compiled kernel, its config, grid): what the Launcher
# chose for such a persistent GEMM, relaunched with no autotuner bookkeeping, generic key or pre-hook
# (tens of microseconds of host time on each of a DiT step's hundreds of linears; gluon_gemm does the same).
_persistent_chosen: dict[tuple, tuple] = {}


def _persistent_key(xq, wq, y, a_s, b_s, bias, is_int) -> tuple:
    # Everything the Launcher's key holds for these arguments, read cheaply: a_s, b_s are contiguous
    # fp32 (f32_vector) and the TMA path has checked the operands' and y's alignment.
    m, k = xq.shape
    return (m, wq.shape[0], k, xq.get_device(), xq.dtype, wq.dtype, xq.stride(0), wq.stride(0), y.stride(0), y.dtype,
            None if bias is None else (bias.dtype, bias.data_ptr() % 16 == 0),
            a_s.data_ptr() % 16 == 0, b_s.data_ptr() % 16 == 0, is_int)


def _persistent(xq, wq, y, a_s, b_s, bias, is_int: bool):
    """The persistent TMA kernel into y (bias: None or contiguous)."""
    m, k = xq.shape
    n = wq.shape[0]
    bias_ptr = y if bias is None else bias
    if interpreted():  # the CPU interpreter: a few "SMs" and one small tile, so tiles wrap around
        sms, tile = 3, dict(_INTERPRETER_TILE, SPLIT_EPILOGUE=True)
        _w8a8_persistent_kernel[(sms,)](*_descriptors(xq, wq, y, 32, 32, 16), a_s, b_s, bias_ptr, m, n, k,
                                        _m_bucket(m), HAS_BIAS=bias is not None, IS_INT=is_int, NUM_SMS=sms, **tile)
        return
    key = _persistent_key(xq, wq, y, a_s, b_s, bias, is_int)
    hit = launch.relaunch(_persistent_chosen, key)
    if hit is not None:
        kernel, cfg, grid, sms = hit
        bm, bn, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_EPILOGUE"]
        bk = cfg["BLOCK_K"]
        launch.run_compiled(kernel, grid, (
            launch.descriptor(tma_descriptor, xq, (bm, bk)), launch.descriptor(tma_descriptor, wq, (bn, bk)),
            launch.descriptor(tma_descriptor, y, (bm, bn // 2 if split else bn)), a_s, b_s, bias_ptr, m, n, k,
            _m_bucket(m), bias is not None, is_int, sms, bm, bn, bk, cfg["GROUP_M"], split))
        return
    sms = launch.sm_count(_index(a_s))
    grid = lambda cfg: (min(sms, triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])),)  # noqa: E731
    args = (*_descriptors(xq, wq, y, 128, 128, 128), a_s, b_s, bias_ptr, m, n, k, _m_bucket(m))  # blocks set per config
    meta = dict(NUM_SMS=sms, HAS_BIAS=bias is not None, IS_INT=is_int)
    _w8a8_persistent_launch(grid, *args, **meta)
    launch.remember(_persistent_chosen, key, _w8a8_persistent_launch, args, meta, grid, sms)


def _gluon_int8(xq, a_s, wq, b_s, bias, y) -> bool:
    """Runs the Gluon int8 kernel into y (bias: None or contiguous); False, and the Triton kernel
    from then on, where this Triton cannot build it."""
    global gluon_failure
    if not USE_GLUON or gluon_failure is not None or interpreted():
        return False
    try:
        gluon_gemm.int8_gemm(xq, a_s, wq, b_s, bias, y, _m_bucket(xq.shape[0]), launch.sm_count(_index(xq)))
        return True
    except Exception as e:  # Gluon is experimental: a Triton release may reject the kernel
        gluon_failure = f"{type(e).__name__}: {e}"
        log.warning("QuantDiT: the Gluon int8 GEMM does not build with Triton %s (%s); using the Triton kernel",
                    triton.__version__, gluon_failure.splitlines()[0][:300])
        return False


def w8a8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """xq [M, K], x_scale [M, 1]; wq [N, K], w_scale [N, 1] (int8 or float8_e4m3fn) -> [M, N] out_dtype."""
    m, k, n, y = _prepare(xq, wq, out_dtype)
    if m == 0:
        return y
    is_int = xq.dtype == torch.int8
    a_s = f32_vector(x_scale)
    b_s = f32_vector(w_scale)
    if b_s.numel() == 1:
        b_s = b_s.reshape(1).expand(n).contiguous()
    bias_ptr = bias_arg(bias, y)
    if hopper_ready(xq, wq):
        if few_rows_gemm.applies(m):
            few_rows_gemm.gemm(xq, a_s, wq, b_s, None if bias is None else bias_ptr, y)
            return y
        persistent = PERSISTENT and _y_desc_ok(y)
        if (persistent and is_int and k >= gluon_gemm.MIN_K
                and _gluon_int8(xq, a_s, wq, b_s, None if bias is None else bias_ptr, y)):
            return y
        if persistent:
            _persistent(xq, wq, y, a_s, b_s, None if bias is None else bias_ptr, is_int)
            return y
        a_desc, b_desc = _operand_descriptors(xq, wq, 128, 128)   # block shapes set per config
        if interpreted():
            a_desc.block_shape, b_desc.block_shape = [32, 128], [32, 128]
            _w8a8_tma_kernel[_grid(m, n)(_INTERPRETER_TILE)](
                a_desc, b_desc, y, a_s, b_s, bias_ptr, m, n, k, _m_bucket(m), y.stride(0),
                HAS_BIAS=bias is not None, IS_INT=is_int, **_INTERPRETER_TILE)
            return y
        _w8a8_tma_launch(_grid(m, n), a_desc, b_desc, y, a_s, b_s, bias_ptr, m, n, k, _m_bucket(m), y.stride(0),
                         HAS_BIAS=bias is not None, IS_INT=is_int)
        return y
    _launch(_w8a8_launch, _w8a8_kernel, m, n, xq, wq, y, a_s, b_s, bias_ptr, m, n, k, _m_bucket(m),
            xq.stride(0), wq.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, IS_INT=is_int, EVEN_K=k % 128 == 0)
    return y


def block_fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                   bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """xq [M, K] fp8 with x_scale [M, ceil(K/128)] (any strides, token-contiguous is fastest);
    wq [N, K] fp8 with w_scale [ceil(N/128), ceil(K/128)] -> [M, N] out_dtype."""
    m, k, n, y = _prepare(xq, wq, out_dtype)
    if m == 0:
        return y
    if x_scale.stride(0) != 1:  # the kernel reads scale[k_group, token] with tokens contiguous
        x_scale = x_scale.float().t().contiguous().t()
    x_scale = x_scale.float()
    w_scale = f32_vector(w_scale)
    bias_ptr = bias_arg(bias, y)
    _launch(_block_launch, _block_fp8_kernel, m, n, xq, wq, y, x_scale, w_scale, bias_ptr, m, n, k, _m_bucket(m),
            xq.stride(0), wq.stride(0), y.stride(0), x_scale.stride(1), w_scale.stride(0),
            HAS_BIAS=bias is not None, EVEN_K=k % 128 == 0)
    return y
