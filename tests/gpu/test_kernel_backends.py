"""Every kernel backend present on the GPU machine against quant/reference.py, at DiT shapes.

Set QUANTDIT_EXPECT_BACKENDS (comma list) to the backends that must be available there: a
missing one fails instead of being left out quietly. The README's GPU command sets it."""
import gc
import os
import sys

import pytest
import torch

from quant import reference
from quant.backends import (get_backend, list_backends, pick_backend, pick_kernels, quantized_linear, triton_backend,
                            vllm_backend, why_not)
from quant.kernels import few_rows_gemm, gluon_gemm, launch, triton_gemm, triton_int4, triton_quant, triton_weight_only
from quant.schemes import get_scheme

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
W8A8 = ["fp8-w8a8", "int8-w8a8", "fp8-block128"]
ALL = W8A8 + ["int4-g128"]
SHAPES = [(512, 5120, 5120), (4096, 3072, 12288), (77, 1536, 8960), (333, 384, 256)]
# backend -> schemes it must run when it is expected here
_CLAIMED = {"triton": ALL, "vllm": ALL, "comfy-kitchen": ["int8-w8a8"], "torchao": ["fp8-w8a8"],
            "sgl-kernel": ["int8-w8a8", "fp8-w8a8"], "deep-gemm": ["fp8-block128"],
            "torch": ["fp8-w8a8"]}
EXPECTED = [b for b in os.environ.get("QUANTDIT_EXPECT_BACKENDS", "triton").split(",") if b]


def ranked_first(candidates, scheme_name):
    """What `auto` should pick: the first of `candidates` expected or able to run here, else
    Triton. A backend installed but left out of QUANTDIT_EXPECT_BACKENDS still wins `auto`."""
    scheme = get_scheme(scheme_name)
    return next((b for b in candidates if b in EXPECTED or why_not(b, scheme, DEV) is None), "triton")


def best_w8a8():
    """What `auto` ranks first for per-token W8A8 here."""
    return ranked_first(("vllm", "sgl-kernel"), "int8-w8a8")


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), 0))


def test_expected_backends_are_available_here():
    listed = list_backends()
    print({k: v or "available" for k, v in listed.items()})
    for name in EXPECTED:
        assert listed[name] is None, f"{name}: {listed[name]}"


@pytest.mark.parametrize("m,k", [(32760, 5120), (4096, 13824), (7, 20000), (1, 64)])
@pytest.mark.parametrize("dtype,fmt", [(torch.int8, reference.INT8), (torch.float8_e4m3fn, reference.FP8_E4M3)])
def test_triton_per_token_quant_is_exact_on_gpu(m, k, dtype, fmt):
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16) * 4
    q, s = triton_quant.per_token_quant(x, dtype)
    rq, rs = reference.quantize_rowwise(x, fmt)
    assert torch.equal(s, rs)
    assert torch.equal(q.float(), rq.float())


@pytest.mark.parametrize("m,p,g,width", [(4608, 3072, 12288, 21504), (32760, 0, 13824, 13824), (7, 64, 20000, 20100)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("magnitude", [3.0, 0.05])  # 0.05: no GELU output above |its minimum|
def test_gelu_quantizer_equals_torch_gelu_cat_then_quant_on_gpu(m, p, g, width, dtype, in_dtype, magnitude):
    """Flux's single-block tail (a strided slice of linear1's output, after the attention output),
    Wan's FFN, and a long row: bit-equal to torch's GELU + cat + the per-token quantizer."""
    produced = torch.randn(m, width, device=DEV, dtype=in_dtype) * magnitude
    x = produced[:, width - g:]
    prefix = torch.randn(m, p, device=DEV, dtype=in_dtype) * magnitude if p else None
    q, s = triton_quant.per_token_quant_gelu(prefix, x, dtype)
    act = torch.nn.functional.gelu(x, approximate="tanh")
    rq, rs = triton_quant.per_token_quant(act if prefix is None else torch.cat((prefix, act), 1), dtype)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("backend", ["triton", "vllm", "sgl-kernel"])
@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
def test_backends_take_a_deferred_gelu_on_gpu(backend, scheme_name):
    from quant.deferred import DeferredActivation
    scheme = get_scheme(scheme_name)
    if why_not(backend, scheme, DEV):
        pytest.skip(f"{backend}: {why_not(backend, scheme, DEV)}")
    m, p, g, n = 4608, 3072, 12288, 3072
    pre = torch.randn(m, 21504, device=DEV, dtype=torch.bfloat16)[:, 9216:]
    attn = torch.randn(m, p, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, p + g, device=DEV) / (p + g) ** 0.5
    qdata, scale = reference.quantize_weight(w, scheme)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16) * 0.02
    linear = get_backend(backend).linear
    y = linear(DeferredActivation(pre, attn), qdata, scale, bias, scheme, p + g)
    full = torch.cat((attn, torch.nn.functional.gelu(pre, approximate="tanh")), 1)
    if backend == "triton":  # the same quantizer output, so the same GEMM result
        assert torch.equal(y, linear(full, qdata, scale, bias, scheme, p + g))
    else:  # the Triton quantizer feeding the provider's GEMM: as close to bf16 as its own path
        ref = torch.nn.functional.linear(full, reference.dequantize_weight(qdata, scale, scheme, p + g).to(full.dtype),
                                         bias)
        assert cos(y, ref) >= 0.9995 and cos(linear(full, qdata, scale, bias, scheme, p + g), ref) >= 0.9995


@pytest.mark.parametrize("backend", ["triton", "vllm", "sgl-kernel"])
@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
@pytest.mark.parametrize("m", [4096, 512, 1])
def test_backends_take_shared_quantized_rows_on_gpu(backend, scheme_name, m):
    # What Wan's k and v get from q (nodes/shared_quant.py): the rows the backend's own quantizer
    # made, giving exactly what the layer computes from the activation itself.
    from quant.shared_quant import QuantizedRows
    scheme = get_scheme(scheme_name)
    if why_not(backend, scheme, DEV):
        pytest.skip(f"{backend}: {why_not(backend, scheme, DEV)}")
    x = torch.randn(m, 5120, device=DEV, dtype=torch.bfloat16)
    qdata, scale = reference.quantize_weight(torch.randn(5120, 5120, device=DEV) / 5120 ** 0.5, scheme)
    bias = torch.randn(5120, device=DEV, dtype=torch.bfloat16) * 0.02
    b = get_backend(backend)
    rows = QuantizedRows(*b.row_quantizer(x, scheme), x.dtype)
    assert torch.equal(b.linear(rows, qdata, scale, bias, scheme, 5120), b.linear(x, qdata, scale, bias, scheme, 5120))


def test_triton_group_quant_and_int4_dequant_are_exact_on_gpu():
    x = torch.randn(4096, 3072, device=DEV, dtype=torch.bfloat16)
    q, s = triton_quant.per_group_fp8_quant(x)
    rq, rs = reference.quantize_groupwise(x, reference.FP8_E4M3)
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())
    scheme = get_scheme("int4-g128")
    wq, ws = reference.quantize_weight(torch.randn(3072, 12288 + 40, device=DEV), scheme)
    w = triton_int4.dequantize_int4(wq, ws, 12288 + 40, torch.bfloat16)
    assert torch.equal(w, reference.dequantize_weight(wq, ws, scheme, 12288 + 40).to(torch.bfloat16))


@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_triton_own_w8a8_gemm_matches_reference(scheme_name, m, k, n):
    scheme = get_scheme(scheme_name)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    wq, ws = reference.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5, scheme)
    b = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    xq, xs = reference.quantize_activation(x, scheme)
    y = triton_gemm.w8a8_gemm(xq, xs, wq, ws, b, torch.bfloat16)
    ref = reference.emulated_linear(x, wq, ws, scheme, b, k)
    assert cos(y, ref) > 0.99999
    assert float((y.float() - ref.float()).abs().max()) <= 0.01 * float(ref.float().abs().max())


@pytest.mark.parametrize("persistent,gluon", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
@pytest.mark.parametrize("m,k,n", [(2, 3072, 18432), (4608, 15360, 3072), (32760, 5120, 5120)])
def test_triton_hopper_kernels_match_reference(monkeypatch, persistent, gluon, scheme_name, m, k, n):
    monkeypatch.setattr(few_rows_gemm, "USE_KERNEL", False)  # the general kernels at 2 rows too
    monkeypatch.setattr(triton_gemm, "PERSISTENT", persistent)
    monkeypatch.setattr(triton_gemm, "USE_GLUON", gluon)
    scheme = get_scheme(scheme_name)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    wq, ws = reference.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5, scheme)
    xq, xs = reference.quantize_activation(x, scheme)
    y = triton_gemm.w8a8_gemm(xq, xs, wq, ws, None, torch.bfloat16)
    ref = reference.emulated_linear(x, wq, ws, scheme, None, k)
    assert cos(y, ref) > 0.99999
    if scheme_name == "int8-w8a8":  # int32 accumulation is exact
        assert float((y.float() - ref.float()).abs().max()) <= 0.01 * float(ref.float().abs().max())
    else:
        # Hopper's fast fp8 accumulation: its error must be noise next to the fp8 quantization
        # error, measured against the unquantized product.
        full = x.float() @ reference.dequantize_weight(wq, ws, scheme, k).float().t()
        assert rel_err(y, full) <= 1.01 * rel_err(ref, full), (rel_err(y, full), rel_err(ref, full))


def rel_err(y, full):
    return float((y.float() - full).norm() / full.norm())


def _count_gluon_calls(monkeypatch) -> list:
    calls = []
    real = gluon_gemm.int8_gemm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(gluon_gemm, "int8_gemm", counted)
    return calls


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("m,k,n", [(4096, 3072, 3072), (1000, 3200, 3008), (77, 1536, 8960), (1, 5120, 5120),
                                   (512, 640, 384), (4608, 15360, 3072)])
def test_gluon_int8_gemm_is_exact_and_used_on_hopper(monkeypatch, m, k, n, with_bias, out_dtype):
    """int8 W8A8 on Hopper runs the Gluon kernel (async MMAs); int32 accumulation is exact, so it
    matches the reference up to the output rounding, at odd shapes, with and without bias."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the Gluon kernel is Hopper-only")
    assert triton_gemm.gluon_failure is None, triton_gemm.gluon_failure
    monkeypatch.setattr(few_rows_gemm, "USE_KERNEL", False)  # one token too
    calls = _count_gluon_calls(monkeypatch)
    scheme = get_scheme("int8-w8a8")
    x = torch.randn(m, k, device=DEV, dtype=out_dtype)
    wq, ws = reference.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5, scheme)
    b = torch.randn(n, device=DEV, dtype=out_dtype) if with_bias else None
    xq, xs = reference.quantize_activation(x, scheme)
    y = triton_gemm.w8a8_gemm(xq, xs, wq, ws, b, out_dtype)
    exact = (xq.float() @ wq.float().t()) * xs.float().reshape(-1, 1) * ws.float().reshape(1, -1)
    if b is not None:
        exact += b.float()
    assert calls == [(m, k)]
    assert y.dtype == out_dtype
    assert float((y.float() - exact).abs().max()) <= 2 ** -7 * float(exact.abs().max())
    assert rel_err(y, exact) < 4e-3


@pytest.mark.parametrize("config", gluon_gemm.configs(), ids=lambda c: "-".join(f"{v}" for v in c.kwargs.values()))
@pytest.mark.parametrize("m,k,n", [(4096, 3072, 3072), (1000, 3200, 3008), (1, 5120, 5120), (512, 640, 384),
                                   (2000, 1536, 136)])
def test_every_gluon_config_is_exact(config, m, k, n):
    """Each schedule and tile the autotuner may pick, not only the one it picks here: ping-pong
    with an odd tile count per program (one warpgroup takes one more tile), one row, K=640."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the Gluon kernel is Hopper-only")
    torch.manual_seed(m + n)
    xq = torch.randint(-127, 128, (m, k), device=DEV, dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), device=DEV, dtype=torch.int8)
    a_s, b_s = torch.rand(m, device=DEV) / 100, torch.rand(n, device=DEV) / 100
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    y = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)
    gluon_gemm.int8_gemm_with(config, xq, a_s, wq, b_s, bias, y, torch.cuda.get_device_properties(DEV).multi_processor_count)
    exact = (xq.double() @ wq.double().t()) * a_s.double()[:, None] * b_s.double()[None, :] + bias.double()
    assert not y.isnan().any(), "some output tiles were never written"
    assert float((y.double() - exact).abs().max()) <= 2 ** -8 * float(exact.abs().max())


def test_gluon_relaunch_skips_the_launcher_and_gives_the_same_result(monkeypatch):
    """A call shaped like an earlier one reuses the compiled kernel and config chosen then (fewer
    microseconds of host time per linear); shapes, bias and output dtype still pick their own."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the Gluon kernel is Hopper-only")
    monkeypatch.setattr(gluon_gemm, "_chosen", {})
    launcher_calls = []
    real = gluon_gemm._launcher

    def counted(pingpong):
        launcher_calls.append(pingpong)
        return real(pingpong)
    monkeypatch.setattr(gluon_gemm, "_launcher", counted)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    for m, k, n, with_bias, dtype in [(4096, 3072, 3072, False, torch.bfloat16), (77, 3072, 3072, False, torch.bfloat16),
                                      (4096, 3072, 3072, True, torch.bfloat16), (4096, 3072, 3072, True, torch.float16)]:
        xq = torch.randint(-127, 128, (m, k), device=DEV, dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), device=DEV, dtype=torch.int8)
        a_s, b_s = torch.rand(m, device=DEV) / 100, torch.rand(n, device=DEV) / 100
        bias = torch.randn(n, device=DEV, dtype=dtype) if with_bias else None
        first = gluon_gemm.int8_gemm(xq, a_s, wq, b_s, bias, torch.empty(m, n, device=DEV, dtype=dtype),
                                     triton_gemm._m_bucket(m), sms)
        before = len(launcher_calls)
        again = gluon_gemm.int8_gemm(xq, a_s, wq, b_s, bias, torch.empty(m, n, device=DEV, dtype=dtype),
                                     triton_gemm._m_bucket(m), sms)
        assert len(launcher_calls) == before, "the second call went through the Launcher again"
        assert torch.equal(first, again)
        exact = (xq.double() @ wq.double().t()) * a_s.double()[:, None] * b_s.double()[None, :]
        if bias is not None:
            exact += bias.double()
        assert float((again.double() - exact).abs().max()) <= 2 ** -8 * float(exact.abs().max())
    assert len(gluon_gemm._chosen) == 4 and len(launcher_calls) == 4


def test_fp8_persistent_relaunch_skips_the_launcher_and_gives_the_same_result(monkeypatch):
    """fp8 on Hopper: a call shaped like an earlier one relaunches the persistent kernel and config
    chosen then, without the Launcher; shapes, bias and output dtype still pick their own."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the persistent TMA kernel is Hopper-only")
    monkeypatch.setattr(triton_gemm, "_persistent_chosen", {})
    real = triton_gemm._w8a8_persistent_launch
    launcher_calls = []

    class Counted:
        def __call__(self, *args, **kwargs):
            launcher_calls.append(args[1:4])
            return real(*args, **kwargs)

        def chosen(self, *args):
            return real.chosen(*args)
    monkeypatch.setattr(triton_gemm, "_w8a8_persistent_launch", Counted())
    scheme = get_scheme("fp8-w8a8")
    for m, k, n, with_bias, dtype in [(4096, 3072, 3072, False, torch.bfloat16), (77, 3072, 3072, False, torch.bfloat16),
                                      (4096, 3072, 3072, True, torch.bfloat16), (4096, 3072, 3072, True, torch.float16)]:
        x = torch.randn(m, k, device=DEV, dtype=dtype)
        wq, ws = reference.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5, scheme)
        bias = torch.randn(n, device=DEV, dtype=dtype) if with_bias else None
        xq, xs = reference.quantize_activation(x, scheme)
        first = triton_gemm.w8a8_gemm(xq, xs, wq, ws, bias, dtype)
        before = len(launcher_calls)
        again = triton_gemm.w8a8_gemm(xq, xs, wq, ws, bias, dtype)
        assert len(launcher_calls) == before, "the second call went through the Launcher again"
        assert torch.equal(first, again)
        ref = reference.emulated_linear(x, wq, ws, scheme, bias, k)
        assert cos(again, ref) > 0.99999
    assert len(triton_gemm._persistent_chosen) == 4 and len(launcher_calls) == 4


def test_gluon_build_failure_falls_back_to_the_triton_kernel(monkeypatch, caplog):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the Gluon kernel is Hopper-only")

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed (as a future Triton might)")
    monkeypatch.setattr(gluon_gemm, "int8_gemm", broken)
    monkeypatch.setattr(triton_gemm, "gluon_failure", None)
    scheme = get_scheme("int8-w8a8")
    x = torch.randn(256, 3072, device=DEV, dtype=torch.bfloat16)
    wq, ws = reference.quantize_weight(torch.randn(1024, 3072, device=DEV) / 3072 ** 0.5, scheme)
    xq, xs = reference.quantize_activation(x, scheme)
    with caplog.at_level("WARNING", logger="quantdit"):
        y = triton_gemm.w8a8_gemm(xq, xs, wq, ws, None, torch.bfloat16)
    assert "PassManager::run failed" in triton_gemm.gluon_failure
    assert "Gluon int8 GEMM does not build" in caplog.text
    ref = reference.emulated_linear(x, wq, ws, scheme, None, 3072)
    assert cos(y, ref) > 0.99999


@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
def test_direct_launch_equals_triton_launch(monkeypatch, scheme_name):
    """The cached compiled-kernel launch (quant/kernels/launch.py) gives what Triton's own launch
    gives, bit for bit, as the token count changes its specialization (multiples of 16 or not,
    one row) and back."""
    scheme = get_scheme(scheme_name)
    k, n = 3072, 3072
    wq, ws = reference.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5, scheme)
    b = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    backend = get_backend("triton")
    for m in (4096, 4097, 17, 1, 4096, 4097):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        monkeypatch.setattr(launch, "DIRECT", True)
        direct = [backend.linear(x, wq, ws, b, scheme, k) for _ in range(2)]  # the second call is cached
        monkeypatch.setattr(launch, "DIRECT", False)
        through_triton = backend.linear(x, wq, ws, b, scheme, k)
        assert torch.equal(direct[0], through_triton) and torch.equal(direct[1], through_triton), m
    if scheme_name == "int8-w8a8" and torch.cuda.get_device_capability() >= (9, 0):
        assert gluon_gemm._launcher(gluon_gemm.USE_PINGPONG).cache, "the Gluon kernel's launches skipped the compiled-kernel cache"
    else:
        assert triton_gemm._w8a8_persistent_launch.cache, "no launch went through the compiled-kernel cache"
    assert triton_quant._per_token_launch.by_key, "the quant kernel's launches skipped the keyed cache"
    if torch.cuda.get_device_capability() >= (9, 0):
        assert few_rows_gemm._launch.by_key, "the one-row GEMM's launches skipped the keyed cache"


@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
def test_cached_launches_still_reach_tritons_launch_hooks(scheme_name):
    """A profiler's launch hook (Triton's knobs) sees the quant and the GEMM of a linear whose
    launches are cached, as it sees Triton's own launches."""
    from triton import knobs
    scheme = get_scheme(scheme_name)
    k, n = 3072, 3072
    wq, ws = reference.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5, scheme)
    backend = get_backend("triton")
    for m in (1, 1024):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        unhooked = backend.linear(x, wq, ws, None, scheme, k)  # fills the caches
        seen = []

        def hook(metadata):
            seen.append(metadata.get()["name"])
        if hasattr(knobs.runtime.launch_enter_hook, "add"):
            knobs.runtime.launch_enter_hook.add(hook)
        else:
            knobs.runtime.launch_enter_hook = hook
        try:
            hooked = backend.linear(x, wq, ws, None, scheme, k)
        finally:
            if hasattr(knobs.runtime.launch_enter_hook, "remove"):
                knobs.runtime.launch_enter_hook.remove(hook)
            else:
                knobs.runtime.launch_enter_hook = None
        assert torch.equal(hooked, unhooked)
        assert len(seen) == 2 and "per_token" in seen[0], (m, seen)


def _close_to_reference(y, ref):
    assert cos(y, ref) > 0.99999, cos(y, ref)
    assert float((y.float() - ref.float()).abs().max()) <= 0.01 * float(ref.float().abs().max())


@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
@pytest.mark.parametrize("m,k,n", [(1, 3072, 18432), (2, 3072, 9216), (16, 5120, 30720), (7, 3072, 200)])
def test_few_rows_kernel_waits_for_the_quant_it_follows(monkeypatch, scheme_name, m, k, n):
    """The few-row GEMM starts before the quant kernel ends (programmatic dependent launch) and must
    still read that call's rows: eager, and replayed from a CUDA graph with new inputs each time."""
    assert launch.dependent_launch_ok(torch.empty(1, device=DEV)), "no dependent launch on this GPU/Triton"
    scheme = get_scheme(scheme_name)
    wq, ws = reference.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5, scheme)
    b = torch.randn(n, device=DEV, dtype=torch.bfloat16) * 0.1
    linear = get_backend("triton").linear
    xs = [torch.randn(m, k, device=DEV, dtype=torch.bfloat16) * (i + 1) for i in range(4)]
    eager = [linear(x, wq, ws, b, scheme, k) for x in xs]
    for x, y in zip(xs, eager):
        _close_to_reference(y, reference.emulated_linear(x, wq, ws, scheme, b, k))
    monkeypatch.setattr(few_rows_gemm, "USE_KERNEL", False)
    general = [linear(x, wq, ws, b, scheme, k) for x in xs]
    monkeypatch.setattr(few_rows_gemm, "USE_KERNEL", True)
    for y, g in zip(eager, general):
        assert torch.equal(y, g) if scheme_name == "int8-w8a8" else cos(y, g) > 0.99999
    inputs = [x.clone() for x in xs]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # four quant + GEMM pairs back to back
        outs = [linear(x, wq, ws, b, scheme, k) for x in inputs]
    for trial in range(3):
        for x, src in zip(inputs, xs):
            x.copy_(src.roll(trial, 0) * (trial + 1))
        graph.replay()
        for x, y in zip(inputs, outs):
            _close_to_reference(y, reference.emulated_linear(x, wq, ws, scheme, b, k))


@pytest.mark.parametrize("scheme_name", ["int8-weight-only", "fp8-weight-only", "fp8-scaled", "fp8-e5m2-weight-only"])
@pytest.mark.parametrize("m,k,n", [(1, 3072, 18432), (2, 3072, 9216), (3, 5120, 5120), (512, 12288, 3072),
                                   (2048, 3072, 3072), (4096, 3072, 3072)])
def test_triton_weight_only_matches_reference(scheme_name, m, k, n):
    # Rows 1-4: the GEMV kernel; up to 2048 the MMA kernel; beyond, widened weight + cuBLAS.
    scheme = get_scheme(scheme_name)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    wq, ws = reference.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5, scheme)
    b = torch.randn(n, device=DEV, dtype=torch.bfloat16) * 0.1
    y = get_backend("triton").linear(x, wq, ws, b, scheme, k)
    ref = reference.emulated_linear(x, wq, ws, scheme, b, k)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert cos(y, ref) > 0.99999, cos(y, ref)
    assert float((y.float() - ref.float()).abs().max()) <= 0.01 * float(ref.float().abs().max())
    if m <= 2048:  # the kernel itself (not the cuBLAS fallback) ran
        assert torch.equal(y, triton_weight_only.weight_only_gemm(x, wq, ws, b))


@pytest.mark.parametrize("backend", ["triton", "vllm", "comfy-kitchen", "sgl-kernel", "torchao", "deep-gemm", "torch"])
@pytest.mark.parametrize("scheme_name", ALL)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_backend_matches_reference(backend, scheme_name, m, k, n):
    scheme = get_scheme(scheme_name)
    why = why_not(backend, scheme, DEV)
    if why is not None:
        if backend in EXPECTED and scheme_name in _CLAIMED.get(backend, ()):
            pytest.fail(f"{backend} should run {scheme_name} here: {why}")
        pytest.skip(why)
    torch.manual_seed(0)
    w = torch.randn(n, k, device=DEV) / k ** 0.5
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, device=DEV, dtype=torch.bfloat16) * 0.1
    wq, ws = reference.quantize_weight(w, scheme)
    y = get_backend(backend).linear(x, wq, ws, b, scheme, k)
    ref = reference.emulated_linear(x, wq, ws, scheme, b, k)
    exact = x.float() @ w.t() + b.float()
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    # Same quantized weights; activation quant may round a few elements differently per backend.
    assert cos(y, ref) > 0.9999, cos(y, ref)
    # The quality target: per-layer cosine to the unquantized output.
    assert cos(y, exact) > (0.999 if scheme_name in W8A8 else 0.99), cos(y, exact)



def test_auto_choice_on_this_gpu():
    picks = {s: pick_backend(get_scheme(s), DEV).name for s in ALL + ["fp8-weight-only"]}
    print(picks)
    best = best_w8a8()
    assert picks["fp8-w8a8"] == best and picks["int8-w8a8"] == best
    assert picks["int4-g128"] == "triton" and picks["fp8-weight-only"] == "triton"
    assert picks["fp8-block128"] == ranked_first(("deep-gemm", "vllm"), "fp8-block128")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 3072), (333, 5120), (4096, 3072)])
def test_torch_native_fp8_quant_is_bit_equal_to_the_reference_on_cuda(dtype, m, k):
    from quant.backends import torch_native
    torch.manual_seed(m)
    x = (torch.randn(m, k, device=DEV) * 4).to(dtype)
    x[0, 0] = 3e4
    q, s = torch_native.per_token_fp8(x)
    rq, rs = reference.quantize_activation(x, get_scheme("fp8-w8a8"))
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
def test_auto_hands_large_inputs_to_triton_on_hopper(scheme_name):
    """Where vLLM ranks first, Hopper's inputs from LARGE_INPUTS_FROM tokens still run the Triton
    kernels, which take less GPU time there (bench_gemm --tokens); a named backend runs every input."""
    scheme = get_scheme(scheme_name)
    choice = pick_kernels(scheme, DEV)
    print(scheme_name, choice.describe())
    start = triton_backend.LARGE_INPUTS_FROM
    best = best_w8a8()
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert start > 4608  # a Flux step at 1024x1024 keeps the best-ranked backend (see triton_backend.py)
    assert choice.for_rows(512).name == best and choice.for_rows(start - 1).name == best
    assert choice.for_rows(start).name == ("triton" if hopper else best)
    assert choice.for_rows(32760).name == ("triton" if hopper else best)
    assert pick_kernels(scheme, DEV, best).for_rows(32760).name == best
    if best != "triton" and hopper:
        assert choice.describe() == f"{best}, triton from {start} tokens"
    # the backend such an input is handed to runs it correctly
    x = torch.randn(start, 1024, device=DEV, dtype=torch.bfloat16)
    wq, ws = reference.quantize_weight(torch.randn(512, 1024, device=DEV) / 32, scheme)
    y = choice.for_rows(start).linear(x, wq, ws, None, scheme, 1024)
    ref = reference.emulated_linear(x, wq, ws, scheme, None, 1024)
    assert cos(y, ref) > 0.9999, cos(y, ref)


# ------------------------------------------------------------------ vLLM's Marlin (int4-g128)
INT4 = get_scheme("int4-g128")


def _need_marlin():
    why = why_not("vllm", INT4, DEV)
    if why is not None:
        if "vllm" in EXPECTED:
            pytest.fail(f"vllm should run int4-g128 here: {why}")
        pytest.skip(why)


def _int4_case(m, k, n, dtype, seed=0):
    torch.manual_seed(seed)
    wq, ws = reference.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5, INT4)
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    b = (torch.randn(n, device=DEV) * 0.1).to(dtype)
    return x, wq, ws, b


@pytest.mark.parametrize("k,n", [(3072, 3072), (3072, 13824), (5120, 3072), (5120, 13824)])
@pytest.mark.parametrize("m", [1, 16, 512, 4096])
def test_vllm_marlin_int4_matches_reference(m, k, n):
    _need_marlin()
    x, wq, ws, b = _int4_case(m, k, n, torch.bfloat16)
    y = get_backend("vllm").linear(x, wq, ws, b, INT4, k)
    ref = reference.emulated_linear(x, wq, ws, INT4, b, k)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert cos(y, ref) > 0.9999, cos(y, ref)
    assert float((y.float() - ref.float()).abs().max()) <= 0.02 * float(ref.float().abs().max())


@pytest.mark.parametrize("dtype,bias", [(torch.float16, True), (torch.float16, False), (torch.bfloat16, False),
                                        (torch.float32, True)])
@pytest.mark.parametrize("m,k,n", [(77, 1536, 8960), (333, 128, 256)])   # 128 in = one scale group
def test_vllm_marlin_int4_dtypes_bias_and_one_group(m, k, n, dtype, bias):
    _need_marlin()
    x, wq, ws, b = _int4_case(m, k, n, dtype)
    b = b if bias else None
    y = get_backend("vllm").linear(x, wq, ws, b, INT4, k)
    ref = reference.emulated_linear(x, wq, ws, INT4, b, k)
    assert y.dtype == dtype
    assert cos(y, ref) > 0.9999, cos(y, ref)


def test_vllm_marlin_int4_odd_shapes_fall_back_exactly():
    _need_marlin()
    x, wq, ws, b = _int4_case(40, 1000, 200, torch.bfloat16)   # K % 128, N % 64: not Marlin's
    y = get_backend("vllm").linear(x, wq, ws, b, INT4, 1000)
    assert torch.equal(y, reference.emulated_linear(x, wq, ws, INT4, b, 1000))


def _marlin_caches():
    """The Marlin caches of every loaded copy of vllm_backend. When tests/comfy ran first in this
    process, the node pack's own copy of quant/ is loaded too, and the quantdit::quantized_linear op
    runs the copy that registered it last."""
    return [m._MARLIN_CACHE for name, m in sys.modules.items()
            if name.endswith("backends.vllm_backend") and hasattr(m, "_MARLIN_CACHE")]


def test_vllm_marlin_repacks_once_per_weight(monkeypatch):
    """The production call (the quantdit::quantized_linear op) reuses the Marlin copy of a weight,
    repacks after an in-place write, and drops the copy with the weight's memory."""
    _need_marlin()
    repacks = []
    real = torch.ops._C.gptq_marlin_repack

    def counting(*args):
        repacks.append(args[1:])
        return real(*args)

    monkeypatch.setattr(torch.ops._C, "gptq_marlin_repack", counting)
    caches = _marlin_caches()
    for c in caches:
        c.clear()
    m, k, n = 512, 5120, 3072
    x, wq, ws, b = _int4_case(m, k, n, torch.bfloat16)

    def run(weight=wq):  # bound here, so `del wq` below leaves only run's reference to drop
        return quantized_linear(x, weight, ws, b, INT4.name, k, "vllm")

    y1 = run()
    cache = next(c for c in caches if len(c))  # the copy of vllm_backend the op ran
    views = next(iter(cache.values()))
    packed = next(iter(views.values()))[1]
    y2, y3 = run(), run()
    assert repacks == [(k, n, 4, False)]
    assert len(cache) == 1 and next(iter(views.values()))[1] is packed
    assert torch.equal(y1, y2) and torch.equal(y1, y3)
    _, wq2, _, _ = _int4_case(m, k, n, torch.bfloat16, seed=1)
    wq.copy_(wq2)                                   # an in-place patch of the same weight
    y4 = run()
    assert len(repacks) == 2 and len(cache) == 1
    assert cos(y4, reference.emulated_linear(x, wq2, ws, INT4, b, k)) > 0.9999
    del wq, run
    gc.collect()
    assert len(cache) == 0
