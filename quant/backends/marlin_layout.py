"""Our int4-g128 weights in the layout vLLM's Marlin GEMM takes. Plain torch, no vLLM import, so
every rule here is checked on the CPU (tests/unit/test_marlin_layout.py).

What our layers hold (quant/reference.py `pack_int4`, `quantize_groupwise`):
  qdata  uint8 [N, K/2]: signed 4-bit q in [-8, 7], two per byte, even k in the low nibble;
  scale  float32 [N, K/128]: w ~= q * scale[n, k // 128].

What Marlin wants:
  - `gptq_marlin_repack` takes the GPTQ layout, int32 [K/8, N]: the int32 at [r, n] holds
    k = 8r .. 8r+7 of column n, k % 8 == i in bits 4i..4i+3, each stored unsigned as q + 8
    (vLLM's scalar type uint4b8). It returns Marlin's tiled int32 [K/16, 2N].
  - scales [K/128, N] in the activation dtype (fp16 or bf16), the columns of each row shuffled
    into the order the kernel's threads read them; a bias [N] is shuffled the same way as
    one-group scales.
"""
from __future__ import annotations

import torch

GROUP = 128
MIN_N = 64    # the kernel's narrowest tile along N: N must be a multiple (it checks this)
MIN_K = 128   # its deepest tile along K; also one whole scale group


def shape_ok(n: int, k: int) -> bool:
    """Whether Marlin takes an [N, K] int4-g128 weight as it is (whole groups, whole tiles)."""
    return n % MIN_N == 0 and k % MIN_K == 0 and n > 0 and k > 0


def gptq_weight(qdata: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] (ours) -> int32 [K/8, N] (GPTQ, uint4b8). K must be a multiple of 8."""
    if qdata.dtype != torch.uint8 or qdata.dim() != 2 or qdata.shape[1] % 4:
        raise ValueError(f"expected packed int4 data uint8 [N, K/2] with K % 8 == 0, got "
                         f"{qdata.dtype} {tuple(qdata.shape)}")
    # In a 4-bit two's complement nibble, adding 8 (mod 16) flips its top bit: 0x88 does both
    # nibbles of a byte. The result is a fresh contiguous tensor, so the int32 view below is legal.
    biased = torch.bitwise_xor(qdata, 0x88)
    # Little-endian int32 over 4 bytes: byte b sits at bits 8b, and holds k = 2b (low nibble) and
    # 2b + 1 (high), so k % 8 lands at bits 4 * (k % 8), as GPTQ packs it. Then K/8 becomes rows.
    return biased.view(torch.int32).t().contiguous()


def _shuffle(t: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Marlin's column order, applied along the last dim (a multiple of 64, or of 32 when not
    grouped). As index lists this is vLLM's `get_scale_perms`:
      grouped: out[8i + j] = in[i + 8j] within each 64 (an 8x8 transpose);
      one group: within each 32, for i in 0..3, c in 0..3, p in 0..1: next = in[8c + 2i + p]."""
    lead = t.shape[:-1]
    if grouped:
        return t.reshape(*lead, -1, 8, 8).transpose(-1, -2).reshape(*lead, -1)
    return t.reshape(*lead, -1, 4, 4, 2).transpose(-3, -2).reshape(*lead, -1)


def marlin_scales(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 [N, K/128] (ours) -> [K/128, N] in `dtype`, shuffled for Marlin. A single group
    (K == 128) is the kernel's per-channel case, which reads its scales in the other order."""
    s = scale.t().to(dtype)
    return _shuffle(s, grouped=s.shape[0] > 1).contiguous()


def marlin_bias(bias: torch.Tensor) -> torch.Tensor:
    """[N] -> [N] in the order Marlin's epilogue adds it (the one-group scale order)."""
    return _shuffle(bias, grouped=False).contiguous()


def scalar_type_id(exponent: int, mantissa: int, signed: bool, bias: int, finite_only: bool = False,
                   nan_repr: int = 1) -> int:
    """vLLM's ScalarType.id (vllm/scalar_type.py), which the kernels take as `b_type_id`: the fields
    packed from bit 0 up as exponent:8, mantissa:8, signed:1, bias:32, finite_only:1, nan_repr:8.
    nan_repr 1 is IEEE_754, the default that vLLM's integer types carry."""
    value, shift = 0, 0
    for field, bits in ((exponent, 8), (mantissa, 8), (int(signed), 1), (bias, 32), (int(finite_only), 1),
                        (nan_repr, 8)):
        value |= (field & ((1 << bits) - 1)) << shift
        shift += bits
    return value


# uint4b8: 4 unsigned bits stored with a bias of 8 (GPTQ's symmetric int4).
UINT4B8_ID = scalar_type_id(exponent=0, mantissa=4, signed=False, bias=8)


def workspace_numel(multiprocessors: int) -> int:
    """Marlin's workspace is an int32 lock per thread block, one block per SM: it checks
    numel >= the GPU's SM count. It must start zeroed; the kernel leaves it zeroed."""
    return multiprocessors
