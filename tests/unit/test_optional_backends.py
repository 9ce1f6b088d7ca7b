"""Availability reasons and the auto choice across every registered kernel provider, on CPU.

The GPU is faked (capability and "installed") per test through monkeypatch; the real packages'
kernels run in tests/gpu on the GPU machine."""
from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from quant import reference
from quant.backends import (comfy_kitchen_backend, deep_gemm_backend, get_backend, list_backends, pick_backend,
                            quantized_linear, registry, sgl_kernel_backend, torch_native, torchao_backend,
                            triton_backend, vllm_backend)
from quant.backends.optional_import import try_import
from quant.backends.registry import BackendUnavailableError
from quant.schemes import get_scheme, list_aliases, resolve

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
MODULES = [torch_native, triton_backend, vllm_backend, comfy_kitchen_backend, sgl_kernel_backend, torchao_backend,
           deep_gemm_backend]
ALL_GPU_BACKENDS = ["torch", "triton", "vllm", "comfy-kitchen", "sgl-kernel", "torchao", "deep-gemm"]


def fake_gpu(monkeypatch, capability, installed):
    """CUDA with `capability`; the backends named in `installed` importable, the others not."""
    for module in MODULES:
        monkeypatch.setattr(module, "cuda_capability", lambda d: capability if d.type == "cuda" else None)
    for name in ALL_GPU_BACKENDS:
        b = registry._BACKENDS[name]
        avail = (lambda: None) if name in installed else (lambda n=name: f"{n} is not installed")
        monkeypatch.setitem(registry._BACKENDS, name, dataclasses.replace(b, availability=avail))
    monkeypatch.setattr(vllm_backend.torch.ops._C, "cutlass_scaled_mm_supports_block_fp8",
                        lambda cap: cap >= 90, raising=False)
    for op in vllm_backend._CUTLASS_OPS + vllm_backend._MARLIN_OPS:  # vLLM's library, registered
        monkeypatch.setattr(vllm_backend.torch.ops._C, op, lambda *a: None, raising=False)


# LightX2V's Q8F kernels (q8_kernels): no backend of this pack provides them, so auto answers
NOT_PROVIDED = {"q8f"}


def test_every_alias_names_a_backend_of_this_pack():
    for alias in list_aliases():
        assert alias.backend is None or alias.backend in registry._BACKENDS or alias.backend in NOT_PROVIDED, alias


@pytest.mark.parametrize("alias,backend", [("fp8-sgl", "sgl-kernel"), ("int8-sgl", "sgl-kernel"),
                                           ("W-int8-channel-sym-A-int8-channel-sym-dynamic-Sgl", "sgl-kernel"),
                                           ("fp8-b128-deepgemm", "deep-gemm"), ("int8-vllm", "vllm")])
def test_an_alias_naming_a_kernel_gets_it_where_installed(monkeypatch, alias, backend):
    fake_gpu(monkeypatch, (9, 0), set(ALL_GPU_BACKENDS))
    resolved = resolve(alias)
    assert pick_backend(resolved.scheme, CUDA, resolved.backend).name == backend


def test_every_backend_is_listed_with_a_reason_on_this_cpu_machine():
    listed = list_backends()
    assert set(ALL_GPU_BACKENDS) | {"reference"} == set(listed)
    assert listed["reference"] is None
    if not torch.cuda.is_available():
        for name in ALL_GPU_BACKENDS:
            assert isinstance(listed[name], str) and listed[name], name
        assert "CUDA" in listed["triton"] and "CUDA" in listed["vllm"]
        assert "not installed" in listed["sgl-kernel"] and "not installed" in listed["deep-gemm"]


@pytest.mark.parametrize("capability,installed,expect", [
    # torch + triton only (what most ComfyUI users have)
    ((9, 0), {"torch", "triton"}, {"fp8-w8a8": "triton", "int8-w8a8": "triton", "fp8-block128": "triton",
                                   "int4-g128": "triton", "fp8-weight-only": "triton",
                                   "int8-weight-only": "triton", "fp8-e5m2-scaled": "triton"}),
    # everything installed on Hopper: vLLM's CUTLASS kernels win per-token W8A8, DeepGEMM blocks; int4
    # stays on Triton (Marlin is faster only on few rows), with vLLM's Marlin next
    ((9, 0), set(ALL_GPU_BACKENDS), {"fp8-w8a8": "vllm", "int8-w8a8": "vllm", "fp8-block128": "deep-gemm",
                                     "int4-g128": "triton"}),
    ((9, 0), set(ALL_GPU_BACKENDS) - {"triton"}, {"int4-g128": "vllm"}),
    ((9, 0), set(ALL_GPU_BACKENDS) - {"deep-gemm"}, {"fp8-block128": "vllm"}),
    ((9, 0), set(ALL_GPU_BACKENDS) - {"vllm"}, {"fp8-w8a8": "sgl-kernel", "int8-w8a8": "sgl-kernel",
                                                "fp8-block128": "deep-gemm"}),
    # Ada (sm89): fp8 works, vLLM's block kernel and DeepGEMM are Hopper-only
    ((8, 9), set(ALL_GPU_BACKENDS) - {"sgl-kernel"}, {"fp8-w8a8": "vllm", "fp8-block128": "triton"}),
    # Ampere (sm86): no fp8 tensor cores, int8 still fast
    ((8, 6), {"torch", "triton"}, {"fp8-w8a8": "reference", "int8-w8a8": "triton", "fp8-block128": "reference",
                                   "fp8-scaled": "torch", "int8-weight-only": "triton"}),
    ((8, 6), {"torch", "vllm"}, {"int4-g128": "vllm", "int8-w8a8": "vllm", "fp8-w8a8": "reference"}),
    # Turing (sm75): comfy-kitchen's int8 runs, the Triton int8 GEMM wants sm80
    ((7, 5), {"torch", "triton", "comfy-kitchen"}, {"int8-w8a8": "comfy-kitchen", "int4-g128": "reference"}),
])
def test_auto_choice_with_faked_gpus(monkeypatch, capability, installed, expect):
    fake_gpu(monkeypatch, capability, installed)
    for scheme, backend in expect.items():
        assert pick_backend(get_scheme(scheme), CUDA).name == backend, (capability, scheme)


@pytest.mark.parametrize("name,scheme,capability,words", [
    ("torchao", "int8-w8a8", (9, 0), ["slower than bf16"]),
    ("deep-gemm", "fp8-block128", (8, 9), ["Hopper", "8.9"]),
    ("deep-gemm", "fp8-w8a8", (9, 0), ["only runs fp8-block128"]),
    ("vllm", "fp8-w8a8", (8, 6), ["8.9", "8.6"]),
    ("vllm", "int4-g128", (7, 5), ["8.0", "7.5"]),
    ("vllm", "fp8-weight-only", (9, 0), ["no vLLM kernel"]),
    ("sgl-kernel", "fp8-block128", (9, 0), ["no sgl-kernel kernel"]),
    ("comfy-kitchen", "fp8-w8a8", (9, 0), ["per-channel"]),
    ("triton", "int8-w8a8", (7, 5), ["8.0", "7.5"]),
    ("triton", "fp8-weight-only", (8, 6), ["8.9", "8.6"]),
    ("triton", "none", (9, 0), ["no Triton kernel"]),
])
def test_unsupported_combinations_say_why(monkeypatch, name, scheme, capability, words):
    fake_gpu(monkeypatch, capability, set(ALL_GPU_BACKENDS))
    why = registry.why_not(name, get_scheme(scheme), CUDA)
    assert why is not None
    for w in words:
        assert w in why
    with pytest.raises(BackendUnavailableError) as ei:
        pick_backend(get_scheme(scheme), CUDA, preferred=name, strict=True)
    assert why in str(ei.value) and get_backend(name).install_hint in str(ei.value)


def test_named_backend_that_is_not_installed_says_what_to_install(monkeypatch):
    fake_gpu(monkeypatch, (9, 0), {"torch", "triton"})
    with pytest.raises(BackendUnavailableError) as ei:
        pick_backend(get_scheme("int8-w8a8"), CUDA, preferred="vllm", strict=True)
    msg = str(ei.value)
    assert "vllm is not installed" in msg and "pip install" in msg and "QUANTDIT_VLLM_LIB" in msg


# ------------------------------------------------------------------ how the optional packages fail
def test_try_import_reports_missing_and_broken_packages(tmp_path, monkeypatch):
    try_import.cache_clear()
    _, why = try_import("quantdit_no_such_package")
    assert why == "quantdit_no_such_package is not installed"
    pkg = tmp_path / "quantdit_broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module, why = try_import("quantdit_broken_pkg")
    assert module is None
    assert "does not import" in why and "libcudart.so.12" in why and "ImportError" in why
    try_import.cache_clear()
    sys.modules.pop("quantdit_broken_pkg", None)


def test_an_sgl_kernel_without_the_ops_used_here_says_which(tmp_path, monkeypatch):
    # A stand-in package on sys.path: sgl-kernel itself needs CUDA and cannot be installed here.
    pkg = tmp_path / "sgl_kernel"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("def int8_scaled_mm(*a):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try_import.cache_clear()
    try:
        why = sgl_kernel_backend._availability()
        assert "lacks fp8_scaled_mm, sgl_per_token_quant_fp8" in why and "int8_scaled_mm" not in why
        (pkg / "__init__.py").write_text("def int8_scaled_mm(*a):\n    pass\n\nfp8_scaled_mm = int8_scaled_mm\n"
                                         "sgl_per_token_quant_fp8 = int8_scaled_mm\n")
        try_import.cache_clear()
        sys.modules.pop("sgl_kernel", None)
        assert sgl_kernel_backend._availability() is None
    finally:
        try_import.cache_clear()
        sys.modules.pop("sgl_kernel", None)


def test_deep_gemm_gets_whole_blocks_and_the_triton_kernel_the_rest(tmp_path, monkeypatch):
    # A stand-in deep_gemm on sys.path records its calls: DeepGEMM itself needs a Hopper GPU and nvcc.
    pkg = tmp_path / "deep_gemm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("calls = []\n\ndef fp8_gemm_nt(a, b, d):\n    calls.append(tuple(d.shape))\n"
                                     "    d.zero_()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try_import.cache_clear()
    try:
        scheme = get_scheme("fp8-block128")
        g = torch.Generator().manual_seed(0)
        for k, n, to_deep_gemm in [(256, 128, True), (300, 128, False), (256, 200, False)]:
            x = (torch.randn(5, k, generator=g) * 3).to(torch.bfloat16)
            wq, ws = reference.quantize_weight(torch.randn(n, k, generator=g) / k ** 0.5, scheme)
            y = deep_gemm_backend._linear(x, wq, ws, None, scheme, k)
            calls = try_import("deep_gemm")[0].calls
            if to_deep_gemm:
                assert calls == [(5, n)] and not y.any()
                calls.clear()
            else:
                assert calls == [] and torch.equal(y, get_backend("triton").linear(x, wq, ws, None, scheme, k))
    finally:
        try_import.cache_clear()
        sys.modules.pop("deep_gemm", None)


def test_vllm_library_discovery_reasons(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vllm_backend, "_has_ops", lambda: False)
    monkeypatch.delenv("QUANTDIT_VLLM_LIB", raising=False)
    monkeypatch.setattr(vllm_backend.importlib.util, "find_spec", lambda name: None)
    try:
        vllm_backend._load.cache_clear()
        assert "not installed" in vllm_backend._load()
        vllm_backend._load.cache_clear()
        monkeypatch.setenv("QUANTDIT_VLLM_LIB", str(tmp_path / "missing.so"))
        assert "does not exist" in vllm_backend._load() and "missing.so" in vllm_backend._load()
        vllm_backend._load.cache_clear()
        bogus = tmp_path / "_C_stable_libtorch.abi3.so"
        bogus.write_bytes(b"not an ELF file")
        monkeypatch.setenv("QUANTDIT_VLLM_LIB", str(bogus))
        why = vllm_backend._load()
        assert "does not load with this PyTorch" in why and str(bogus) in why
    finally:
        vllm_backend._load.cache_clear()


# ------------------------------------------------------------------ torchao's fp8 path (runs on CPU)
def test_torchao_fp8_linear_matches_reference():
    scheme = get_scheme("fp8-w8a8")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(19, 256, generator=g).to(torch.bfloat16)
    wq, ws = reference.quantize_weight(torch.randn(96, 256, generator=g), scheme)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    y = torchao_backend._linear(x, wq, ws, b, scheme, 256)
    ref = reference.emulated_linear(x, wq, ws, scheme, b, 256)
    assert y.dtype == torch.bfloat16
    # torchao picks its scales in the input dtype, so a few elements round to the neighbouring fp8
    # value: close to the reference, not bitwise.
    cos = torch.nn.functional.cosine_similarity(y.float().flatten(), ref.float().flatten(), 0)
    assert float(cos) > 0.9995
    assert float((y.float() - ref.float()).abs().max()) <= 0.03 * float(ref.float().abs().max())


# ------------------------------------------------------------------ the op the layers call
def test_quantized_linear_op_is_one_opaque_node_for_torch_compile():
    scheme = get_scheme("int8-w8a8")
    wq, ws = reference.quantize_weight(torch.randn(48, 64), scheme)
    x = torch.randn(10, 64)

    def f(x):
        return quantized_linear(x * 2, wq, ws, None, scheme.name, 64, "reference") + 1

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)   # fullgraph: no graph breaks
    assert torch.equal(compiled(x), f(x))
    assert torch.equal(quantized_linear(x, wq, ws, None, scheme.name, 64, "reference"),
                       reference.emulated_linear(x, wq, ws, scheme, None, 64))
