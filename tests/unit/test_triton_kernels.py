"""The pack's Triton kernels against quant/reference.py.

Without a GPU they run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET);
the same tests run compiled on the GPU machine (tests/gpu/test_kernel_backends.py adds the
DiT-sized shapes)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from quant import reference
from quant.backends import get_backend
from quant.kernels import few_rows_gemm, triton_gemm, triton_int4, triton_quant, triton_weight_only
from quant.schemes import get_scheme

DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
INT8, FP8 = reference.INT8, reference.FP8_E4M3


def _x(m, k, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * 3).to(dtype).to(DEV)


def _bf16_close(fast, ref):
    """Same quantized operands: only fp32 summation order and the final rounding may differ."""
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    tol = 2 ** -7 * ref.float().abs().amax().clamp(min=1e-6) + 1e-6
    assert float((fast.float() - ref.float()).abs().max()) <= float(tol)


# ------------------------------------------------------------------ activation quantization
@pytest.mark.parametrize("m,k", [(1, 64), (37, 300), (8, 1536), (3, 16500)])  # 16500: two-pass row
@pytest.mark.parametrize("fmt,dtype", [(INT8, torch.int8), (FP8, torch.float8_e4m3fn)])
def test_per_token_quant_equals_reference(m, k, fmt, dtype):
    x = _x(m, k)
    q, s = triton_quant.per_token_quant(x, dtype)
    rq, rs = reference.quantize_rowwise(x, fmt)
    assert q.dtype == dtype and s.shape == (m, 1) and s.dtype == torch.float32
    assert torch.equal(s, rs)
    assert torch.equal(q.float(), rq.float())


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.float32])
def test_per_token_quant_other_input_dtypes_and_zero_rows(in_dtype):
    x = _x(5, 256, in_dtype)
    x[2] = 0
    q, s = triton_quant.per_token_quant(x, torch.int8)
    rq, rs = reference.quantize_rowwise(x, INT8)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert float(s[2]) > 0 and not q[2].any()           # never a zero or NaN scale


def test_per_token_quant_reads_strided_rows_and_empty_input():
    big = _x(6, 512)
    view = big[:, :300]                                 # rows 512 apart, 300 wide
    q, s = triton_quant.per_token_quant(view, torch.int8)
    rq, rs = reference.quantize_rowwise(view, INT8)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    q, s = triton_quant.per_token_quant(_x(0, 64), torch.int8)
    assert q.shape == (0, 64) and s.shape == (0, 1)
    with pytest.raises(ValueError, match="2-D"):
        triton_quant.per_token_quant(_x(2, 64).reshape(2, 8, 8), torch.int8)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 700), magnitude=st.sampled_from([1e-3, 1.0, 300.0, 6e4]),
       seed=st.integers(0, 1000))
def test_per_token_quant_property(m, k, magnitude, seed):
    x = (_x(m, k, torch.float32, seed) * magnitude)
    for fmt, dtype in ((INT8, torch.int8), (FP8, torch.float8_e4m3fn)):
        q, s = triton_quant.per_token_quant(x, dtype)
        rq, rs = reference.quantize_rowwise(x, fmt)
        assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())


@pytest.mark.parametrize("m,k", [(1, 128), (9, 300), (4, 1536)])
def test_per_group_fp8_quant_equals_reference(m, k):
    x = _x(m, k)
    q, s = triton_quant.per_group_fp8_quant(x)
    rq, rs = reference.quantize_groupwise(x, FP8)
    assert s.shape == rs.shape and s.stride(0) == 1     # token-contiguous for the block GEMM
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())


# ------------------------------------------------------------------ GEMMs
@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
@pytest.mark.parametrize("m,k,n", [(1, 128, 64), (37, 300, 70), (64, 256, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_gemm_equals_reference(scheme_name, m, k, n, bias):
    _check_w8a8_gemm(scheme_name, m, k, n, bias)


def _check_w8a8_gemm(scheme_name, m, k, n, bias):
    scheme = get_scheme(scheme_name)
    x = _x(m, k)
    wq, ws = reference.quantize_weight(_x(n, k, torch.float32, 1), scheme)
    b = _x(1, n, seed=2)[0] if bias else None
    xq, xs = reference.quantize_activation(x, scheme)
    y = triton_gemm.w8a8_gemm(xq, xs, wq, ws, b, torch.bfloat16)
    _bf16_close(y, reference.emulated_linear(x, wq, ws, scheme, b, k))


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
@pytest.mark.parametrize("m,k,n", [(70, 256, 96), (33, 272, 48)])  # more tiles than programs; ragged K
def test_w8a8_hopper_kernels_equal_reference(monkeypatch, persistent, scheme_name, m, k, n):
    # The TMA kernels (plain and persistent) run on sm90; on CPU the interpreter runs them when asked.
    monkeypatch.setattr(triton_gemm, "INTERPRET_TMA", True)
    monkeypatch.setattr(triton_gemm, "PERSISTENT", persistent)
    _check_w8a8_gemm(scheme_name, m, k, n, bias=True)


@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
@pytest.mark.parametrize("m,k,n,bias", [(1, 256, 96, True), (5, 272, 70, False), (16, 384, 128, True)])
def test_few_rows_kernel_equals_reference(monkeypatch, scheme_name, m, k, n, bias):
    # Up to 16 tokens on Hopper: y^T = W x^T (ragged K and N read as zeros by the TMA unit).
    monkeypatch.setattr(triton_gemm, "INTERPRET_TMA", True)
    calls = []
    real = few_rows_gemm.gemm
    monkeypatch.setattr(few_rows_gemm, "gemm", lambda *a: calls.append(a[0].shape) or real(*a))
    _check_w8a8_gemm(scheme_name, m, k, n, bias=bias)
    assert calls == [(m, k)]


def test_few_rows_kernel_pipelines_deeper_where_each_sm_gets_one_slab():
    # Flux's single-block modulation (9216 rows: 144 slabs of 64 on an H100's 132 SMs) takes 6 K steps
    # in flight; its double-block one (18432 rows) and Wan's time projection (30720) keep 4.
    assert few_rows_gemm.stages(9216, 132) == few_rows_gemm.FEW_PROGRAMS_STAGES == 6
    assert few_rows_gemm.stages(18432, 132) == few_rows_gemm.stages(30720, 132) == few_rows_gemm.STAGES == 4
    assert few_rows_gemm.stages(64 * 263, 132) == 6 and few_rows_gemm.stages(64 * 264, 132) == 4


def test_few_rows_kernel_takes_up_to_16_tokens(monkeypatch):
    assert few_rows_gemm.applies(1) and few_rows_gemm.applies(16) and not few_rows_gemm.applies(17)
    monkeypatch.setattr(few_rows_gemm, "USE_KERNEL", False)  # QUANTDIT_FEW_ROWS_KERNEL=0
    assert not few_rows_gemm.applies(1)


WEIGHT_ONLY = ["int8-weight-only", "fp8-weight-only", "fp8-scaled", "fp8-e5m2-weight-only", "fp8-e5m2-scaled"]


@pytest.mark.parametrize("scheme_name", WEIGHT_ONLY)
@pytest.mark.parametrize("m,k,n", [(1, 384, 70), (3, 300, 40), (37, 300, 70), (64, 256, 96)])  # GEMV and MMA
@pytest.mark.parametrize("bias", [False, True])
def test_weight_only_gemm_equals_reference(scheme_name, m, k, n, bias):
    scheme = get_scheme(scheme_name)
    x = _x(m, k)
    wq, ws = reference.quantize_weight(_x(n, k, torch.float32, 1), scheme)
    b = _x(1, n, seed=2)[0] if bias else None
    y = triton_weight_only.weight_only_gemm(x, wq, ws, b)
    _bf16_close(y, reference.emulated_linear(x, wq, ws, scheme, b, k))


def test_weight_only_gemm_refuses_bad_input():
    wq, ws = reference.quantize_weight(_x(32, 128, torch.float32, 1), get_scheme("int8-weight-only"))
    with pytest.raises(ValueError, match="bf16/fp16"):
        triton_weight_only.weight_only_gemm(_x(2, 128, torch.float32), wq, ws, None)
    with pytest.raises(ValueError, match="do not match"):
        triton_weight_only.weight_only_gemm(_x(2, 64), wq, ws, None)
    with pytest.raises(ValueError, match="scale"):
        triton_weight_only.weight_only_gemm(_x(2, 128), wq, ws[:5], None)


def test_w8a8_gemm_float32_output_and_shape_errors():
    scheme = get_scheme("int8-w8a8")
    x = _x(16, 256, torch.float32)
    wq, ws = reference.quantize_weight(_x(32, 256, torch.float32, 1), scheme)
    xq, xs = reference.quantize_activation(x, scheme)
    y = triton_gemm.w8a8_gemm(xq, xs, wq, ws, None, torch.float32)
    ref = reference.emulated_linear(x, wq, ws, scheme, None, 256)
    assert y.dtype == torch.float32
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="do not match"):
        triton_gemm.w8a8_gemm(xq, xs, wq[:, :128], ws, None, torch.float32)


@pytest.mark.parametrize("m,k,n", [(5, 256, 128), (33, 300, 200), (64, 384, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_block_fp8_gemm_equals_reference(m, k, n, bias):
    scheme = get_scheme("fp8-block128")
    x = _x(m, k)
    wq, ws = reference.quantize_weight(_x(n, k, torch.float32, 3), scheme)
    b = _x(1, n, seed=4)[0] if bias else None
    xq, xs = triton_quant.per_group_fp8_quant(x)
    y = triton_gemm.block_fp8_gemm(xq, xs, wq, ws, b, torch.bfloat16)
    _bf16_close(y, reference.emulated_linear(x, wq, ws, scheme, b, k))
    # a row-major scale (the reference's layout) gives the same result
    y2 = triton_gemm.block_fp8_gemm(xq, xs.contiguous(), wq, ws, b, torch.bfloat16)
    assert torch.equal(y, y2)


@pytest.mark.parametrize("n,k", [(70, 301), (128, 256), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_dequant_equals_reference(n, k, dtype):
    scheme = get_scheme("int4-g128")
    wq, ws = reference.quantize_weight(_x(n, k, torch.float32, 5), scheme)
    w = triton_int4.dequantize_int4(wq, ws, k, dtype)
    assert w.dtype == dtype and w.shape == (n, k)
    ref = reference.dequantize_weight(wq, ws, scheme, k)
    if dtype == torch.float32:
        assert torch.equal(w, ref)
    else:  # within one bf16 rounding step (the CPU interpreter truncates where the GPU rounds)
        assert bool(((w.float() - ref).abs() <= ref.abs() * 2 ** -7).all())
    with pytest.raises(ValueError, match="input features"):
        triton_int4.dequantize_int4(wq, ws, k + 2, dtype)


# ------------------------------------------------------------------ the backend as the loader calls it
@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8", "fp8-block128", "int4-g128", *WEIGHT_ONLY])
def test_triton_backend_linear_matches_reference(scheme_name):
    scheme = get_scheme(scheme_name)
    x = _x(24, 384)
    wq, ws = reference.quantize_weight(_x(160, 384, torch.float32, 6), scheme)
    b = _x(1, 160, seed=7)[0]
    y = get_backend("triton").linear(x, wq, ws, b, scheme, 384)
    ref = reference.emulated_linear(x, wq, ws, scheme, b, 384)
    if scheme_name == "int4-g128":  # bf16 weight tile + bf16 GEMM: not bitwise, but close
        assert torch.nn.functional.cosine_similarity(y.float().flatten(), ref.float().flatten(), 0) > 0.9999
    else:
        _bf16_close(y, ref)


def test_triton_backend_refuses_schemes_it_has_no_kernel_for():
    with pytest.raises(ValueError, match="no kernel"):
        get_backend("triton").linear(_x(2, 128), torch.zeros(4, 128), torch.ones(4, 1), None,
                                     get_scheme("none"), 128)


class _CudaOperand:
    """Stands in for a CUDA tensor (none can exist on this machine): what hopper_ready reads."""
    is_cuda = True

    def get_device(self):
        return 0

    def stride(self, dim):
        return 3072

    def data_ptr(self):
        return 1 << 20


def test_hopper_kernels_are_chosen_on_nvidia_hopper_only(monkeypatch):
    monkeypatch.setattr(triton_gemm, "interpreted", lambda: False)
    monkeypatch.setattr(triton_gemm, "USE_TMA", True)
    monkeypatch.setattr(triton_gemm, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(triton_gemm, "ROCM", False)
    x, w = _CudaOperand(), _CudaOperand()
    assert triton_gemm.hopper_ready(x, w)
    monkeypatch.setattr(triton_gemm, "_capability", lambda index: (8, 9))
    assert not triton_gemm.hopper_ready(x, w), "an Ada GPU has no TMA"
    # An MI300 under a ROCm build of torch reports capability (9, 4).
    monkeypatch.setattr(triton_gemm, "_capability", lambda index: (9, 4))
    monkeypatch.setattr(triton_gemm, "ROCM", True)
    assert not triton_gemm.hopper_ready(x, w), "an AMD GPU took the Hopper kernels"
