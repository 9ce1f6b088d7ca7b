"""Pre-quantized Wan DiT files through the real ComfyUI runtime: load, sample, compare."""
from __future__ import annotations

import os

import pytest
import torch

from wan_fixtures import VARIANTS, conditioning, latent, write_all


# The fallback tests name a backend that cannot run on the CPU; on a GPU it runs.
CPU_ONLY = pytest.mark.skipif(os.environ.get("QUANTDIT_COMFY_DEVICE", "cpu") == "cuda",
                              reason="'torch' runs fp8-w8a8 on a GPU: nothing falls back there")


@pytest.fixture(scope="module")
def files(models_dir):
    return write_all(models_dir)


def sample(comfy, model, steps=3, seed=7):
    nodes, _ = comfy
    (out,) = nodes.KSampler().sample(model, seed, steps, 2.0, "euler", "simple",
                                     conditioning(1), conditioning(2), latent(), denoise=1.0)
    return out["samples"].float()


def load_quantized(comfy, name, backend="auto", dtype="default"):
    nodes, _ = comfy
    out = nodes.NODE_CLASS_MAPPINGS["QuantDiTLoader"].execute(unet_name=name, backend=backend,
                                                               compute_dtype=dtype)
    return out.result if hasattr(out, "result") else out


@pytest.fixture(scope="module")
def bf16_output(comfy, files):
    nodes, _ = comfy
    (model,) = nodes.UNETLoader().load_unet(files["bf16"], "default")
    return sample(comfy, model)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# Tolerances: one W8A8 linear of this model has ~0.5-1% relative error (int8 / fp8 e4m3 rounding
# of weights AND activations); 3 euler steps through 2 blocks compound it to a few percent.
# Weight-only per-tensor fp8 is ~2x worse than per-channel. A bug (wrong scale, transposed
# weight, unquantized garbage) gives errors of order 100%.
TOLERANCE = {"lightx2v-int8": 0.03, "lightx2v-fp8": 0.08, "lightx2v-fp8-block128": 0.08,
             "comfy-scaled-fp8": 0.08, "comfy-metadata-fp8": 0.08}
EXPECTED_SCHEME = {"lightx2v-int8": "int8-w8a8", "lightx2v-fp8": "fp8-w8a8",
                   "lightx2v-fp8-block128": "fp8-block128", "comfy-scaled-fp8": "fp8-scaled",
                   "comfy-metadata-fp8": "fp8-scaled"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantized_file_samples_close_to_bf16(comfy, files, bf16_output, variant):
    model, report = load_quantized(comfy, files[variant])
    # The layers really hold quantized data served by this pack's ops, not a float copy.
    linears = [m for m in model.model.diffusion_model.modules() if getattr(m, "quant_scheme", None)]
    assert len(linears) == 2 * 10  # 2 blocks x (4 self-attn + 4 cross-attn + 2 ffn)
    assert all(m.weight.dtype in (torch.int8, torch.float8_e4m3fn) for m in linears)
    # Every layer runs the file's scheme, the few-row cross_attn.k/v included (as LightX2V runs them).
    assert {m.quant_scheme.name for m in linears} == {EXPECTED_SCHEME[variant]}
    assert EXPECTED_SCHEME[variant] in report and "saved" in report
    out = sample(comfy, model)
    err = rel_err(out, bf16_output)
    assert err < TOLERANCE[variant], f"{variant}: relative error {err:.4f}"
    assert err > 0, "identical to bf16: the quantized path did not run"


def test_report_counts_bytes(comfy, files):
    _, report = load_quantized(comfy, files["lightx2v-int8"])
    assert "int8-w8a8: 20 layers" in report and "weight-only" not in report
    assert "group ffn.0: int8-w8a8" in report and "group self_attn.q: int8-w8a8" in report


@CPU_ONLY
def test_named_backend_that_cannot_run_falls_back_visibly(comfy, files, bf16_output, caplog):
    # 'torch' needs CUDA; on the CPU the loader must still work through the reference path.
    model, _ = load_quantized(comfy, files["lightx2v-fp8"], backend="torch")
    out = sample(comfy, model)
    assert rel_err(out, bf16_output) < TOLERANCE["lightx2v-fp8"]
    assert any("cannot run" in r.message for r in caplog.records)


@CPU_ONLY
def test_report_names_the_fallback(comfy, files):
    _, report = load_quantized(comfy, files["lightx2v-fp8"], backend="torch")
    assert "backend 'torch' cannot run fp8-w8a8 on cpu" in report
    assert "kernel: reference on cpu" in report


@pytest.mark.parametrize("scheme,layout", [("fp8-sgl", "lightx2v"), ("fp8-scaled", "comfyui-metadata")])
def test_unquantized_layers_keep_the_dtype_stock_comfyui_gives_them(comfy, models_dir, scheme, layout, monkeypatch):
    # ComfyUI stores a model in its file's most common dtype when that is fp8 and the device computes
    # in fp8 (every fp8 GPU; here ComfyUI's own --supports-fp8-compute switch). In a real-sized fp8
    # file the quantized weights dominate; stock ComfyUI's loader of quantized files, and this one,
    # keep the embeddings and head in the dtype the device gives the bf16 model instead.
    import comfy.model_management as mm
    from comfy.utils import weight_dtype
    from safetensors.torch import load_file
    from wan_fixtures import convert, save, wan21_dit
    src, dst = os.path.join(models_dir, "deep_bf16.safetensors"), f"deep_{layout}.safetensors"
    save(wan21_dit(dim=256, ffn_dim=1024, num_layers=4, seed=2), src)
    convert(src, os.path.join(models_dir, dst), scheme, layout)
    assert weight_dtype(load_file(os.path.join(models_dir, dst))) == torch.float8_e4m3fn
    monkeypatch.setattr(mm, "SUPPORT_FP8_OPS", True)
    model, _ = load_quantized(comfy, dst)
    (bf16,) = comfy[0].UNETLoader().load_unet("deep_bf16.safetensors", "default")
    for name in ("text_embedding.0", "head.head", "time_embedding.0"):
        ours = model.model.diffusion_model.get_submodule(name).weight.dtype
        assert ours == bf16.model.diffusion_model.get_submodule(name).weight.dtype != torch.float8_e4m3fn, name
