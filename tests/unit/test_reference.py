"""Unit tests for quant/reference.py, the plain-torch ground truth every fast kernel is held to.

Error bounds are derived from the number formats, not measured:
- int8 / int4 (symmetric, round to nearest): |w - q*s| <= s/2 per element;
- fp8 e4m3 (3 mantissa bits, round to nearest): half an ulp, i.e. <= 2^-4 * |w| for values in the
  normal range, and <= s * 2^-10 below it (subnormal spacing in fp8 units is 2^-9);
- every bound gets a small float32 slack (the division w/s and the product q*s are each rounded).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import reference as R
from quant.schemes import (BLOCK_128, FP8_E4M3, FP8_E5M2, GROUP_128, INT4, INT8, PER_CHANNEL,
                           PER_TENSOR, get_scheme, list_schemes)

QUANTIZED = [s for s in list_schemes() if s.is_quantized]


def ids(scheme):
    return scheme.name


QMAX = {FP8_E4M3: 448.0, FP8_E5M2: 57344.0, INT8: 127.0, INT4: 7.0}
FP8_REL = 2.0 ** -4        # half ulp of a 3-bit mantissa, relative to the value
FP8_SUB_ABS = 2.0 ** -10   # half the subnormal spacing (2^-9), in units of the scale
F32_SLACK = 1e-5           # relative slack for float32 rounding in w/s and q*s


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def ceil128(n):
    return math.ceil(n / 128)


# ---------------------------------------------------------------- independent helpers
def full_scale(scale, scheme, n, k):
    """The scale that applies to each element of an [n, k] weight, by index arithmetic."""
    g = scheme.weight_granularity
    if g == PER_CHANNEL:
        return scale.float().reshape(n, 1).expand(n, k)
    if g == PER_TENSOR:
        return scale.float().reshape(1, 1).expand(n, k)
    rows, cols = torch.arange(n) // 128, torch.arange(k) // 128
    if g == BLOCK_128:
        return scale.float()[rows][:, cols]
    if g == GROUP_128:
        return scale.float()[:, cols]
    raise AssertionError(f"no bound known for granularity {g!r}; add one to this test")


def roundtrip_bound(w, s_full, fmt):
    """Largest |w - dequant(quant(w))| the format allows, per element."""
    w = w.float().abs()
    if fmt in (INT8, INT4):
        bound = s_full / 2
    elif fmt == FP8_E4M3:
        bound = torch.maximum(FP8_REL * w, FP8_SUB_ABS * s_full)
    elif fmt == FP8_E5M2:
        # 2-bit mantissa: half ulp is 2^-3 relative; subnormal spacing 2^-16, half of it 2^-17.
        bound = torch.maximum(2.0 ** -3 * w, 2.0 ** -17 * s_full)
    else:
        raise AssertionError(f"no bound known for format {fmt!r}")
    return bound * (1 + F32_SLACK) + F32_SLACK * w


def expected_scales(w, scheme):
    """amax / qmax for each quantization group, computed with plain slicing loops."""
    w = w.float().abs()
    n, k = w.shape
    qmax = QMAX[scheme.weight_format]
    g = scheme.weight_granularity
    if g == PER_CHANNEL:
        amax = w.amax(dim=1, keepdim=True)
    elif g == PER_TENSOR:
        amax = w.amax()
    elif g == GROUP_128:
        amax = torch.stack([w[:, j:j + 128].amax(dim=1) for j in range(0, k, 128)], dim=1)
    elif g == BLOCK_128:
        amax = torch.tensor([[w[i:i + 128, j:j + 128].amax().item() for j in range(0, k, 128)]
                             for i in range(0, n, 128)])
    else:
        raise AssertionError(g)
    return amax / qmax


def fake_quant_rows(t, fmt):
    """Symmetric per-row quantize + dequantize, written independently of quant/reference.py."""
    t = t.float()
    s = t.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / QMAX[fmt]
    v = t * s.reciprocal()  # the documented convention: multiply by the IEEE reciprocal
    if fmt == FP8_E4M3:
        q = v.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    elif fmt == FP8_E5M2:
        q = v.clamp(-57344, 57344).to(torch.float8_e5m2).float()
    else:
        q = v.round().clamp(-QMAX[fmt], QMAX[fmt])
    return q * s


def fake_quant_chunks(t, fmt, chunk=128):
    """Per-row quantization of each run of `chunk` columns (activation groups)."""
    return torch.cat([fake_quant_rows(t[:, j:j + chunk], fmt) for j in range(0, t.shape[1], chunk)], 1)


def manual_weight(w, scheme):
    """The dequantized weight each scheme should produce, from first principles."""
    fmt, g = scheme.weight_format, scheme.weight_granularity
    w = w.float()
    if g == PER_CHANNEL:
        return fake_quant_rows(w, fmt)
    if g == PER_TENSOR:
        return fake_quant_rows(w.reshape(1, -1), fmt).reshape(w.shape)
    if g == GROUP_128:
        return fake_quant_chunks(w, fmt)
    if g == BLOCK_128:
        out = torch.empty_like(w)
        for i in range(0, w.shape[0], 128):
            for j in range(0, w.shape[1], 128):
                tile = w[i:i + 128, j:j + 128]
                out[i:i + 128, j:j + 128] = fake_quant_rows(tile.reshape(1, -1), fmt).reshape(tile.shape)
        return out
    raise AssertionError(g)


def manual_activation(x2d, scheme):
    if scheme.activation_granularity == GROUP_128:
        return fake_quant_chunks(x2d, scheme.activation_format)
    return fake_quant_rows(x2d, scheme.activation_format)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def check_weight(w, scheme):
    """Quantize w and check dtype, shapes, scales and the per-element round-trip bound."""
    n, k = w.shape
    q, s = R.quantize_weight(w, scheme)
    g = scheme.weight_granularity

    assert s.dtype == torch.float32
    assert torch.isfinite(s).all() and (s > 0).all()
    if scheme.weight_format == INT4:
        assert q.dtype == torch.uint8 and q.shape == (n, math.ceil(k / 2))
        assert s.shape == (n, ceil128(k))
        unpacked = R.unpack_int4(q, k)
        assert unpacked.shape == (n, k)
        assert unpacked.min() >= -7 and unpacked.max() <= 7  # symmetric: -8 is never produced
        if k % 2:  # the padding nibble of an odd row must be zero
            assert (q[:, -1] >> 4 == 0).all()
    else:
        assert q.shape == (n, k)
        if scheme.weight_format == INT8:
            assert q.dtype == torch.int8
            assert q.min() >= -127  # symmetric range, -128 unused
        else:
            assert q.dtype == {FP8_E4M3: torch.float8_e4m3fn, FP8_E5M2: torch.float8_e5m2}[scheme.weight_format]
            assert not torch.isnan(q.float()).any()  # e4m3fn overflows to NaN: scale must prevent it
        expected_shape = {PER_CHANNEL: (n, 1), PER_TENSOR: (), BLOCK_128: (ceil128(n), ceil128(k))}[g]
        assert s.shape == expected_shape

    # Scales are amax/qmax of each group (the tiniest positive value for an all-zero group).
    exp = expected_scales(w, scheme)
    nonzero = exp > 0
    torch.testing.assert_close(s[nonzero], exp[nonzero], rtol=1e-6, atol=0)
    assert (s[~nonzero] < 1e-9).all()

    dq = R.dequantize_weight(q, s, scheme, k)
    assert dq.dtype == torch.float32 and dq.shape == (n, k)
    err = (w.float() - dq).abs()
    bound = roundtrip_bound(w, full_scale(s, scheme, n, k), scheme.weight_format)
    worst = (err - bound).max().item()
    assert worst <= 0, f"{scheme.name}: round-trip error exceeds bound by {worst}"
    return q, s, dq


# ---------------------------------------------------------------- round trip per scheme
@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
@pytest.mark.parametrize("n,k", [(64, 512), (130, 256), (7, 200), (3, 1), (5, 129), (257, 300)])
def test_roundtrip_bound_and_shapes(scheme, n, k):
    check_weight(randn(n, k, seed=n * 1000 + k), scheme)


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_roundtrip_is_tight(scheme):
    # The group maximum maps exactly to the format's largest value, so it survives the round
    # trip (up to float32 rounding) and the bound above is not trivially loose.
    w = randn(32, 256, seed=1) * 3
    q, s, dq = check_weight(w, scheme)
    i = w.abs().argmax()
    assert abs(dq.flatten()[i] - w.flatten()[i]) <= 1e-5 * w.abs().max()
    # And quantization does lose information (a no-op quantizer would pass the bound).
    assert (dq != w).any()


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
def test_roundtrip_over_magnitudes(scheme, magnitude):
    check_weight(randn(40, 300, seed=2) * magnitude, scheme)


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roundtrip_from_half_precision_weight(scheme, dtype):
    check_weight(randn(48, 200, seed=3, dtype=dtype), scheme)


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_outlier_only_coarsens_its_own_group(scheme):
    # A huge w[0, 0] sets the scale of its own group (row, tile or 128-group) and no other.
    w = randn(200, 300, seed=4)
    w[0, 0] = 1e4
    q, s, dq = check_weight(w, scheme)
    qmax = QMAX[scheme.weight_format]
    flat = s.flatten()  # the group holding w[0, 0] comes first in every layout
    assert flat[0].item() == pytest.approx(1e4 / qmax, rel=1e-6)
    if scheme.weight_granularity != PER_TENSOR:
        assert flat[1:].max() < 10 / qmax  # gaussian groups: amax well under 10


# ---------------------------------------------------------------- edge cases
@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_all_zero_rows(scheme):
    w = randn(6, 200, seed=5)
    w[[1, 4]] = 0.0
    q, s, dq = check_weight(w, scheme)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert not torch.isnan(dq).any()
    assert (dq[[1, 4]] == 0).all()


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_all_zero_weight(scheme):
    w = torch.zeros(3, 129)
    q, s, dq = check_weight(w, scheme)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(dq, w)
    x = randn(4, 129, seed=6)
    assert torch.equal(R.emulated_linear(x, q, s, scheme), torch.zeros(4, 3))


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_zero_last_group(scheme):
    # K=200: the short last group (72 columns) is all zero while the first is not.
    w = randn(4, 200, seed=7)
    w[:, 128:] = 0
    q, s, dq = check_weight(w, scheme)
    assert (dq[:, 128:] == 0).all()


@pytest.mark.parametrize("k", [1, 3, 127, 129, 200, 255])
def test_int4_odd_and_ragged_k(k):
    scheme = get_scheme("int4-g128")
    w = randn(9, k, seed=k)
    q, s, _ = check_weight(w, scheme)
    # The short last group gets its own scale from its own columns only.
    last = w[:, (ceil128(k) - 1) * 128:].abs().amax(dim=1) / 7
    torch.testing.assert_close(s[:, -1], last, rtol=1e-6, atol=0)


def test_pack_unpack_all_int4_pairs():
    vals = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(vals, vals)  # [256, 2]: every (even, odd) column combination
    packed = R.pack_int4(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert packed.unique().numel() == 256  # injective
    assert torch.equal(R.unpack_int4(packed, 2), pairs)


@pytest.mark.parametrize("k", [1, 3, 15, 16, 17])
def test_pack_unpack_round_trip_any_k(k):
    vals = torch.arange(-8, 8, dtype=torch.int8)
    q = vals[torch.randint(0, 16, (16, k), generator=torch.Generator().manual_seed(k))]
    q[0, :] = vals[torch.arange(k) % 16]  # every value appears
    packed = R.pack_int4(q)
    assert packed.shape == (16, math.ceil(k / 2))
    assert torch.equal(R.unpack_int4(packed, k), q)


def test_pack_int4_nibble_order():
    # Documented layout: even column in the low nibble, two's complement.
    packed = R.pack_int4(torch.tensor([[1, 2], [-1, 0], [-8, 7], [5, 0]], dtype=torch.int8))
    assert packed.flatten().tolist() == [0x21, 0x0F, 0x78, 0x05]
    odd = R.pack_int4(torch.tensor([[3, -2, 6]], dtype=torch.int8))
    assert odd.flatten().tolist() == [0xE3, 0x06]  # padding nibble is zero


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_raises(scheme, bad):
    w = randn(4, 64, seed=8)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        R.quantize_weight(w, scheme)


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_non_2d_weight_raises(scheme):
    with pytest.raises(ValueError, match="2-D"):
        R.quantize_weight(randn(2, 4, 64), scheme)


def test_unquantized_scheme_has_no_quantizer():
    with pytest.raises(ValueError, match="none"):
        R.quantize_weight(randn(4, 64), get_scheme("none"))


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_wrong_in_features_raises(scheme):
    w = randn(16, 256, seed=9)
    q, s = R.quantize_weight(w, scheme)
    x = randn(3, 256, seed=10)
    R.emulated_linear(x, q, s, scheme, in_features=256)  # the right value is accepted
    with pytest.raises(ValueError):
        R.emulated_linear(x, q, s, scheme, in_features=255)
    with pytest.raises(ValueError):
        R.emulated_linear(x, q, s, scheme, in_features=384)


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
@pytest.mark.parametrize("x_features", [200, 384])
def test_input_features_not_matching_weight_raise(scheme, x_features):
    # An input whose width differs from the weight's must be an error, never a silent result
    # computed against a truncated weight.
    w = randn(16, 256, seed=11)
    q, s = R.quantize_weight(w, scheme)
    x = randn(3, x_features, seed=12)
    with pytest.raises(ValueError):
        R.emulated_linear(x, q, s, scheme)
    with pytest.raises(ValueError):
        R.emulated_linear(x, q, s, scheme, in_features=x_features)


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_dequantize_weight_checks_in_features(scheme):
    q, s = R.quantize_weight(randn(8, 256, seed=13), scheme)
    assert R.dequantize_weight(q, s, scheme, 256).shape == (8, 256)
    with pytest.raises(ValueError):
        R.dequantize_weight(q, s, scheme, 130)


# ---------------------------------------------------------------- emulated_linear
@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_bias(scheme):
    w, x, b = randn(24, 200, seed=14), randn(5, 200, seed=15), randn(24, seed=16) * 10
    q, s = R.quantize_weight(w, scheme)
    y0 = R.emulated_linear(x, q, s, scheme)
    y1 = R.emulated_linear(x, q, s, scheme, bias=b)
    torch.testing.assert_close(y1, y0 + b, rtol=1e-6, atol=1e-5)
    assert (y1 - y0).abs().min() > 0  # the bias is actually applied to every output


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
@pytest.mark.parametrize("lead", [(2, 3), (2, 3, 4), (1, 1, 1)])
def test_leading_dims_match_flattened_call(scheme, lead):
    w, b = randn(40, 200, seed=17), randn(40, seed=18)
    x = randn(*lead, 200, seed=19)
    q, s = R.quantize_weight(w, scheme)
    y = R.emulated_linear(x, q, s, scheme, bias=b)
    assert y.shape == (*lead, 40)
    flat = R.emulated_linear(x.reshape(-1, 200), q, s, scheme, bias=b)
    # Per-token / per-group activation scales are row-local, so the reshape changes nothing.
    torch.testing.assert_close(y.reshape(-1, 40), flat, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(scheme, dtype):
    w, b = randn(32, 200, seed=20), randn(32, seed=21)
    x = randn(2, 6, 200, seed=22, dtype=dtype)
    q, s = R.quantize_weight(w, scheme)
    y = R.emulated_linear(x, q, s, scheme, bias=b.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 6, 32)
    # The math runs in float32 and only the result is rounded to the input dtype.
    ref = R.emulated_linear(x.float(), q, s, scheme, bias=b.to(dtype).float())
    assert torch.equal(y, ref.to(dtype))


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_float32_input_keeps_float32(scheme):
    q, s = R.quantize_weight(randn(8, 64, seed=23), scheme)
    assert R.emulated_linear(randn(3, 64, seed=24), q, s, scheme).dtype == torch.float32


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_accuracy_against_float32(scheme):
    w, x = randn(384, 512, seed=25), randn(64, 512, seed=26)
    q, s = R.quantize_weight(w, scheme)
    y = R.emulated_linear(x, q, s, scheme)
    ref = x @ w.t()
    # 8-bit formats keep ~3+ significant bits per operand: cos >= 0.999; int4 keeps ~3 bits of a
    # 16-level grid, so 0.99.
    threshold = {INT4: 0.99, FP8_E5M2: 0.998}.get(scheme.weight_format, 0.999)
    assert cosine(y, ref) >= threshold


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
def test_emulated_matches_manual_dequant_matmul(scheme):
    w, x = randn(96, 300, seed=27), randn(20, 300, seed=28) * 2
    q, s = R.quantize_weight(w, scheme)
    y = R.emulated_linear(x, q, s, scheme)
    wdq = manual_weight(w, scheme)
    xdq = manual_activation(x, scheme) if scheme.quantizes_activation else x
    expected = xdq @ wdq.t()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    if scheme.quantizes_activation:
        # The activation really is quantized: using x as it is gives a clearly different answer.
        unquantized_x = x @ wdq.t()
        assert (y - unquantized_x).abs().max() > 100 * 1e-4


@pytest.mark.parametrize("w8a8,weight_only", [("int8-w8a8", "int8-weight-only"),
                                              ("fp8-w8a8", "fp8-weight-only")])
def test_w8a8_differs_from_weight_only_with_same_weight(w8a8, weight_only):
    a, b = get_scheme(w8a8), get_scheme(weight_only)
    w, x = randn(128, 256, seed=29), randn(16, 256, seed=30)
    qa, sa = R.quantize_weight(w, a)
    qb, sb = R.quantize_weight(w, b)
    assert torch.equal(qa.float(), qb.float()) and torch.equal(sa, sb)  # same stored weight
    ya, yb = R.emulated_linear(x, qa, sa, a), R.emulated_linear(x, qb, sb, b)
    assert (ya - yb).abs().max() > 1e-2  # only activation quantization can explain this
    assert cosine(ya, yb) > 0.999


def test_activation_quantization_shapes():
    x = randn(10, 200, seed=31)
    q, s = R.quantize_activation(x, get_scheme("int8-w8a8"))
    assert q.dtype == torch.int8 and q.shape == (10, 200) and s.shape == (10, 1)
    q, s = R.quantize_activation(x, get_scheme("fp8-w8a8"))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (10, 1)
    q, s = R.quantize_activation(x, get_scheme("fp8-block128"))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (10, 200) and s.shape == (10, 2)
    with pytest.raises(ValueError):
        R.quantize_activation(x, get_scheme("int8-weight-only"))


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
@pytest.mark.parametrize("n,k", [(64, 512), (3, 1), (130, 200)])
def test_weight_nbytes_matches_tensors(scheme, n, k):
    q, s = R.quantize_weight(randn(n, k, seed=32), scheme)
    actual = q.numel() * q.element_size() + s.numel() * s.element_size()
    assert R.weight_nbytes(n, k, scheme) == actual


# ---------------------------------------------------------------- property-based
@st.composite
def weights(draw):
    n = draw(st.integers(1, 300))
    k = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    magnitude = 10.0 ** draw(st.floats(-3, 3))
    w = randn(n, k, seed=seed) * magnitude
    if draw(st.booleans()):  # sometimes zero a row and a column stripe
        w[draw(st.integers(0, n - 1))] = 0
        w[:, draw(st.integers(0, k - 1)):][:, :128] = 0
    return w


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
@settings(max_examples=40, deadline=None)
@given(w=weights())
def test_property_roundtrip(scheme, w):
    check_weight(w, scheme)


@pytest.mark.parametrize("scheme", QUANTIZED, ids=ids)
@settings(max_examples=25, deadline=None)
@given(w=weights(), tokens=st.integers(1, 8), seed=st.integers(0, 1000))
def test_property_emulated_matches_manual(scheme, w, tokens, seed):
    n, k = w.shape
    x = randn(tokens, k, seed=seed)
    q, s = R.quantize_weight(w, scheme)
    y = R.emulated_linear(x, q, s, scheme, in_features=k)
    assert y.shape == (tokens, n) and torch.isfinite(y).all()
    xdq = manual_activation(x, scheme) if scheme.quantizes_activation else x
    expected = xdq @ manual_weight(w, scheme).t()
    tol = 1e-4 * (xdq.abs() @ w.abs().t()).max().item() + 1e-30  # float32 reassociation
    assert (y - expected).abs().max().item() <= tol


@pytest.mark.parametrize("scheme", [s for s in list_schemes() if s.is_quantized], ids=lambda s: s.name)
@pytest.mark.parametrize("n,k,rows", [(700, 300, 256), (129, 64, 128), (5, 7, 2), (300, 257, 1)])
def test_streaming_quantization_equals_whole_tensor(scheme, n, k, rows):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).to(torch.bfloat16)
    q1, s1 = R.quantize_weight(w.float(), scheme)
    q2, s2 = R.quantize_weight_streaming(w, scheme, rows=rows)
    as_bytes = (lambda t: t.view(torch.uint8)) if q1.dtype == torch.float8_e4m3fn else (lambda t: t)
    assert torch.equal(as_bytes(q1), as_bytes(q2)) and torch.equal(s1, s2)
