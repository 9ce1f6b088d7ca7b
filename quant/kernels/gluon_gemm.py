"""int8 W8A8 GEMM for Hopper written in Gluon (Triton's explicit-layout dialect).

Why a second int8 kernel: Triton's compiler keeps a Hopper MMA asynchronous (the next MMA issued
while the previous one still runs) only when the accumulator is fp32 (rule "2.1" of its WGMMA
pipeliner). int8 accumulates in int32, so Triton's int8 GEMM waits for every MMA to finish before
issuing the next, and ran 10-18% slower than the same kernel in fp8. Gluon states the pipeline
explicitly: each MMA is issued asynchronously and waited one step later, while TMA loads run
STAGES-1 steps ahead.

Persistent, tiles in grouped order, with two schedules that one autotuner chooses between:
- plain: every warp loads and multiplies; the first loads of a program's next tile are issued
  before the epilogue of its current one, but the epilogue still stalls the tensor cores.
- ping-pong (warp-specialized): one warp issues every TMA load; two MMA warpgroups take alternate
  tiles, handing the tensor cores over at the end of each tile's K loop, so one warpgroup's
  epilogue runs while the other's MMAs do. It won on most Flux and Wan shapes (H100).
The epilogue applies the per-token x per-channel scales and the bias, and stores the tile
through shared memory with TMA.

Gluon is experimental and its names move between Triton releases; `available()` says whether
this Triton has what the kernel needs; the caller falls back
otherwise (or when the kernel fails to compile, see triton_gemm.w8a8_gemm): Triton's own int8 kernel runs.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from . import launch
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
GROUP_M = 8  # row tiles that share weight tiles in L2 (grouped tile order)
# (BLOCK_M, BLOCK_N, STAGES, num_warps) of the plain schedule, autotuned per (token bucket, N, K):
# 128x256 keeps the tensor cores busiest on the large GEMMs, 128x128 with deeper prefetch won on
# Flux's linear2 (H100), 64x128 gives few-row GEMMs more tiles than SMs. Each fits in sm_90's 227 KiB
# of shared memory (tests/unit/test_gluon_compile.py): 128x256 with 4 stages would need 256 KiB.
TILES = ((128, 256, 3, 8), (128, 128, 5, 4), (128, 128, 4, 8), (64, 128, 6, 4))
# (BLOCK_M, BLOCK_N, STAGES) of the ping-pong schedule, tuned alongside TILES: a 128x128 int32
# accumulator is what one warpgroup's registers hold. It won on Flux proj, mlp.0, qkv and linear1
# and on Wan's attention and ffn.0 (H100, GEMM alone); the plain schedule kept linear2 and mlp.2.
PINGPONG_TILES = ((128, 128, 4), (128, 128, 5))
# Registers per thread in the ping-pong kernel: the launch asks for 168 (three warpgroups of 128
# threads fill the SM's 64K), then each MMA warpgroup takes 232 and the loader's warpgroup keeps 40.
PINGPONG_REGS = (168, 232, 40)
MIN_K = (max(t[2] for t in TILES) - 1) * BLOCK_K  # the plain schedule prefetches STAGES-1 K steps of a tile


if _IMPORT_ERROR is None:
    _MMA_REGS = gl.constexpr(PINGPONG_REGS[1])
    _LOADER_REGS = gl.constexpr(PINGPONG_REGS[2])

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
    def _mma_step(a_bufs, b_bufs, ready, step, acc):
        # Waits for ring step `step`'s tiles, issues its MMA asynchronously and waits for the one
        # before it: on return the previous step's slot is free to refill.
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
        return warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))

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
    def _store_tile(acc, y_desc, y_smem, as_ptr, bs_ptr, bias_ptr, off_m, off_n, M, N, HAS_BIAS: gl.constexpr):
        # Epilogue: int32 -> fp32 times the token and channel scales, plus bias, stored through y_smem.
        BLOCK_M: gl.constexpr = acc.shape[0]
        BLOCK_N: gl.constexpr = acc.shape[1]
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc.type.layout))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc.type.layout))
        a_s = gl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
        b_s = gl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)
        out = acc.to(gl.float32) * gl.expand_dims(a_s, 1) * gl.expand_dims(b_s, 0)
        if HAS_BIAS:
            bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
            out = out + gl.expand_dims(bias.to(gl.float32), 0)
        tma.store_wait(pendings=0)  # the store of this buffer's previous tile has left it
        y_smem.store(out.to(y_desc.dtype))
        fence_async_shared()
        _tma_store(y_desc, [off_m, off_n], y_smem)

    @gluon.jit
    def _pipelined(a_desc, b_desc, y_desc, as_ptr, bs_ptr, bias_ptr, M, N, K, HAS_BIAS: gl.constexpr,
                   NUM_SMS: gl.constexpr, GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, num_warps: gl.constexpr):
        # All warps load and multiply; a tile's epilogue stalls the tensor cores.
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
                # The MMA of the previous step is done after this, so its buffers take the load STAGES-1 ahead.
                acc = _mma_step(a_bufs, b_bufs, bars, step, acc)
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

            _store_tile(acc, y_desc, y_smem, as_ptr, bs_ptr, bias_ptr, off_m, off_n, M, N, HAS_BIAS)
        tma.store_wait(pendings=0)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

    @gluon.jit
    def _ws_producer(args, CONSUMER: gl.constexpr, HAS_BIAS: gl.constexpr, NUM_SMS: gl.constexpr,
                     GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        # One warp: issues every TMA load of this program's tiles, in the order the consumers take them.
        # (Same parameters as _ws_consumer, as warp_specialize's worker partitions have had to share one.)
        a_desc, b_desc, y_desc, a_bufs, b_bufs, y_bufs, ready, empty, turn, as_ptr, bs_ptr, bias_ptr, M, N, K = args
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        tiles_m = gl.cdiv(M, BLOCK_M)
        tiles_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        step = 0
        for tile in range(gl.program_id(0), tiles_m * tiles_n, NUM_SMS):
            off_m, off_n = _tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
            for ks in range(k_steps):
                mbarrier.wait(empty.index(step % STAGES), ((step // STAGES) & 1) ^ 1)  # the first round passes
                _load_step(a_desc, b_desc, a_bufs, b_bufs, ready, step, off_m, off_n, ks * BLOCK_K, STAGES)
                step += 1

    @gluon.jit
    def _ws_consumer(args, CONSUMER: gl.constexpr, HAS_BIAS: gl.constexpr, NUM_SMS: gl.constexpr,
                     GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        # One warpgroup: MMAs and epilogue of every other tile of this program. The two consumers take
        # turns at the tensor cores, so one's epilogue runs while the other's MMAs do.
        a_desc, b_desc, y_desc, a_bufs, b_bufs, y_bufs, ready, empty, turn, as_ptr, bs_ptr, bias_ptr, M, N, K = args
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        layout: gl.constexpr = _mma_layout(BLOCK_M, BLOCK_N, 4)
        y_smem = y_bufs.index(CONSUMER)
        tiles_m = gl.cdiv(M, BLOCK_M)
        tiles_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        mine = 0
        for tile in range(gl.program_id(0) + CONSUMER * NUM_SMS, tiles_m * tiles_n, 2 * NUM_SMS):
            off_m, off_n = _tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
            base = (2 * mine + CONSUMER) * k_steps  # ring steps taken before this tile
            # Wait for the other consumer to have taken all of its tile's K steps: the ring's barriers
            # then stand at most one phase behind this tile's steps, and the MMAs do not interleave.
            mbarrier.wait(turn.index(CONSUMER), (mine & 1) ^ (1 - CONSUMER))
            acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.int32, layout=layout)
            for ks in range(k_steps):
                step = base + ks
                acc = _mma_step(a_bufs, b_bufs, ready, step, acc)
                if ks > 0:  # the previous step's MMA is done: its slot may be refilled
                    mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
            mbarrier.arrive(turn.index(1 - CONSUMER), count=1)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((base + k_steps - 1) % STAGES), count=1)

            _store_tile(acc, y_desc, y_smem, as_ptr, bs_ptr, bias_ptr, off_m, off_n, M, N, HAS_BIAS)
            mine += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _pingpong(a_desc, b_desc, y_desc, as_ptr, bs_ptr, bias_ptr, M, N, K, HAS_BIAS: gl.constexpr,
                  NUM_SMS: gl.constexpr, GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr):
        # Warp-specialized: one loader warp and two MMA warpgroups taking alternate tiles (see _ws_consumer).
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        y_bufs = gl.allocate_shared_memory(y_desc.dtype, [2] + y_desc.block_type.shape, y_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        args = (a_desc, b_desc, y_desc, a_bufs, b_bufs, y_bufs, ready, empty, turn, as_ptr, bs_ptr, bias_ptr, M, N, K)
        gl.warp_specialize([
            (_ws_consumer, (args, 0, HAS_BIAS, NUM_SMS, GROUP_M, BLOCK_M, BLOCK_N)),
            (_ws_consumer, (args, 1, HAS_BIAS, NUM_SMS, GROUP_M, BLOCK_M, BLOCK_N)),
            (_ws_producer, (args, 0, HAS_BIAS, NUM_SMS, GROUP_M, BLOCK_M, BLOCK_N)),
        ], [4, 1], [_MMA_REGS, _LOADER_REGS])

    @gluon.jit
    def _gemm_kernel(a_desc, b_desc, y_desc, as_ptr, bs_ptr, bias_ptr, M, N, K, M_BUCKET,
                     HAS_BIAS: gl.constexpr, NUM_SMS: gl.constexpr, GROUP_M: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                     num_warps: gl.constexpr):
        # One kernel for both schedules, so one autotuner picks among all of their tiles.
        if PINGPONG:
            _pingpong(a_desc, b_desc, y_desc, as_ptr, bs_ptr, bias_ptr, M, N, K, HAS_BIAS, NUM_SMS, GROUP_M,
                      BLOCK_M, BLOCK_N, STAGES)
        else:
            _pipelined(a_desc, b_desc, y_desc, as_ptr, bs_ptr, bias_ptr, M, N, K, HAS_BIAS, NUM_SMS, GROUP_M,
                       BLOCK_M, BLOCK_N, STAGES, num_warps)

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


def configs() -> list:
    """Every (schedule, tile) the autotuner chooses from."""
    plain = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "STAGES": stages, "PINGPONG": False}, num_warps=warps,
                           pre_hook=_set_blocks) for bm, bn, stages, warps in TILES]
    pingpong = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "STAGES": stages, "PINGPONG": True}, num_warps=4,
                              maxnreg=PINGPONG_REGS[0], pre_hook=_set_blocks) for bm, bn, stages in PINGPONG_TILES]
    return plain + pingpong


# Escape hatch (and for benchmarks): QUANTDIT_PINGPONG=0 tunes over the plain schedule only.
USE_PINGPONG = os.environ.get("QUANTDIT_PINGPONG", "1") != "0"


@functools.lru_cache(maxsize=None)
def _launcher(pingpong: bool = True):
    tuned = [c for c in configs() if pingpong or not c.kwargs["PINGPONG"]]
    return Launcher(triton.autotune(configs=tuned, key=["M_BUCKET", "N", "K"])(_gemm_kernel))


def _arguments(xq, a_s, wq, b_s, bias, y, m_bucket: int, sms: int):
    m, k = xq.shape
    n = wq.shape[0]
    first = (128, BLOCK_K)  # the chosen config's pre-hook sets the block shapes
    return ((_descriptor(xq, first), _descriptor(wq, first), _descriptor(y, (128, 128)), a_s, b_s,
             y if bias is None else bias, m, n, k, m_bucket),
            dict(HAS_BIAS=bias is not None, NUM_SMS=sms, GROUP_M=GROUP_M))


def _grid(m: int, n: int, sms: int):
    return lambda cfg: (min(sms, triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])),)


# (shapes, strides, dtypes, alignments, schedule set) -> (compiled kernel, its config, grid): what the
# Launcher chose for such a call, relaunched with no autotuner bookkeeping or pre-hook (each costs
# host time on every one of a DiT step's hundreds of linears).
_chosen: dict[tuple, tuple] = {}


def _fast_key(xq, a_s, wq, b_s, bias, y, m_bucket, sms) -> tuple:
    # Everything the Launcher's key holds for these arguments, read cheaply: xq, wq are int8 and
    # a_s, b_s fp32 by contract, and the TMA path has already checked the operands' alignment.
    m, k = xq.shape
    return (m, wq.shape[0], k, m_bucket, sms, xq.get_device(), xq.stride(0), wq.stride(0), y.stride(0), y.dtype,
            None if bias is None else (bias.dtype, bias.data_ptr() % 16 == 0),
            a_s.data_ptr() % 16 == 0, b_s.data_ptr() % 16 == 0, USE_PINGPONG)


def int8_gemm(xq, a_s, wq, b_s, bias, y, m_bucket: int, sms: int):
    """y[M, N] = (xq @ wq^T) * a_s[:, None] * b_s[None, :] (+ bias), written into y. xq [M, K] and
    wq [N, K] int8 with 16-byte aligned rows, K >= MIN_K; a_s [M], b_s [N] contiguous fp32;
    y [M, N] bf16/fp16 with 16-byte aligned rows."""
    key = _fast_key(xq, a_s, wq, b_s, bias, y, m_bucket, sms)
    hit = launch.relaunch(_chosen, key)
    if hit is not None:
        kernel, cfg, grid = hit
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        m, n, k = key[:3]
        launch.run_compiled(kernel, grid, (
            launch.descriptor(_descriptor, xq, (bm, BLOCK_K)), launch.descriptor(_descriptor, wq, (bn, BLOCK_K)),
            launch.descriptor(_descriptor, y, (bm, bn)), a_s, b_s, y if bias is None else bias, m, n, k, m_bucket,
            bias is not None, sms, GROUP_M, bm, bn, cfg["STAGES"], cfg["PINGPONG"], cfg["num_warps"]))
        return y
    args, meta = _arguments(xq, a_s, wq, b_s, bias, y, m_bucket, sms)
    launcher = _launcher(USE_PINGPONG)
    grid = _grid(xq.shape[0], wq.shape[0], sms)
    launcher(grid, *args, **meta)
    launch.remember(_chosen, key, launcher, args, meta, grid)
    return y


def int8_gemm_with(config, xq, a_s, wq, b_s, bias, y, sms: int):
    """int8_gemm through one given config of `configs()`, not the tuned one (for tests)."""
    args, meta = _arguments(xq, a_s, wq, b_s, bias, y, 0, sms)
    named = dict(zip(_gemm_kernel.arg_names, args), **meta, **config.kwargs)
    config.pre_hook(named)
    _gemm_kernel[_grid(xq.shape[0], wq.shape[0], sms)(named)](
        *args, **meta, **config.kwargs, num_warps=config.num_warps, maxnreg=config.maxnreg)
    return y
