"""int8 W8A8 GEMM for Hopper written in Gluon (Triton's explicit-layout dialect).

Why a second int8 kernel: Triton's compiler keeps a Hopper MMA asynchronous (the next MMA issued
while the previous one still runs) only when the accumulator is fp32 (rule "2.1" of its WGMMA
pipeliner). int8 accumulates in int32, so Triton's int8 GEMM waits for every MMA to finish before
issuing the next, and ran 10-18% slower than the same kernel in fp8. Gluon states the pipeline
explicitly: each MMA is issued asynchronously and waited one step later, while TMA loads run
STAGES-1 steps ahead.

Persistent: one program per SM walks the output tiles in grouped order; the first loads of a
program's next tile are issued before the epilogue of its current one. The epilogue applies the
per-token x per-channel scales and the bias, and stores the tile through shared memory with TMA.

Gluon is experimental and its names move between Triton releases; `available()` says whether
this Triton has what the kernel needs, and the caller falls back to the plain Triton kernel
otherwise (or when the kernel fails to compile, see triton_gemm.w8a8_gemm).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .launch import Launcher

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    _IMPORT_ERROR: Optional[str] = None
except Exception as e:  # no Triton, a Triton without Gluon, or one whose Gluon names differ
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

if _IMPORT_ERROR is None:
    # Triton 3.5 renamed the TMA copies; accept both spellings.
    _tma_load = getattr(tma, "async_load", None) or getattr(tma, "async_copy_global_to_shared", None)
    _tma_store = getattr(tma, "async_store", None) or getattr(tma, "async_copy_shared_to_global", None)
    if _tma_load is None or _tma_store is None:
        _IMPORT_ERROR = "this Triton's Gluon has no TMA load/store"


def available() -> Optional[str]:
    """None when this Triton can build the kernel, else why not."""
    return _IMPORT_ERROR


BLOCK_K = 128
# (BLOCK_M, BLOCK_N, STAGES, num_warps), autotuned per (token bucket, N, K): 128x256 keeps the
# tensor cores busiest on the large GEMMs, 128x128 with deeper prefetch won on Flux's linear2
# and qkv (H100), 64x128 gives few-row GEMMs more tiles than SMs.
TILES = ((128, 256, 3, 8), (128, 256, 4, 8), (128, 128, 5, 4), (128, 128, 4, 8), (64, 128, 6, 4))
MIN_K = (max(t[2] for t in TILES) - 1) * BLOCK_K  # every config prefetches STAGES-1 K steps of each tile


if _IMPORT_ERROR is None:

    @gluon.constexpr_function
    def _mma_layout(block_m, block_n, num_warps):
        # Warps stack along M (BLOCK_M / 16 rows of warps at most); int8 MMAs take an N of at most
        # 224 that divides the tile, so a 256-wide tile runs as two 128-wide instructions.
        warps_m = min(num_warps, block_m // 16)
        warps_n = num_warps // warps_m
        n = block_n // warps_n
        while n > 224 or (block_n // warps_n) % n:
            n //= 2
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps_m, warps_n], instr_shape=[16, n, 32])

    @gluon.jit
    def _load_step(a_desc, b_desc, a_bufs, b_bufs, bars, step, off_m, off_n, k, STAGES: gl.constexpr):
        slot = step % STAGES
        bar = bars.index(slot)
        mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
        _tma_load(a_desc, [off_m, k], bar, a_bufs.index(slot))
        _tma_load(b_desc, [off_n, k], bar, b_bufs.index(slot))

    @gluon.jit
    def _prefetch_tile(a_desc, b_desc, a_bufs, b_bufs, bars, first_step, off_m, off_n, STAGES: gl.constexpr):
        # The first STAGES-1 K steps of a tile, into the ring slots that follow `first_step`.
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        for i in gl.static_range(STAGES - 1):
            _load_step(a_desc, b_desc, a_bufs, b_bufs, bars, first_step + i, off_m, off_n, i * BLOCK_K, STAGES)

    @gluon.jit
    def _tile_origin(tile, tiles_m, tiles_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        # Grouped order: GROUP_M row tiles share the weight tiles they read while those sit in L2.
        per_group = GROUP_M * tiles_n
        first_m = (tile // per_group) * GROUP_M
        size_m = gl.minimum(tiles_m - first_m, GROUP_M)
        return (first_m + (tile % per_group) % size_m) * BLOCK_M, ((tile % per_group) // size_m) * BLOCK_N

    @gluon.jit
    def _int8_gemm_kernel(a_desc, b_desc, y_desc, as_ptr, bs_ptr, bias_ptr, M, N, K, M_BUCKET,
                          HAS_BIAS: gl.constexpr, NUM_SMS: gl.constexpr, GROUP_M: gl.constexpr,
                          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                          num_warps: gl.constexpr):
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        layout: gl.constexpr = _mma_layout(BLOCK_M, BLOCK_N, num_warps)

        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        y_smem = gl.allocate_shared_memory(y_desc.dtype, y_desc.block_type.shape, y_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)

        tiles_m = gl.cdiv(M, BLOCK_M)
        tiles_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        tile = gl.program_id(0)
        off_m, off_n = _tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
        _prefetch_tile(a_desc, b_desc, a_bufs, b_bufs, bars, 0, off_m, off_n, STAGES)

        base = 0  # K steps consumed before this tile, over all of this program's tiles
        for tile in range(gl.program_id(0), tiles_m * tiles_n, NUM_SMS):
            off_m, off_n = _tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
            acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.int32, layout=layout)
            for ks in range(k_steps):
                step = base + ks
                slot = step % STAGES
                mbarrier.wait(bars.index(slot), (step // STAGES) & 1)
                acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
                # The MMA of the previous step is done now, so its buffers take the load STAGES-1 ahead.
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                ahead = ks + STAGES - 1
                if ahead < k_steps:
                    _load_step(a_desc, b_desc, a_bufs, b_bufs, bars, step + STAGES - 1, off_m, off_n,
                               ahead * BLOCK_K, STAGES)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            base += k_steps

            nxt = tile + NUM_SMS
            if nxt < tiles_m * tiles_n:  # the next tile's first loads overlap this epilogue
                next_m, next_n = _tile_origin(nxt, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
                _prefetch_tile(a_desc, b_desc, a_bufs, b_bufs, bars, base, next_m, next_n, STAGES)

            offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
            offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
            a_s = gl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
            b_s = gl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)
            out = acc.to(gl.float32) * gl.expand_dims(a_s, 1) * gl.expand_dims(b_s, 0)
            if HAS_BIAS:
                bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
                out = out + gl.expand_dims(bias.to(gl.float32), 0)
            tma.store_wait(pendings=0)  # the previous tile's store has left y_smem
            y_smem.store(out.to(y_desc.dtype))
            fence_async_shared()
            _tma_store(y_desc, [off_m, off_n], y_smem)
        tma.store_wait(pendings=0)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

    _TORCH_TO_GL = {torch.int8: gl.int8, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@functools.lru_cache(maxsize=None)
def _shared_layout(block: tuple, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), _TORCH_TO_GL[dtype])


def _descriptor(t: torch.Tensor, block: tuple):
    """A TMA descriptor over a row-major 2-D tensor, tiled in `block` (a config's pre-hook sets it)."""
    return GluonDescriptor(t, list(t.shape), [t.stride(0), 1], list(block), _shared_layout(block, t.dtype))


def _set_blocks(nargs):
    bm, bn = nargs["BLOCK_M"], nargs["BLOCK_N"]
    for name, block in (("a_desc", (bm, BLOCK_K)), ("b_desc", (bn, BLOCK_K)), ("y_desc", (bm, bn))):
        desc = nargs[name]
        desc.block_shape = list(block)
        desc.layout = _shared_layout(block, desc.base.dtype)


@functools.lru_cache(maxsize=1)
def _launcher():
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "STAGES": stages}, num_warps=warps, pre_hook=_set_blocks)
               for bm, bn, stages, warps in TILES]
    return Launcher(triton.autotune(configs=configs, key=["M_BUCKET", "N", "K"])(_int8_gemm_kernel))


def int8_gemm(xq, a_s, wq, b_s, bias, y, m_bucket: int, sms: int):
    """y[M, N] = (xq @ wq^T) * a_s[:, None] * b_s[None, :] (+ bias), written into y. xq [M, K] and
    wq [N, K] int8 with 16-byte aligned rows, K >= MIN_K; a_s [M], b_s [N] contiguous fp32;
    y [M, N] bf16/fp16 with 16-byte aligned rows."""
    m, k = xq.shape
    n = wq.shape[0]
    grid = lambda cfg: (min(sms, triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])),)  # noqa: E731
    first = (128, BLOCK_K)
    _launcher()(grid, _descriptor(xq, first), _descriptor(wq, first), _descriptor(y, (128, 128)), a_s, b_s,
                y if bias is None else bias, m, n, k, m_bucket, HAS_BIAS=bias is not None, NUM_SMS=sms,
                GROUP_M=8)
    return y
