"""Save Quantized DiT on the real ComfyUI runtime: a model quantized in the graph, saved, and loaded
again with Load Quantized DiT samples exactly as before; what cannot be saved is refused."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import flux_fixtures
import wan_fixtures
from scripts.tiny_models import save, wan21_dit

WAN, FLUX = "sv_wan_bf16.safetensors", "sv_flux_bf16.safetensors"


@pytest.fixture(scope="module")
def sources(comfy, models_dir):
    save(wan21_dit(dim=256, ffn_dim=512, num_layers=2, seed=5), os.path.join(models_dir, WAN))
    flux_fixtures.write_flux(os.path.join(models_dir, FLUX))
    return {"wan": (WAN, wan_fixtures), "flux": (FLUX, flux_fixtures)}


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def comfy_device():
    import comfy.model_management
    return comfy.model_management.get_torch_device()


def node(comfy, name):
    return comfy[0].NODE_CLASS_MAPPINGS[name]


def load_bf16(comfy, file):
    return comfy[0].UNETLoader().load_unet(file, "default")[0]


def sample(comfy, fixtures, model):
    # Warm runs only: on CUDA the first sampling of a model can differ in its last bits from later
    # ones (see test_quantize_node.warm_sample).
    for _ in range(2):
        (out,) = comfy[0].KSampler().sample(model, 7, 2, 2.0, "euler", "simple", fixtures.conditioning(1),
                                            fixtures.conditioning(2), fixtures.latent(), denoise=1.0)
    return out["samples"].float()


def save_model(comfy, model, prefix, layout="auto"):
    report = node(comfy, "QuantDiTSaveQuantized").execute(model=model, filename_prefix=prefix, layout=layout).result[0]
    first = report.splitlines()[0]
    assert first.startswith("QuantDiT: saved ") and first.endswith(" in models/diffusion_models"), report
    return first[len("QuantDiT: saved "):-len(" in models/diffusion_models")], report


def reload(comfy, name):
    model, report = node(comfy, "QuantDiTLoader").execute(unet_name=name, backend="auto",
                                                          compute_dtype="default").result
    return model, report


@pytest.mark.parametrize("arch,scheme,options", [
    ("wan", "int8-w8a8", {}),
    ("wan", "fp8-w8a8", {}),
    ("wan", "fp8-block128", {}),
    ("wan", "int8-weight-only", {}),
    ("wan", "int8-w8a8", {"keep_small_m_layers": True}),   # W8A8 and weight-only layers in one file
    ("flux", "int8-w8a8", {}),
])
def test_saved_model_loads_back_and_samples_the_same(comfy, models_dir, sources, arch, scheme, options):
    file, fixtures = sources[arch]
    quantized, q_report = node(comfy, "QuantDiTQuantizeModel").execute(
        model=load_bf16(comfy, file), scheme=scheme, backend="auto", **options).result
    name, report = save_model(comfy, quantized, f"saved/{arch}_{scheme}")
    path = os.path.join(models_dir, name)
    assert os.path.isfile(path) and not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".partial")]
    with safe_open(path, framework="pt") as f:
        # The unquantized tensors keep the bf16 source's size even where ComfyUI computes in fp32.
        assert all(f.get_slice(k).get_dtype() != "F32" for k in f.keys() if not k.endswith(("_scale", "scale_weight")))
    loaded, l_report = reload(comfy, name)
    # The loader finds every layer with the scheme it ran in the graph ("int8-w8a8: 16 layers").
    for line in q_report.splitlines():
        if line.strip().split(":")[0] in ("int8-w8a8", "fp8-w8a8", "fp8-block128", "int8-weight-only"):
            assert line.strip().split(" (")[0] in l_report, (line, l_report)
    assert torch.equal(sample(comfy, fixtures, loaded), sample(comfy, fixtures, quantized))


def test_per_tensor_fp8_saves_in_comfyuis_own_layout(comfy, models_dir, sources):
    file, fixtures = sources["wan"]
    cast = node(comfy, "QuantDiTLayerwiseFP8Cast").execute(model=load_bf16(comfy, file), scale="per-tensor",
                                                           storage="float8_e4m3fn").result[0]
    name, report = save_model(comfy, cast, "saved/wan_scaled")
    assert "ComfyUI scaled fp8" in report
    with safe_open(os.path.join(models_dir, name), framework="pt") as f:
        assert "scaled_fp8" in f.keys() and "blocks.0.ffn.0.scale_weight" in f.keys()
    ours = sample(comfy, fixtures, reload(comfy, name)[0])
    assert torch.equal(ours, sample(comfy, fixtures, cast))
    # The file asks for a float matmul (two-element marker): the loader keeps it even when told to
    # run scaled fp8 as W8A8, and stock ComfyUI's UNETLoader does the same math as the cast node
    # (without the ask it would quantize the activations on an fp8 GPU: over 1% off on the H100).
    asked, w8a8_report = node(comfy, "QuantDiTLoader").execute(unet_name=name, backend="auto",
                                                               compute_dtype="default", scaled_fp8="fp8-w8a8").result
    assert "keep a bf16 matmul, as the file asks" in w8a8_report
    assert torch.equal(sample(comfy, fixtures, asked), ours)
    stock = sample(comfy, fixtures, load_bf16(comfy, name))
    assert rel_err(stock, ours) < 0.01


def test_loaded_quantized_model_saves_again_unchanged(comfy, models_dir, sources):
    file, fixtures = sources["wan"]
    quantized = node(comfy, "QuantDiTQuantizeModel").execute(model=load_bf16(comfy, file), scheme="int8-w8a8",
                                                             backend="auto").result[0]
    first, _ = save_model(comfy, quantized, "resave/a")
    second, _ = save_model(comfy, reload(comfy, first)[0], "resave/b")
    with safe_open(os.path.join(models_dir, first), framework="pt") as a, \
            safe_open(os.path.join(models_dir, second), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_every_run_writes_a_new_file(comfy, models_dir, sources):
    quantized = node(comfy, "QuantDiTQuantizeModel").execute(model=load_bf16(comfy, WAN), scheme="int8-w8a8",
                                                             backend="auto").result[0]
    first, _ = save_model(comfy, quantized, "again/wan")
    before = os.path.getmtime(os.path.join(models_dir, first))
    second, _ = save_model(comfy, quantized, "again/wan")
    assert first != second and os.path.dirname(first) == os.path.dirname(second) == "again"
    assert os.path.getmtime(os.path.join(models_dir, first)) == before


@pytest.mark.parametrize("arch", ["wan", "flux"])
def test_int8_saved_in_comfyuis_own_layout_loads_in_stock_comfyui(comfy, models_dir, sources, arch):
    file, fixtures = sources[arch]
    quantized = node(comfy, "QuantDiTQuantizeModel").execute(model=load_bf16(comfy, file), scheme="int8-w8a8",
                                                             backend="auto").result[0]
    name, report = save_model(comfy, quantized, f"native/{arch}", layout="comfyui")
    assert "ComfyUI's own" in report
    with safe_open(os.path.join(models_dir, name), framework="pt") as f:
        entries = [k for k in f.keys() if k.endswith(".comfy_quant")]
        assert entries and json.loads(bytes(f.get_tensor(entries[0]).tolist())) == {"format": "int8_tensorwise"}
    ours = sample(comfy, fixtures, quantized)
    loaded, l_report = reload(comfy, name)
    assert "comfyui-quantization-metadata" in l_report
    assert torch.equal(sample(comfy, fixtures, loaded), ours)
    # Stock ComfyUI reads the file as its own int8_tensorwise: int8 weights with their per-channel
    # scales (its math for the activations may differ from ours).
    stock = load_bf16(comfy, name)
    q = stock.model.diffusion_model.get_submodule({"wan": "blocks.0.ffn.0", "flux": "double_blocks.0.img_mlp.0"}[arch])
    assert type(q.weight).__name__ == "QuantizedTensor" and q.weight._params.scale.shape[0] == q.weight.shape[0]
    # Stock's output is as far from ours as the quantization noise itself, not more; a misread scale
    # or weight would be off by far more than that.
    bf16 = sample(comfy, fixtures, load_bf16(comfy, file))
    noise = rel_err(ours, bf16)
    assert 0 < noise < 0.03
    assert rel_err(sample(comfy, fixtures, stock), ours) < noise


def test_comfyui_layout_refuses_schemes_it_cannot_hold(comfy, models_dir, sources):
    quantized = node(comfy, "QuantDiTQuantizeModel").execute(model=load_bf16(comfy, WAN), scheme="fp8-w8a8",
                                                             backend="auto").result[0]
    with pytest.raises(Exception) as caught:
        save_model(comfy, quantized, "refused_native/wan", layout="comfyui")
    msg = str(caught.value)
    assert "comfyui layout holds fp8-scaled, int8-w8a8, not fp8-w8a8" in msg and "blocks." in msg, msg
    folder = os.path.join(models_dir, "refused_native")
    assert not os.path.isdir(folder) or not os.listdir(folder)


@pytest.mark.parametrize("case", ["unquantized", "int4", "lora", "outside"])
def test_what_cannot_be_saved_is_refused_and_nothing_is_written(comfy, models_dir, sources, case):
    bf16 = load_bf16(comfy, WAN)
    prefix = f"refused/{case}"
    if case == "unquantized":
        model, expected = bf16, "no quantized layers"
    elif case == "int4":
        model = node(comfy, "QuantDiTQuantizeModel").execute(model=bf16, scheme="int4-g128", backend="auto").result[0]
        expected = "blocks.0."  # names a layer, and its scheme
    elif case == "lora":
        model = node(comfy, "QuantDiTQuantizeModel").execute(model=bf16, scheme="int8-w8a8", backend="auto").result[0]
        model = model.clone()
        assert model.add_patches({"diffusion_model.blocks.0.ffn.0.weight": (torch.zeros(512, 256),)}, 1.0)
        expected = "LoRA"
    else:
        model = node(comfy, "QuantDiTQuantizeModel").execute(model=bf16, scheme="int8-w8a8", backend="auto").result[0]
        prefix, expected = "../outside", "outside"
    with pytest.raises(Exception) as caught:
        node(comfy, "QuantDiTSaveQuantized").execute(model=model, filename_prefix=prefix)
    assert expected in str(caught.value), str(caught.value)
    if case == "int4":
        assert "int4-g128" in str(caught.value)
    folder = os.path.join(models_dir, "refused")
    assert not os.path.isdir(folder) or not os.listdir(folder)
    assert not os.path.exists(os.path.join(os.path.dirname(str(models_dir)), "outside_00001_.safetensors"))
