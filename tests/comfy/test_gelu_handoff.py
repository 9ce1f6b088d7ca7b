"""The GELU hand-off (nodes/gelu_handoff.py) in real ComfyUI Flux and Wan models: which GELUs get a
DeferredGelu, and that sampling does not change by a single bit with it. On the CPU the
reference kernel computes the deferred GELU first; on the GPU (last tests) the Triton quantizer
applies it inside its own pass."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

import tiny_dits
import wan_fixtures
from tiny_dits import load, quantize, sample

ON_CUDA = os.environ.get("QUANTDIT_COMFY_DEVICE", "cpu") == "cuda"


@pytest.fixture(scope="module")
def files(models_dir):
    return tiny_dits.write(models_dir, "h", seed=3)


def _is_handoff(obj):
    # The pack's own class, as ComfyUI imported the pack (not this checkout's `quant` on sys.path).
    return type(obj).__name__ == "DeferredGelu" and type(obj).__module__.endswith("quant.deferred")


def deferred_keys(model):
    return sorted(k[len("diffusion_model."):] for k, v in model.object_patches.items() if _is_handoff(v))


def without_handoff(model):
    plain = model.clone()
    for k in [k for k, v in plain.object_patches.items() if _is_handoff(v)]:
        del plain.object_patches[k]
    return plain


FLUX_IMG = ["double_blocks.0.img_mlp.1", "single_blocks.0.mlp_act", "single_blocks.1.mlp_act"]


@pytest.mark.parametrize("scheme", ["int8-w8a8", "fp8-w8a8"])
def test_gelus_before_w8a8_layers_are_handed_off(comfy, files, scheme):
    q, report = quantize(comfy, load(comfy, files, "flux"), scheme)
    assert deferred_keys(q) == sorted(FLUX_IMG + ["double_blocks.0.txt_mlp.1"])
    assert "4 GELU activations are computed by the quantizer of the layer after them" in report, report
    # With keep_small_m_layers the text stream's mlp.2 runs 8-bit weight-only: its GELU stays.
    q, _ = quantize(comfy, load(comfy, files, "flux"), scheme, keep_small_m_layers=True)
    assert deferred_keys(q) == FLUX_IMG
    q, _ = quantize(comfy, load(comfy, files, "wan"), scheme)
    assert deferred_keys(q) == ["blocks.0.ffn.1", "blocks.1.ffn.1"]


@pytest.mark.parametrize("scheme,kw", [("fp8-block128", {}), ("int8-weight-only", {}), ("int4-g128", {}),
                                       ("int8-w8a8", {"skip_patterns": "linear2, mlp.2"})])
def test_gelus_whose_consumer_is_not_per_token_w8a8_stay(comfy, files, scheme, kw):
    q, report = quantize(comfy, load(comfy, files, "flux"), scheme, **kw)
    assert deferred_keys(q) == [] and "GELU" not in report
    model = load(comfy, files, "flux")
    assert type(model.get_model_object("diffusion_model.single_blocks.0.mlp_act")) is torch.nn.GELU


def test_yak_blocks_are_left_alone(comfy, files):
    _, pack = comfy
    model = load(comfy, files, "flux")
    q, _ = quantize(comfy, model, "int8-w8a8")
    plain = without_handoff(q)
    blocks = model.model.diffusion_model.single_blocks
    for b in blocks:
        b.yak_mlp = True  # ComfyUI's flag for the Flux variants whose mlp_act output is multiplied
    try:
        report = pack.quant.report.QuantReport(source="t", layout="t")
        assert pack.nodes.gelu_handoff.defer_gelus(plain, report) == 2  # only the double block's mlps
        assert deferred_keys(plain) == ["double_blocks.0.img_mlp.1", "double_blocks.0.txt_mlp.1"]
    finally:
        for b in blocks:
            b.yak_mlp = False


@pytest.mark.parametrize("arch", ["flux", "wan"])
def test_sampling_is_bit_equal_with_and_without_the_handoff(comfy, files, arch):
    # On CUDA, 'auto' may pick vLLM, whose own quantizer (the unfused path) rounds differently from
    # the pack's; that case is the GPU test below. Triton's is bit-equal with and without.
    q, _ = quantize(comfy, load(comfy, files, arch), "int8-w8a8", backend="triton" if ON_CUDA else "auto")
    assert deferred_keys(q)
    if ON_CUDA:
        # A fresh process's first Flux sample on CUDA differs from later ones even in plain bf16
        # (0.29% on the H100: ComfyUI / torch first-call effects), so warm up first.
        sample(comfy, files, arch, q)
    assert torch.equal(sample(comfy, files, arch, q), sample(comfy, files, arch, without_handoff(q)))


def test_input_model_keeps_its_gelus_and_requantizing_adds_none(comfy, files):
    model = load(comfy, files, "wan")
    once, _ = quantize(comfy, model, "int8-w8a8")
    twice, report = quantize(comfy, once, "fp8-w8a8")
    assert deferred_keys(model) == [] and deferred_keys(twice) == deferred_keys(once)
    assert "GELU" not in report
    # Sampling the quantized clone puts its patches in; sampling the input model takes them out again.
    before = sample(comfy, files, "wan", model)
    sample(comfy, files, "wan", once)
    assert _is_handoff(model.model.diffusion_model.blocks[0].ffn[1])
    assert torch.equal(sample(comfy, files, "wan", model), before)
    assert type(model.model.diffusion_model.blocks[0].ffn[1]) is torch.nn.GELU


def test_the_loader_hands_off_too(comfy, models_dir):
    nodes, _ = comfy
    names = wan_fixtures.write_all(models_dir)
    model, report = nodes.NODE_CLASS_MAPPINGS["QuantDiTLoader"].execute(
        unet_name=names["lightx2v-int8"], backend="auto", compute_dtype="default").result
    assert deferred_keys(model) == ["blocks.0.ffn.1", "blocks.1.ffn.1"]
    assert "2 GELU activations" in report
    model, report = nodes.NODE_CLASS_MAPPINGS["QuantDiTLoader"].execute(
        unet_name=names["lightx2v-fp8-block128"], backend="auto", compute_dtype="default").result
    assert deferred_keys(model) == [] and "GELU" not in report


# ------------------------------------------------------------------ on the GPU machine
@pytest.mark.gpu
@pytest.mark.skipif(not (ON_CUDA and torch.cuda.is_available()), reason="needs CUDA and QUANTDIT_COMFY_DEVICE=cuda")
@pytest.mark.parametrize("arch", ["flux", "wan"])
@pytest.mark.parametrize("scheme,backend", [("int8-w8a8", "triton"), ("fp8-w8a8", "triton"), ("int8-w8a8", "vllm"),
                                            ("fp8-w8a8", "vllm")])
def test_on_gpu_the_quantizer_applies_the_gelu(comfy, files, monkeypatch, arch, scheme, backend):
    _, pack = comfy
    why = pack.quant.backends.why_not(backend, pack.quant.schemes.get_scheme(scheme), torch.device("cuda"))
    if why:
        pytest.skip(f"{backend}: {why}")
    triton_quant = importlib.import_module(f"{pack.__name__}.quant.kernels.triton_quant")  # imported lazily
    calls = []
    fused = triton_quant.per_token_quant_gelu

    def counting(prefix, x, dtype):
        calls.append(prefix is not None)
        return fused(prefix, x, dtype)

    q, report = quantize(comfy, load(comfy, files, arch), scheme, backend=backend)
    sample(comfy, files, arch, q)  # warm-up: see test_sampling_is_bit_equal_with_and_without_the_handoff
    monkeypatch.setattr(triton_quant, "per_token_quant_gelu", counting)
    out = sample(comfy, files, arch, q)
    fused_calls = list(calls)
    plain = sample(comfy, files, arch, without_handoff(q))
    assert len(calls) == len(fused_calls)  # the model without the patches never takes the fused path
    # Per model call, Flux: 2 single blocks (with the attention output as prefix) + the double block's
    # img and txt mlp; Wan: its 2 ffn.
    assert fused_calls and (fused_calls.count(True) == fused_calls.count(False) if arch == "flux"
                            else not any(fused_calls))
    print(f"{arch} {scheme}:{backend}: {len(fused_calls)} fused GELU quantizations, relative difference to "
          f"the unfused path {float((out - plain).norm() / plain.norm()):.2e}")
    if backend == "triton":  # the same quantizer output as the unfused path, bit for bit
        assert torch.equal(out, plain)
    else:
        # vLLM's own quantizer on the unfused path rounds some values differently: two valid
        # quantizations, each within test_quantize_node's tolerance of bf16 (measured on the H100:
        # 0.3-0.4% int8, 0.4-1.2% fp8).
        assert float((out - plain).norm() / plain.norm()) < {"int8-w8a8": 0.012, "fp8-w8a8": 0.04}[scheme]
