"""Unit tests for the kernel backend registry (quant/backends), run on CPU.

GPU capability is faked by replacing registry entries through monkeypatch (restored after each
test), so no backend registered by another module is disturbed."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import quant.backends as backends
from quant import reference
from quant.backends import registry, torch_native, triton_backend
from quant.backends.reference_backend import REFERENCE
from quant.backends.registry import (Backend, BackendUnavailableError, NoCapableBackendError, get_backend,
                                     list_backends, pick_backend, pick_kernels)
from quant.schemes import get_scheme, list_schemes

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
FP8 = get_scheme("fp8-w8a8")
INT8 = get_scheme("int8-w8a8")
NONE = get_scheme("none")
QUANTIZED = [s for s in list_schemes() if s.is_quantized]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees a registry that has warned about nothing yet."""
    monkeypatch.setattr(registry, "_warned", set())


def _fake_backend(name, priority, runs: set[str], available=None, linear=None, large_inputs_from=None):
    return Backend(name=name, priority=priority, availability=lambda: available,
                   supports=lambda scheme, device: None if scheme.name in runs else f"{name} cannot do {scheme.name}",
                   linear=linear or (lambda *a: None), install_hint=f"pip install {name}",
                   large_inputs_from=large_inputs_from)


def _gpu(monkeypatch, capability=(9, 0)):
    """Pretend CUDA is there with this compute capability (for the torch backend only)."""
    monkeypatch.setitem(registry._BACKENDS, "torch",
                        dataclasses.replace(torch_native.TORCH_NATIVE, availability=lambda: None))
    monkeypatch.setattr(torch_native, "cuda_capability",
                        lambda device: capability if device.type == "cuda" else None)


# ------------------------------------------------------------------ listing
def test_package_exports_registry_functions():
    assert backends.pick_backend is pick_backend and backends.list_backends is list_backends
    assert get_backend("reference") is REFERENCE and get_backend("torch") is torch_native.TORCH_NATIVE


def test_list_backends_on_this_machine():
    listed = list_backends()
    assert listed["reference"] is None
    if torch.cuda.is_available():
        assert listed["torch"] is None
    else:
        assert isinstance(listed["torch"], str) and "CUDA" in listed["torch"]
    assert set(listed) == set(registry._BACKENDS)


def test_get_backend_unknown_names_the_known_ones():
    with pytest.raises(BackendUnavailableError) as ei:
        get_backend("no-such-backend")
    assert "no-such-backend" in str(ei.value) and "reference" in str(ei.value) and "torch" in str(ei.value)


# ------------------------------------------------------------------ auto choice on CPU
@pytest.mark.parametrize("scheme", QUANTIZED, ids=lambda s: s.name)
def test_every_quantized_scheme_runs_on_cpu_through_reference(scheme):
    assert pick_backend(scheme, CPU) is REFERENCE
    assert pick_backend(scheme, CPU, preferred="auto") is REFERENCE


def test_torch_backend_refuses_cpu_device_with_reason():
    why = torch_native.TORCH_NATIVE.supports(FP8, CPU)
    assert why is not None and "CUDA" in why and "cpu" in why


# ------------------------------------------------------------------ preferred backends
def test_strict_pick_of_unavailable_backend_says_why():
    with pytest.raises(BackendUnavailableError) as ei:
        pick_backend(FP8, CPU, preferred="torch", strict=True)
    msg = str(ei.value)
    assert "'torch'" in msg and "fp8-w8a8" in msg and "cpu" in msg
    assert "CUDA" in msg                               # the reason itself
    assert torch_native.TORCH_NATIVE.install_hint in msg


def test_strict_pick_of_unknown_backend_says_why():
    with pytest.raises(BackendUnavailableError) as ei:
        pick_backend(INT8, CPU, preferred="no-such-backend", strict=True)
    msg = str(ei.value)
    assert "no-such-backend" in msg and "int8-w8a8" in msg
    assert "known" in msg                              # why: no backend of that name is known


def test_non_strict_pick_falls_back_and_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger="quantdit")
    for _ in range(3):
        assert pick_backend(FP8, CPU, preferred="torch") is REFERENCE
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "quantdit"]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "'torch'" in text and "fp8-w8a8" in text and "CUDA" in text
    # a different scheme or preferred backend is a different situation: warned about once more
    caplog.clear()
    assert pick_backend(INT8, CPU, preferred="torch") is REFERENCE
    assert pick_backend(INT8, CPU, preferred="torch") is REFERENCE
    assert pick_backend(INT8, CPU, preferred="vllm-not-installed") is REFERENCE
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_available_preferred_backend_wins_over_priority(monkeypatch):
    monkeypatch.setitem(registry._BACKENDS, "fast", _fake_backend("fast", 100, {"int8-w8a8"}))
    assert pick_backend(INT8, CPU) is registry._BACKENDS["fast"]
    assert pick_backend(INT8, CPU, preferred="reference", strict=True) is REFERENCE


# ------------------------------------------------------------------ faked GPU capability
def test_auto_prefers_torch_on_a_capable_gpu(monkeypatch):
    _gpu(monkeypatch, (9, 0))
    assert list_backends()["torch"] is None
    assert pick_backend(FP8, CUDA) is get_backend("torch")
    for name in ("fp8-scaled", "fp8-weight-only", "int8-weight-only"):
        assert pick_backend(get_scheme(name), CUDA) is get_backend("torch"), name
    # no torch-native kernel for these: the reference backend runs them
    for name in ("int8-w8a8", "fp8-block128", "int4-g128"):
        assert pick_backend(get_scheme(name), CUDA) is REFERENCE, name
    # the CPU is still served by the reference backend
    assert pick_backend(FP8, CPU) is REFERENCE


def test_old_gpu_cannot_run_fp8_w8a8(monkeypatch, caplog):
    _gpu(monkeypatch, (8, 6))
    why = get_backend("torch").supports(FP8, CUDA)
    assert why is not None and "8.9" in why and "8.6" in why
    assert pick_backend(FP8, CUDA) is REFERENCE
    assert pick_backend(get_scheme("fp8-scaled"), CUDA) is get_backend("torch")
    with pytest.raises(BackendUnavailableError, match="8.6"):
        pick_backend(FP8, CUDA, preferred="torch", strict=True)
    _gpu(monkeypatch, (8, 9))
    assert pick_backend(FP8, CUDA) is get_backend("torch")


def test_auto_prefers_highest_priority_backend_that_supports_the_scheme(monkeypatch):
    _gpu(monkeypatch, (9, 0))
    hi = _fake_backend("hi-int8", 50, {"int8-w8a8"})
    mid = _fake_backend("mid-fp8", 20, {"fp8-w8a8", "int8-w8a8"})
    gone = _fake_backend("not-installed", 99, {"int8-w8a8", "fp8-w8a8"}, available="package not installed")
    for b in (mid, gone, hi):
        monkeypatch.setitem(registry._BACKENDS, b.name, b)
    assert list_backends()["not-installed"] == "package not installed"
    assert pick_backend(INT8, CUDA) is hi
    assert pick_backend(FP8, CUDA) is mid
    assert pick_backend(get_scheme("fp8-scaled"), CUDA) is get_backend("torch")
    assert pick_backend(get_scheme("int4-g128"), CUDA) is REFERENCE
    with pytest.raises(BackendUnavailableError, match="package not installed"):
        pick_backend(INT8, CUDA, preferred="not-installed", strict=True)


# ------------------------------------------------------------------ torch's own fp8 path
def _every_finite_bf16_value_in_rows(width=512):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16)
    x = x[torch.isfinite(x)]
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    return x[: x.numel() // width * width].reshape(-1, width)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_torch_native_fp8_quant_is_bit_equal_to_the_reference(dtype):
    torch.manual_seed(0)
    x = (torch.randn(67, 640) * 5).to(dtype)
    x[3] = 0                 # the smallest scale
    x[4, 7] = 6e4            # one large value: the row's others quantize to few levels
    x[5] *= 1e-3
    rows = [x]
    if dtype == torch.bfloat16:   # every finite bf16 value, each row's extremes landing on +-448
        rows.append(_every_finite_bf16_value_in_rows())
    for t in rows:
        q, s = torch_native.per_token_fp8(t)
        rq, rs = reference.quantize_activation(t, FP8)
        assert q.dtype == torch.float8_e4m3fn and q.shape == t.shape
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
        assert torch.equal(s, rs)
        assert not torch.isnan(q.float()).any()


# ------------------------------------------------------------------ large inputs under auto
def _ranked_and_large(monkeypatch, large_available=None):
    """'ranked' ranks first; 'large' has the faster kernel for int8 inputs from 2048 tokens."""
    ranked = _fake_backend("ranked", 90, {"int8-w8a8", "fp8-w8a8"})
    large = _fake_backend("large", 40, {"int8-w8a8", "fp8-w8a8"}, available=large_available,
                          large_inputs_from=lambda scheme, device: 2048 if scheme.name == "int8-w8a8" else None)
    for b in (ranked, large):
        monkeypatch.setitem(registry._BACKENDS, b.name, b)
    return ranked, large


def test_auto_hands_large_inputs_to_the_backend_that_claims_them(monkeypatch):
    ranked, large = _ranked_and_large(monkeypatch)
    for preferred in (None, "auto"):
        choice = pick_kernels(INT8, CPU, preferred)
        assert choice.backend is ranked and choice.large is large and choice.large_from == 2048
        assert choice.for_rows(1) is ranked and choice.for_rows(2047) is ranked
        assert choice.for_rows(2048) is large and choice.for_rows(32760) is large
        assert choice.describe() == "ranked, large from 2048 tokens"


def test_no_hand_over_where_no_backend_claims_the_scheme(monkeypatch):
    ranked, _ = _ranked_and_large(monkeypatch)
    choice = pick_kernels(FP8, CPU)       # 'large' claims no fp8 inputs
    assert choice.large is None and choice.for_rows(32760) is ranked and choice.describe() == "ranked"


def test_no_hand_over_to_an_unavailable_backend(monkeypatch):
    ranked, _ = _ranked_and_large(monkeypatch, large_available="not built")
    assert pick_kernels(INT8, CPU).for_rows(32760) is ranked


def test_the_backend_claiming_the_fewest_tokens_takes_large_inputs(monkeypatch):
    ranked, large = _ranked_and_large(monkeypatch)
    later = _fake_backend("later", 30, {"int8-w8a8"}, large_inputs_from=lambda scheme, device: 8192)
    monkeypatch.setitem(registry._BACKENDS, "later", later)
    assert pick_kernels(INT8, CPU).for_rows(10000) is large


def test_a_named_backend_runs_every_input(monkeypatch):
    ranked, large = _ranked_and_large(monkeypatch)
    assert pick_kernels(INT8, CPU, "ranked").for_rows(32760) is ranked
    assert pick_kernels(INT8, CPU, "large").for_rows(1) is large
    # a named backend that cannot run falls back to auto, hand-over included
    choice = pick_kernels(INT8, CPU, "not-installed")
    assert choice.for_rows(1) is ranked and choice.for_rows(4096) is large


def test_the_best_ranked_backend_keeps_inputs_it_claims_itself(monkeypatch):
    ranked = _fake_backend("ranked", 90, {"int8-w8a8"}, large_inputs_from=lambda scheme, device: 16)
    monkeypatch.setitem(registry._BACKENDS, "ranked", ranked)
    choice = pick_kernels(INT8, CPU)
    assert choice.large is None and choice.for_rows(4096) is ranked


@pytest.mark.parametrize("capability,scheme,rows", [
    ((9, 0), "int8-w8a8", triton_backend.LARGE_INPUTS_FROM), ((9, 0), "fp8-w8a8", triton_backend.LARGE_INPUTS_FROM),
    ((9, 0), "fp8-block128", None), ((9, 0), "int4-g128", None), ((9, 0), "int8-weight-only", None),
    ((8, 9), "fp8-w8a8", None), ((8, 0), "int8-w8a8", None), ((10, 0), "int8-w8a8", None),  # measured on sm_90 only
])
def test_triton_claims_large_w8a8_inputs_on_hopper_only(monkeypatch, capability, scheme, rows):
    from quant.kernels import triton_gemm
    monkeypatch.setattr(triton_backend, "cuda_capability", lambda device: capability)
    monkeypatch.setattr(triton_gemm, "ROCM", False)
    monkeypatch.setattr(triton_gemm, "gluon_failure", None)
    if triton_gemm.TENSOR_DESCRIPTOR is None:
        pytest.fail("this Triton has no TensorDescriptor; make setup installs one that does")
    assert triton_backend.TRITON.large_inputs_from(get_scheme(scheme), CUDA) == rows


@pytest.mark.parametrize("raw,tokens", [("", 8192), ("4096", 4096), (" 0 ", 0), ("lots", 8192)])
def test_the_hand_over_threshold_setting(monkeypatch, caplog, raw, tokens):
    monkeypatch.setenv("QUANTDIT_TRITON_FROM_TOKENS", raw)
    with caplog.at_level(logging.WARNING, logger="quantdit"):
        assert triton_backend._tokens_setting("QUANTDIT_TRITON_FROM_TOKENS", 8192) == tokens
    assert ("is not a token count" in caplog.text) == (raw == "lots")


@pytest.mark.parametrize("switch,value,scheme", [
    ("LARGE_INPUTS_FROM", 0, "fp8-w8a8"), ("ROCM", True, "fp8-w8a8"), ("PERSISTENT", False, "fp8-w8a8"),
    ("USE_TMA", False, "fp8-w8a8"), ("USE_GLUON", False, "int8-w8a8"),
    ("gluon_failure", "the Gluon kernel did not build", "int8-w8a8"),
])
def test_triton_claims_no_large_inputs_without_its_hopper_kernels(monkeypatch, switch, value, scheme):
    from quant.kernels import triton_gemm
    monkeypatch.setattr(triton_backend, "cuda_capability", lambda device: (9, 0))
    monkeypatch.setattr(triton_gemm, "ROCM", False)
    monkeypatch.setattr(triton_gemm, "gluon_failure", None)
    monkeypatch.setattr(triton_backend if switch == "LARGE_INPUTS_FROM" else triton_gemm, switch, value)
    assert triton_backend.TRITON.large_inputs_from(get_scheme(scheme), CUDA) is None
    if scheme == "int8-w8a8":  # fp8 runs the persistent Triton kernel, with or without Gluon
        assert triton_backend.TRITON.large_inputs_from(FP8, CUDA) == triton_backend.LARGE_INPUTS_FROM


# ------------------------------------------------------------------ nobody can run it
def test_no_capable_backend_lists_every_reason_on_cpu():
    with pytest.raises(NoCapableBackendError) as ei:
        pick_backend(NONE, CPU)
    err = ei.value
    assert set(err.reasons) == set(registry._BACKENDS)
    assert all(isinstance(r, str) and r for r in err.reasons.values())
    msg = str(err)
    assert "none" in msg and "cpu" in msg
    for name, reason in err.reasons.items():
        assert f"{name}: {reason}" in msg
    assert "unquantized" in err.reasons["reference"]


def test_no_capable_backend_lists_every_reason_with_fakes(monkeypatch):
    _gpu(monkeypatch, (9, 0))
    monkeypatch.setitem(registry._BACKENDS, "fake", _fake_backend("fake", 5, {"int8-w8a8"}))
    monkeypatch.setitem(registry._BACKENDS, "absent", _fake_backend("absent", 7, set(), available="not built"))
    with pytest.raises(NoCapableBackendError) as ei:
        pick_backend(NONE, CUDA)
    reasons = ei.value.reasons
    assert set(reasons) == set(registry._BACKENDS)
    assert reasons["fake"] == "fake cannot do none"
    assert reasons["absent"] == "not built"
    assert "no torch-native kernel" in reasons["torch"]
    # also when a non-strict preferred backend was asked for first
    with pytest.raises(NoCapableBackendError):
        pick_backend(NONE, CUDA, preferred="fake")
