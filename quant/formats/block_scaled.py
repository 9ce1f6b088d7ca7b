"""Microscaling block formats (ComfyUI's mxfp8) read into the pack's per-channel fp8.

MXFP8 stores fp8 e4m3 weights with one power-of-two (E8M0) scale per 32 input features, laid out
in the cuBLAS block-scaling tile order. Hopper and older GPUs have no tensor-core path for it. Because
the scales are powers of two, moving a row onto its largest block scale only shifts the other blocks'
exponents: every value stays exact unless it drops below fp8's normal range, so the row runs on the
fp8 W8A8 kernels with one scale per channel, at the bits the file holds.
"""
from __future__ import annotations

import torch

MX_BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 255
_TILE_ROWS, _TILE_COLS = 128, 4


def ceil_to(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def swizzled_scale_shape(rows: int, blocks: int) -> tuple[int, int]:
    """The stored shape of `rows` x `blocks` scales in the tile order (padded to 128 x 4 tiles)."""
    return ceil_to(rows, _TILE_ROWS), ceil_to(blocks, _TILE_COLS)


def unswizzle(stored: torch.Tensor, rows: int, blocks: int) -> torch.Tensor:
    """[rows, blocks] scales from cuBLAS's block-scaling layout. Each 128 x 4 tile of the plain matrix
    is stored as 512 contiguous bytes, tiles in row-major order; inside a tile, element (r, c) sits at
    (r % 32) * 16 + (r // 32) * 4 + c."""
    padded_rows, padded_cols = swizzled_scale_shape(rows, blocks)
    row_tiles, col_tiles = padded_rows // _TILE_ROWS, padded_cols // _TILE_COLS
    tiles = stored.reshape(row_tiles, col_tiles, 32, 4, _TILE_COLS)   # tile, r % 32, r // 32, c
    plain = tiles.permute(0, 3, 2, 1, 4).reshape(padded_rows, padded_cols)
    return plain[:rows, :blocks]


def swizzle(plain: torch.Tensor) -> torch.Tensor:
    """The inverse of `unswizzle` (zero padding): for writing and testing."""
    rows, blocks = plain.shape
    padded_rows, padded_cols = swizzled_scale_shape(rows, blocks)
    padded = plain.new_zeros((padded_rows, padded_cols))
    padded[:rows, :blocks] = plain
    tiles = padded.reshape(padded_rows // _TILE_ROWS, 4, 32, padded_cols // _TILE_COLS, _TILE_COLS)
    return tiles.permute(0, 3, 2, 1, 4).reshape(padded_rows, padded_cols)


def mxfp8_to_per_channel(q: torch.Tensor, exponents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(fp8 weight, float32 [out, 1] scale, values rounded): an [out, in] e4m3 weight with [out, in/32]
    biased E8M0 exponents, requantized onto one power-of-two scale per row (its largest block's).
    Blocks below the row's top exponent are shifted down in fp8; the count says how many values lost
    bits to fp8's subnormal range on the way (0 for typical weights)."""
    out_f, in_f = q.shape
    e = exponents.to(torch.int32)
    if (e == E8M0_NAN).any():
        raise ValueError("an E8M0 block scale is 255 (NaN)")
    top = e.amax(dim=1, keepdim=True)
    shift = torch.exp2((e - top).float()).repeat_interleave(MX_BLOCK, dim=1)[:, :in_f]
    exact = q.float() * shift
    shifted = exact.to(torch.float8_e4m3fn)
    rounded = int((shifted.float() != exact).sum())
    scale = torch.exp2((top - E8M0_BIAS).float())
    return shifted, scale, rounded


def dequantize_mxfp8(q: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """The float32 weight an mxfp8 layer means: each value times 2^(its block's exponent - 127)."""
    scale = torch.exp2((exponents.to(torch.int32) - E8M0_BIAS).float())
    return q.float() * scale.repeat_interleave(MX_BLOCK, dim=1)[:, :q.shape[1]]
