"""Ground-truth quantization math in plain torch (runs on CPU or any device).

Every fast kernel in quant/backends is tested against these functions. Conventions:
- weights are [out_features, in_features]; scales are float32;
- symmetric quantization: q = round(x * (1 / scale)), scale = amax / qmax, both IEEE-rounded in
  float32 on every device (kernels multiply by the reciprocal, and so does the reference);
- an all-zero row or group gets a tiny positive scale (never 0, never NaN);
- when in_features is not a multiple of a group size, the last group is shorter.
"""
from __future__ import annotations

import math

import torch

from .schemes import (BLOCK_128, FP8_E4M3, FP8_E5M2, GROUP_128, INT4, INT8, NONE, PER_CHANNEL, PER_TENSOR,
                      PER_TOKEN, Scheme)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_E5M2_MAX = float(torch.finfo(torch.float8_e5m2).max)  # 57344
_FP8_DTYPES = {FP8_E4M3: FP8_DTYPE, FP8_E5M2: torch.float8_e5m2}
INT8_MAX = 127.0
INT4_MAX = 7.0
GROUP = 128
_MIN_AMAX = 1e-12


def activation_dtype(scheme: Scheme) -> torch.dtype:
    """The torch dtype a W8A8 scheme quantizes activations to (int8 or float8_e4m3fn)."""
    return torch.int8 if scheme.activation_format == INT8 else _FP8_DTYPES[scheme.activation_format]


def _qmax(fmt: str) -> float:
    return {FP8_E4M3: FP8_MAX, FP8_E5M2: FP8_E5M2_MAX, INT8: INT8_MAX, INT4: INT4_MAX}[fmt]


def _cast(scaled: torch.Tensor, fmt: str) -> torch.Tensor:
    qmax = _qmax(fmt)
    if fmt in _FP8_DTYPES:
        return scaled.clamp(-qmax, qmax).to(_FP8_DTYPES[fmt])
    q = scaled.round().clamp(-qmax - (1 if fmt == INT4 else 0), qmax)
    return q.to(torch.int8)


def scale_from_amax(amax: torch.Tensor, fmt: str) -> torch.Tensor:
    amax = amax.float().clamp(min=_MIN_AMAX)
    # A tensor divisor: CUDA turns division by a Python scalar into a multiply by its reciprocal.
    # Filled on the tensor's device: no host-to-device copy, so CUDA graphs can capture it.
    return amax / torch.full_like(amax, _qmax(fmt))


def _scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * scale.float().reciprocal()


# ---------------------------------------------------------------- per-row / per-tensor
def quantize_rowwise(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row of a 2-D tensor (weight per output channel, activation per token)."""
    x = x.float()
    scale = scale_from_amax(x.abs().amax(dim=-1, keepdim=True), fmt)
    return _cast(_scaled(x, scale), fmt), scale


def quantize_per_tensor(x: torch.Tensor, fmt: str = FP8_E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    scale = scale_from_amax(x.abs().amax(), fmt)
    return _cast(_scaled(x, scale), fmt), scale.reshape(())


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


# ---------------------------------------------------------------- groups along the last dim
def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def quantize_groupwise(x: torch.Tensor, fmt: str, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per `group` consecutive features of each row: scale shape [rows, ceil(K/group)]."""
    rows, k = x.shape
    xp = _pad_last(x.float(), group).reshape(rows, -1, group)
    scale = scale_from_amax(xp.abs().amax(dim=-1, keepdim=True), fmt)
    q = _cast(_scaled(xp, scale), fmt).reshape(rows, -1)[:, :k]
    return q, scale.squeeze(-1)


def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    k = q.shape[-1]
    expanded = scale.float().repeat_interleave(group, dim=-1)[..., :k]
    return q.float() * expanded


# ---------------------------------------------------------------- 128x128 weight blocks
def quantize_block(w: torch.Tensor, block: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weight with one scale per block x block tile: scale [ceil(N/b), ceil(K/b)]."""
    n, k = w.shape
    wp = _pad_last(_pad_last(w.float(), block).t(), block).t()  # pad both dims
    nb, kb = wp.shape[0] // block, wp.shape[1] // block
    tiles = wp.reshape(nb, block, kb, block)
    scale = scale_from_amax(tiles.abs().amax(dim=(1, 3)), FP8_E4M3)
    q = _cast(_scaled(tiles, scale[:, None, :, None]), FP8_E4M3).reshape(nb * block, kb * block)
    return q[:n, :k].contiguous(), scale


def dequantize_block(q: torch.Tensor, scale: torch.Tensor, block: int = GROUP) -> torch.Tensor:
    n, k = q.shape
    expanded = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return q.float() * expanded


# ---------------------------------------------------------------- int4 packing
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], shape [N, K] -> uint8 [N, ceil(K/2)]; even column in the low nibble."""
    q = _pad_last(q.to(torch.int16), 2) & 0xF
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    p = packed.to(torch.int16)
    nibbles = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).reshape(p.shape[0], -1)[:, :k]
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)


# ---------------------------------------------------------------- scheme-level API
def quantize_weight(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [out, in] weight for `scheme`; returns (qdata, scale)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; cannot quantize it")
    if scheme.weight_format == NONE:
        raise ValueError(f"scheme {scheme.name} does not quantize weights")
    g = scheme.weight_granularity
    if g == PER_CHANNEL:
        return quantize_rowwise(w, scheme.weight_format)
    if g == PER_TENSOR:
        return quantize_per_tensor(w, scheme.weight_format)
    if g == BLOCK_128:
        return quantize_block(w)
    if g == GROUP_128 and scheme.weight_format == INT4:
        q, scale = quantize_groupwise(w, INT4)
        return pack_int4(q), scale
    raise ValueError(f"scheme {scheme.name} has no weight quantizer")


def dequantize_weight(qdata: torch.Tensor, scale: torch.Tensor, scheme: Scheme,
                      in_features: int) -> torch.Tensor:
    """float32 [out, in] weight back from (qdata, scale)."""
    g = scheme.weight_granularity
    if g in (PER_CHANNEL, PER_TENSOR):
        w = dequantize_rowwise(qdata, scale)
    elif g == BLOCK_128:
        w = dequantize_block(qdata, scale)
    elif g == GROUP_128 and scheme.weight_format == INT4:
        # Packed data only knows ceil(K/2): check it, or unpack_int4 would silently truncate.
        if qdata.shape[-1] != math.ceil(in_features / 2) or scale.shape[-1] != math.ceil(in_features / GROUP):
            raise ValueError(f"int4 weight of packed shape {tuple(qdata.shape)} does not have "
                             f"{in_features} input features")
        w = dequantize_groupwise(unpack_int4(qdata, in_features), scale)
    else:
        raise ValueError(f"scheme {scheme.name} has no weight dequantizer")
    if w.shape[-1] != in_features:
        raise ValueError(f"weight has {w.shape[-1]} input features, expected {in_features}")
    return w


def quantize_activation(x2d: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of a [tokens, in] tensor."""
    if scheme.activation_granularity == PER_TOKEN:
        return quantize_rowwise(x2d, scheme.activation_format)
    if scheme.activation_granularity == GROUP_128:
        return quantize_groupwise(x2d, scheme.activation_format)
    raise ValueError(f"scheme {scheme.name} does not quantize activations")


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    if scheme.activation_granularity == GROUP_128:
        return dequantize_groupwise(q, scale)
    return dequantize_rowwise(q, scale)


def emulated_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, scheme: Scheme,
                    bias: torch.Tensor | None = None, in_features: int | None = None) -> torch.Tensor:
    """y = x @ W^T + b exactly as the quantized kernel computes it, in float32, cast to x.dtype.

    W8A8 schemes quantize x dynamically (the error the real kernel makes); weight-only schemes use x
    as it is. Any number of leading dims is accepted.
    """
    k = x.shape[-1] if in_features is None else in_features
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {k}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    if scheme.quantizes_activation:
        xq, xs = quantize_activation(x2d, scheme)
        out = emulated_linear_quantized(xq, xs, x.dtype, qdata, scale, scheme, bias, k)
    else:
        out = _float_linear(x2d.float(), qdata, scale, scheme, bias, k).to(x.dtype)
    return out.reshape(*lead, out.shape[-1])


def emulated_linear_quantized(xq: torch.Tensor, xs: torch.Tensor, out_dtype: torch.dtype, qdata: torch.Tensor,
                              scale: torch.Tensor, scheme: Scheme, bias: torch.Tensor | None,
                              in_features: int) -> torch.Tensor:
    """emulated_linear of a W8A8 scheme from the activation's quantized rows [tokens, in]."""
    xf = dequantize_activation(xq, xs, scheme)
    return _float_linear(xf, qdata, scale, scheme, bias, in_features).to(out_dtype)


def _float_linear(xf, qdata, scale, scheme, bias, k):
    out = xf @ dequantize_weight(qdata, scale, scheme, k).t()
    return out if bias is None else out + bias.float()


def weight_nbytes(out_features: int, in_features: int, scheme: Scheme) -> int:
    """Bytes the quantized weight and its scales occupy (for reports)."""
    g = scheme.weight_granularity
    if scheme.weight_format == NONE:
        return out_features * in_features * 2
    if scheme.weight_format == INT4:
        return out_features * math.ceil(in_features / 2) + out_features * math.ceil(in_features / GROUP) * 4
    data = out_features * in_features
    if g == PER_CHANNEL:
        return data + out_features * 4
    if g == BLOCK_128:
        return data + math.ceil(out_features / GROUP) * math.ceil(in_features / GROUP) * 4
    return data + 4


def requantize_with_scale(w: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Quantize a float weight with an existing scale (values beyond the range are clamped).

    Used when a patch (e.g. a LoRA) is merged into a quantized layer: keeping the scale lets
    ComfyUI restore the original layer by restoring the weight data alone."""
    g = scheme.weight_granularity
    w = w.float()
    if g in (PER_CHANNEL, PER_TENSOR):
        return _cast(_scaled(w, scale), scheme.weight_format)
    if g == BLOCK_128:
        n, k = w.shape
        expanded = scale.float().repeat_interleave(GROUP, 0).repeat_interleave(GROUP, 1)[:n, :k]
        return _cast(_scaled(w, expanded), FP8_E4M3)
    if g == GROUP_128 and scheme.weight_format == INT4:
        k = w.shape[1]
        expanded = scale.float().repeat_interleave(GROUP, dim=-1)[..., :k]
        return pack_int4(_cast(_scaled(w, expanded), INT4))
    raise ValueError(f"scheme {scheme.name} has no weight quantizer")


def quantize_weight_streaming(w: torch.Tensor, scheme: Scheme, rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as quantize_weight(w.float(), scheme), converting `rows` rows at a time so
    the float32 temporaries stay small (a 13824x5120 layer would otherwise need ~1 GB of them)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n = w.shape[0]
    if scheme.weight_granularity == BLOCK_128:
        rows = max(GROUP, rows - rows % GROUP)
    if scheme.weight_granularity == PER_TENSOR:
        amax = torch.zeros((), dtype=torch.float32, device=w.device)
        for i in range(0, n, rows):
            amax = torch.maximum(amax, w[i:i + rows].abs().amax().float())
        scale = scale_from_amax(amax, scheme.weight_format).reshape(())
        q = torch.cat([_cast(_scaled(w[i:i + rows].float(), scale), scheme.weight_format) for i in range(0, n, rows)])
        return q, scale
    parts = [quantize_weight(w[i:i + rows].float(), scheme) for i in range(0, n, rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
