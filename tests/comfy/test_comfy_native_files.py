"""ComfyUI's own quantized files through Load Quantized DiT. ComfyUI makes them here: its quantizer
(comfy.quant_ops, comfy-kitchen) writes a `_quantization_metadata` file, stock UNETLoader loads it,
and ComfyUI's ModelSave node writes the per-layer `comfy_quant` layout it saves today. The pack
reads both, serves the layers with its own kernels, and samples close to the bf16 model."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import wan_fixtures
from scripts.comfy_quantized import LAYOUT_OF, comfy_quantized
from scripts.tiny_models import save, wan21_dit

BF16 = "cn_wan_bf16.safetensors"
# variant -> (ComfyUI format, quantize kwargs, the scheme the pack runs on the CPU)
VARIANTS = {
    "fp8": ("float8_e4m3fn", {}, "fp8-scaled"),
    "int8": ("int8_tensorwise", {}, "int8-w8a8"),
    "int8-per-channel": ("int8_tensorwise", {"per_channel": True}, "int8-w8a8"),
    "mxfp8": ("mxfp8", {}, "fp8-w8a8"),  # its block scales folded onto one per channel
}
# Relative error of 3 euler steps against bf16 (as tests/comfy/test_dit_loader.py): per-tensor fp8
# weights are the coarsest; a misread scale or weight is off by ~100%.
TOLERANCE = {"fp8": 0.08, "int8": 0.05, "int8-per-channel": 0.03, "mxfp8": 0.05}
QUANTIZED = 20  # 2 blocks x (4 self-attn + 4 cross-attn + 2 ffn) linears


def comfy_quantized_file(models_dir, name, fmt, kw):
    """The bf16 file's block linears quantized by ComfyUI's own quantizer, in the header layout."""
    sd, meta = comfy_quantized(load_file(os.path.join(models_dir, BF16)), fmt, lambda k: k.startswith("blocks."), **kw)
    save_file(sd, os.path.join(models_dir, name), metadata=meta)
    return name


def model_saved_by_comfyui(comfy, models_dir, source, prefix):
    """Stock UNETLoader -> ComfyUI's ModelSave: the file ComfyUI itself writes for a quantized model."""
    from comfy_extras.nodes_model_merging import ModelSave
    (model,) = comfy[0].UNETLoader().load_unet(source, "default")
    saver = ModelSave()
    saver.output_dir = str(models_dir)
    saver.save(model, prefix)
    return f"{prefix}_00001_.safetensors"


@pytest.fixture(scope="module")
def files(comfy, models_dir):
    save(wan21_dit(dim=256, ffn_dim=512, num_layers=2, seed=3), os.path.join(models_dir, BF16))
    out = {}
    for variant, (fmt, kw, _) in VARIANTS.items():
        header = comfy_quantized_file(models_dir, f"cn_{variant}_header.safetensors", fmt, kw)
        out[variant, "header"] = header
        out[variant, "in-file"] = model_saved_by_comfyui(comfy, models_dir, header, f"cn_{variant}_comfy_quant")
    return out


def sample(comfy, model):
    for _ in range(2):  # warm runs only (see test_quantize_node.warm_sample)
        (out,) = comfy[0].KSampler().sample(model, 7, 3, 2.0, "euler", "simple", wan_fixtures.conditioning(1),
                                            wan_fixtures.conditioning(2), wan_fixtures.latent(), denoise=1.0)
    return out["samples"].float()


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def load(comfy, name, scaled_fp8="auto"):
    return comfy[0].NODE_CLASS_MAPPINGS["QuantDiTLoader"].execute(
        unet_name=name, backend="auto", compute_dtype="default", scaled_fp8=scaled_fp8).result


@pytest.fixture(scope="module")
def bf16_output(comfy, files):
    return sample(comfy, comfy[0].UNETLoader().load_unet(BF16, "default")[0])


def cpu_run():
    return os.environ.get("QUANTDIT_COMFY_DEVICE", "cpu") != "cuda"


def test_modelsave_writes_the_in_file_layout(models_dir, files):
    # What the loader must read: ComfyUI's own save, with a comfy_quant entry per quantized layer.
    with safe_open(os.path.join(models_dir, files["int8", "in-file"]), "pt") as f:
        keys = set(f.keys())
        assert "_quantization_metadata" not in (f.metadata() or {})
        entry = f.get_tensor("model.diffusion_model.blocks.0.self_attn.q.comfy_quant")
    assert json.loads(bytes(entry.tolist())) == {"format": "int8_tensorwise"}
    assert sum(k.endswith(".comfy_quant") for k in keys) == QUANTIZED


@pytest.mark.parametrize("where", ["header", "in-file"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_comfyui_files_sample_close_to_bf16(comfy, files, bf16_output, variant, where):
    model, report = load(comfy, files[variant, where])
    linears = [m for m in model.model.diffusion_model.modules() if getattr(m, "quant_scheme", None)]
    assert len(linears) == QUANTIZED
    expected = VARIANTS[variant][2] if cpu_run() or variant != "fp8" else "fp8-w8a8"
    assert {m.quant_scheme.name for m in linears} == {expected}
    assert f"{expected}" in report and "comfyui-quantization-metadata" in report
    err = rel_err(sample(comfy, model), bf16_output)
    assert 0 < err < TOLERANCE[variant], f"{variant} ({where}): relative error {err:.4f}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_both_layouts_load_the_same_model(comfy, files, variant):
    header, _ = load(comfy, files[variant, "header"])
    in_file, _ = load(comfy, files[variant, "in-file"])
    assert torch.equal(sample(comfy, header), sample(comfy, in_file))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_mean_what_they_mean_to_comfyui(comfy, files, variant):
    # The pack's dequantized weight equals ComfyUI's own dequantization of the same layer.
    from quant import reference
    ours, _ = load(comfy, files[variant, "in-file"])
    (stock,) = comfy[0].UNETLoader().load_unet(files[variant, "in-file"], "default")
    for path in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
        mine = ours.model.diffusion_model.get_submodule(path)
        theirs = stock.model.diffusion_model.get_submodule(path).weight.dequantize().float().cpu()
        w = reference.dequantize_weight(mine.weight.cpu(), mine.weight_scale.cpu(), mine.quant_scheme,
                                        mine.in_features).float()
        # ComfyUI dequantizes to bf16. mxfp8 values shifted below fp8's normal range round to its
        # subnormal step, 2^-9 of the row scale.
        slack = 2 ** -10 * mine.weight_scale.cpu() if variant == "mxfp8" else 0
        assert ((w - theirs).abs() <= 2 ** -8 * theirs.abs() + slack).all(), path


def test_scaled_fp8_can_run_w8a8_or_as_stored(comfy, files, bf16_output):
    name = files["fp8", "in-file"]
    w8a8, report = load(comfy, name, "fp8-w8a8")
    stored, _ = load(comfy, name, "fp8-scaled")
    assert {m.quant_scheme.name for m in w8a8.model.diffusion_model.modules() if getattr(m, "quant_scheme", None)} \
        == {"fp8-w8a8"}
    assert f"{QUANTIZED} per-tensor fp8 layers run fp8 W8A8" in report
    from quant import reference
    weights = []
    for m in (w8a8, stored):  # the same weight, its one scale repeated per channel
        q = m.model.diffusion_model.get_submodule("blocks.0.ffn.0")
        weights.append(reference.dequantize_weight(q.weight.cpu(), q.weight_scale.cpu(), q.quant_scheme,
                                                   q.in_features))
    assert torch.equal(*weights)
    a, b = sample(comfy, w8a8), sample(comfy, stored)
    assert not torch.equal(a, b), "the activations were not quantized"
    assert rel_err(a, bf16_output) < TOLERANCE["fp8"] and rel_err(a, b) < TOLERANCE["fp8"]


@pytest.mark.parametrize("fmt", ["nvfp4"])
def test_formats_without_a_kernel_are_refused(comfy, models_dir, files, fmt):
    from comfy.quant_ops import get_layout_class
    if get_layout_class(LAYOUT_OF[fmt]) is None:
        pytest.fail(f"comfy-kitchen has no {LAYOUT_OF[fmt]}: update it (ComfyUI's requirements)")
    name = comfy_quantized_file(models_dir, f"cn_{fmt}.safetensors", fmt, {})
    with pytest.raises(Exception) as e:
        load(comfy, name)
    msg = str(e.value)
    assert type(e.value).__name__ == "CheckpointError" and name in msg and fmt in msg, msg
    assert "layer 'blocks." in msg and "Load Diffusion Model" in msg, msg


def test_lightx2v_mxfp8_export_loads_as_comfyui_mxfp8(comfy, models_dir, files):
    # LightX2V's w8a8-mxfp8 export holds the same tensors without ComfyUI's entries, its e4m3 bytes
    # as uint8 (what its quantizer returns): the same model.
    sd = load_file(os.path.join(models_dir, files["mxfp8", "header"]))
    lightx2v = {k: (v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v) for k, v in sd.items()}
    assert sum(v.dtype == torch.uint8 for v in lightx2v.values()) == QUANTIZED
    save_file(lightx2v, os.path.join(models_dir, "cn_mxfp8_lightx2v.safetensors"))
    model, report = load(comfy, "cn_mxfp8_lightx2v.safetensors")
    assert f"fp8-w8a8: {QUANTIZED} layers" in report and "lightx2v" in report, report
    header, _ = load(comfy, files["mxfp8", "header"])
    assert torch.equal(sample(comfy, model), sample(comfy, header))
