"""Quantize Model and Layerwise FP8 Cast on models loaded with ComfyUI's own loaders."""
from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import save_file

import flux_fixtures
import wan_fixtures
from scripts.tiny_models import save, wan21_dit

SCHEMES = ["fp8-w8a8", "int8-w8a8", "fp8-block128", "fp8-weight-only", "int8-weight-only", "int4-g128"]
# Relative L2 error of the sampled latent vs bf16 after 3 steps. Measured on Wan (Flux is ~5x
# lower): fp8-w8a8 1.6%, int8-w8a8 0.44%, fp8-block128 1.7%, fp8-weight-only 1.4%,
# int8-weight-only 0.36%, int4-g128 6.4%, per-tensor fp8 ~3.7%. Tolerances are ~2.5x those.
TOLERANCE = {"fp8-w8a8": 0.04, "int8-w8a8": 0.012, "fp8-block128": 0.04, "fp8-weight-only": 0.035,
             "int8-weight-only": 0.01, "int4-g128": 0.15, "fp8-scaled": 0.08,
             "fp8-e5m2-weight-only": 0.075, "fp8-e5m2-scaled": 0.075}  # e5m2 cast measured 3.0%


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


class Arch:
    def __init__(self, name, file, conditioning, latent, n_block_linears, n_modulation=0):
        self.name, self.file, self.cond, self.latent = name, file, conditioning, latent
        self.n_block_linears, self.n_modulation = n_block_linears, n_modulation


@pytest.fixture(scope="module")
def archs(comfy, models_dir):
    wan = os.path.join(models_dir, "q_wan_bf16.safetensors")
    save(wan21_dit(dim=256, ffn_dim=512, num_layers=2, seed=3), wan)
    flux = os.path.join(models_dir, "q_flux_bf16.safetensors")
    flux_fixtures.write_flux(flux)
    return {
        # Wan: 2 blocks x 10 linears, of which cross_attn.k/v (4) see only the text context.
        "wan": Arch("wan", "q_wan_bf16.safetensors", wan_fixtures.conditioning, wan_fixtures.latent, 20),
        # Flux: 1 double block (img/txt qkv, proj, mlp.0, mlp.2 = 8) + 2 single blocks (linear1/2 = 4);
        # the 4 text-stream linears run on few rows: 8-bit weight-only under W8A8. Plus 4 modulation
        # linears (img_mod.lin, txt_mod.lin, 2x modulation.lin), quantized weight-only by default.
        "flux": Arch("flux", "q_flux_bf16.safetensors", flux_fixtures.conditioning, flux_fixtures.latent, 12, 4),
    }


def load_bf16(comfy, arch):
    nodes, _ = comfy
    return nodes.UNETLoader().load_unet(arch.file, "default")[0]


def sample(comfy, arch, model):
    nodes, _ = comfy
    (out,) = nodes.KSampler().sample(model, 11, 3, 2.0, "euler", "simple", arch.cond(1), arch.cond(2),
                                     arch.latent(), denoise=1.0)
    return out["samples"].float()


def quantize(comfy, model, scheme, **kw):
    nodes, _ = comfy
    out = nodes.NODE_CLASS_MAPPINGS["QuantDiTQuantizeModel"].execute(model=model, scheme=scheme, backend="auto", **kw)
    return tuple(out.result)


def fp8_cast(comfy, model, scale, storage="float8_e4m3fn"):
    nodes, _ = comfy
    out = nodes.NODE_CLASS_MAPPINGS["QuantDiTLayerwiseFP8Cast"].execute(model=model, scale=scale, storage=storage)
    return tuple(out.result)


def warm_sample(comfy, arch, model):
    # On CUDA the first sampling of Wan's fp16 model differs in its last bits from every later one
    # (measured 6e-4 relative, without any reload): compare warm runs only.
    sample(comfy, arch, model)
    return sample(comfy, arch, model)


@pytest.fixture(scope="module")
def baselines(comfy, archs):
    return {k: warm_sample(comfy, a, load_bf16(comfy, a)) for k, a in archs.items()}


@pytest.mark.parametrize("arch_name", ["wan", "flux"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_through_ksampler(comfy, archs, baselines, arch_name, scheme):
    arch = archs[arch_name]
    model = load_bf16(comfy, arch)
    qmodel, report = quantize(comfy, model, scheme)
    # By default every quantized layer runs the scheme, the few-row and modulation layers included.
    assert f"{scheme}: {arch.n_block_linears + arch.n_modulation} layers" in report, report
    if arch.n_modulation:
        assert f"{arch.n_modulation} modulation (adaLN) layers run {scheme}" in report, report
    err = rel_err(sample(comfy, arch, qmodel), baselines[arch_name])
    assert 0 < err < TOLERANCE[scheme], f"{arch_name}/{scheme}: relative error {err:.4f}"
    # The input MODEL still produces exactly its old output.
    assert torch.equal(sample(comfy, arch, model), baselines[arch_name])


@pytest.mark.parametrize("scale,storage,scheme", [
    ("per-channel", "float8_e4m3fn", "fp8-weight-only"), ("per-tensor", "float8_e4m3fn", "fp8-scaled"),
    ("per-channel", "float8_e5m2", "fp8-e5m2-weight-only"), ("per-tensor", "float8_e5m2", "fp8-e5m2-scaled")])
def test_layerwise_fp8_cast(comfy, archs, baselines, scale, storage, scheme):
    arch = archs["wan"]
    model = load_bf16(comfy, arch)
    cast, report = fp8_cast(comfy, model, scale, storage)
    assert f"{scheme}: 20 layers" in report  # weight-only: the context k/v are cast too
    dtype = getattr(torch, storage)
    assert all(v.weight.dtype == dtype for v in cast.object_patches.values() if getattr(v, "quant_scheme", None))
    err = rel_err(sample(comfy, arch, cast), baselines["wan"])
    assert 0 < err < TOLERANCE[scheme]
    assert torch.equal(sample(comfy, arch, model), baselines["wan"])


FLUX_MODULATION = ["double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin",
                   "single_blocks.0.modulation.lin", "single_blocks.1.modulation.lin"]


def block_linear_bytes(model):
    """Bytes of the block linears' weights and scales in a patched model that was not loaded yet
    (loading swaps patches into the shared modules); unquantized ones at 2 bytes a weight (bf16:
    on the CPU ComfyUI holds them in fp32)."""
    total = 0
    for name, m in model.model.diffusion_model.named_modules():
        m = model.object_patches.get(f"diffusion_model.{name}", m)
        if "blocks." in name and isinstance(m, torch.nn.Linear):
            if getattr(m, "quant_scheme", None) is None:
                total += m.weight.numel() * 2
            else:
                total += m.weight.numel() * m.weight.element_size() + m.weight_scale.numel() * 4
    return total


def linear_ratio(report):
    return float(re.search(r"all linears: ([0-9.]+)x of bf16", report).group(1))


@pytest.mark.parametrize("scheme,partner", [("fp8-w8a8", "fp8-weight-only"), ("int8-w8a8", "int8-weight-only")])
def test_flux_modulation_quantized(comfy, archs, baselines, scheme, partner):
    arch = archs["flux"]
    model = load_bf16(comfy, arch)
    on, report_on = quantize(comfy, model, scheme)  # the node default: W8A8 on modulation too
    few_rows, _ = quantize(comfy, model, scheme, keep_small_m_layers=True)
    off, report_off = quantize(comfy, model, scheme, quantize_modulation=False)
    for name in FLUX_MODULATION:
        q = on.object_patches[f"diffusion_model.{name}"]
        assert q.quant_scheme.name == scheme and q.weight.dtype in (torch.float8_e4m3fn, torch.int8), name
        assert few_rows.object_patches[f"diffusion_model.{name}"].quant_scheme.name == partner, name
        assert f"diffusion_model.{name}" not in off.object_patches, name
        assert type(off.get_model_object(f"diffusion_model.{name}")).__name__ == "Linear"
    assert "modulation (adaLN)" not in report_off
    # The modulation linears are 27% of the tiny Flux's block weights, as in Flux-dev.
    bf16_bytes = block_linear_bytes(model)
    assert block_linear_bytes(on) / bf16_bytes < 0.52 < 0.6 < block_linear_bytes(off) / bf16_bytes
    assert linear_ratio(report_on) < linear_ratio(report_off) - 0.05, (report_on, report_off)
    # All still match bf16 within the scheme's tolerance.
    for m in (on, few_rows, off):
        err = rel_err(sample(comfy, arch, m), baselines["flux"])
        assert 0 < err < TOLERANCE[scheme], f"{scheme}: relative error {err:.4f}"


def test_fp8_cast_quantizes_flux_modulation(comfy, archs):
    model = load_bf16(comfy, archs["flux"])
    cast, report = fp8_cast(comfy, model, "per-tensor")
    assert "fp8-scaled: 16 layers" in report and "4 modulation (adaLN) layers run fp8-scaled" in report, report
    assert all(cast.object_patches[f"diffusion_model.{n}"].quant_scheme.name == "fp8-scaled" for n in FLUX_MODULATION)
    nodes, _ = comfy
    _, report = nodes.NODE_CLASS_MAPPINGS["QuantDiTLayerwiseFP8Cast"].execute(
        model=model, scale="per-tensor", quantize_modulation=False).result
    assert "fp8-scaled: 12 layers" in report, report


def test_patched_layers_hold_fp8_or_int8_data(comfy, archs):
    model = load_bf16(comfy, archs["wan"])
    qmodel, _ = quantize(comfy, model, "int8-w8a8")
    patched = [v for k, v in qmodel.object_patches.items() if getattr(v, "quant_scheme", None)]
    assert len(patched) == 20 and all(p.weight.dtype == torch.int8 for p in patched)
    assert all(p.quant_scheme.name == "int8-w8a8" for p in patched)  # context k/v included
    few_rows, _ = quantize(comfy, model, "int8-w8a8", keep_small_m_layers=True)
    kinds = sorted(v.quant_scheme.name for v in few_rows.object_patches.values() if getattr(v, "quant_scheme", None))
    assert kinds.count("int8-w8a8") == 16 and kinds.count("int8-weight-only") == 4  # context k/v
    # The source layers are untouched bf16.
    src = model.model.diffusion_model.blocks[0].ffn[0]
    assert src.weight.dtype != torch.int8 and getattr(src, "quant_scheme", None) is None


def test_requantizing_is_detected_and_reported(comfy, archs, baselines):
    model = load_bf16(comfy, archs["wan"])
    once, _ = quantize(comfy, model, "int8-w8a8")
    twice, report = quantize(comfy, once, "fp8-w8a8")
    assert "already quantized (int8-w8a8)" in report
    assert "kept 20 layers: already quantized (int8-w8a8)" in report
    # Every block linear was quantized the first time: nothing new is quantized.
    assert "nothing new to quantize" in report and "fp8-w8a8:" not in report
    assert torch.equal(sample(comfy, archs["wan"], twice), sample(comfy, archs["wan"], once))


def test_skip_patterns_and_small_m_switch(comfy, archs):
    model = load_bf16(comfy, archs["wan"])
    _, report = quantize(comfy, model, "fp8-w8a8", skip_patterns="blocks.0., ffn.2", keep_small_m_layers=False)
    # 20 block linears - 10 in block 0 - 1 ffn.2 in block 1 = 9
    assert "fp8-w8a8: 9 layers" in report, report
    assert "matches the user skip pattern" in report


def test_alias_names_work_and_announce_missing_kernels(comfy, archs):
    model = load_bf16(comfy, archs["wan"])
    _, report = quantize(comfy, model, "int8-vllm")
    assert "int8-w8a8: 20 layers" in report
    _, pack = comfy
    device = model.load_device
    if pack.quant.backends.why_not("vllm", pack.quant.schemes.get_scheme("int8-w8a8"), device) is None:
        assert "kernel: vllm" in report, report  # the GPU machine with vLLM's library
    else:
        assert f"backend 'vllm' cannot run int8-w8a8 on {device.type}" in report, report


def test_unknown_scheme_lists_valid_ones(comfy, archs):
    _, pack = comfy
    model = load_bf16(comfy, archs["wan"])
    with pytest.raises(pack.quant.schemes.UnknownSchemeError, match="fp8-w8a8"):
        quantize(comfy, model, "fp7-magic")


def _make_lora(path, rank=4, scale=1.0, seed=5):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in range(2):
        for layer, (out_f, in_f) in {"ffn.0": (512, 256), "self_attn.q": (256, 256)}.items():
            key = f"diffusion_model.blocks.{b}.{layer}"
            sd[key + ".lora_A.weight"] = torch.randn(rank, in_f, generator=g) * scale / in_f ** 0.5
            sd[key + ".lora_B.weight"] = torch.randn(out_f, rank, generator=g) * scale
    save_file(sd, path)


@pytest.fixture(scope="module")
def lora_name(comfy, tmp_path_factory):
    import folder_paths
    d = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(d), is_default=True)
    _make_lora(os.path.join(d, "tiny_wan_lora.safetensors"))
    return "tiny_wan_lora.safetensors"


@pytest.mark.parametrize("scheme", ["int8-w8a8", "fp8-w8a8", "int8-weight-only"])
def test_lora_before_and_after_quantization(comfy, archs, baselines, lora_name, scheme):
    """The LoRA's effect (output with LoRA - output without) survives quantization in both orders."""
    nodes, _ = comfy
    arch = archs["wan"]
    lora = nodes.LoraLoaderModelOnly()
    effect = sample(comfy, arch, lora.load_lora_model_only(load_bf16(comfy, arch), lora_name, 1.0)[0]) - baselines["wan"]
    assert float(effect.norm() / baselines["wan"].norm()) > 0.02, "the test LoRA must visibly change the output"
    plain_q = sample(comfy, arch, quantize(comfy, load_bf16(comfy, arch), scheme)[0])
    with_lora = lora.load_lora_model_only(load_bf16(comfy, arch), lora_name, 1.0)[0]
    orders = {
        "lora-then-quantize": quantize(comfy, with_lora, scheme)[0],
        "quantize-then-lora": lora.load_lora_model_only(quantize(comfy, load_bf16(comfy, arch), scheme)[0],
                                                        lora_name, 1.0)[0],
    }
    for name, m in orders.items():
        q_effect = sample(comfy, arch, m) - plain_q
        # Quantization noise on top of the effect stays well below the effect itself.
        assert rel_err(q_effect, effect) < 0.25, f"{name}: effect error {rel_err(q_effect, effect):.3f}"


def test_lora_unpatch_restores_the_quantized_model(comfy, archs, lora_name):
    """After a LoRA'd clone ran, the un-LoRA'd quantized model gives its own output again
    (ComfyUI restores the weight; the patched scale must not leak)."""
    nodes, _ = comfy
    arch = archs["wan"]
    q = quantize(comfy, load_bf16(comfy, arch), "int8-w8a8")[0]
    first = sample(comfy, arch, q)
    sample(comfy, arch, nodes.LoraLoaderModelOnly().load_lora_model_only(q, lora_name, 1.0)[0])
    assert torch.equal(sample(comfy, arch, q), first)


def _vm_hwm_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def test_peak_memory_while_quantizing_is_bounded(comfy, models_dir):
    """Quantizing streams one layer at a time: the peak RSS rise stays near the quantized size,
    far below a second full-precision copy of the model."""
    nodes, _ = comfy
    name = "q_wan_big_bf16.safetensors"
    save(wan21_dit(dim=1024, ffn_dim=4096, num_layers=4, seed=4), os.path.join(models_dir, name))
    model = nodes.UNETLoader().load_unet(name, "default")[0]
    block_params = sum(p.numel() for n, p in model.model.diffusion_model.named_parameters()
                       if n.startswith("blocks.") and p.dim() == 2)
    for p in model.model.diffusion_model.parameters():
        p.data.add_(0)  # page the (possibly mmapped) weights in before measuring
    fp32_copy_kib = block_params * 4 // 1024
    int8_kib = block_params // 1024
    largest_layer_fp32_kib = 4096 * 1024 * 4 // 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = _vm_hwm_kib()
    q, _ = quantize(comfy, model, "int8-w8a8", keep_small_m_layers=False)
    rise = _vm_hwm_kib() - start
    bound = int8_kib + 3 * largest_layer_fp32_kib + 32 * 1024
    print(f"peak RSS rise {rise / 1024:.0f} MiB; int8 copy {int8_kib / 1024:.0f} MiB; "
          f"a full fp32 copy would be {fp32_copy_kib / 1024:.0f} MiB; bound {bound / 1024:.0f} MiB")
    assert rise < bound
    assert bound < fp32_copy_kib  # the bound really excludes a second full-precision copy


@pytest.mark.skipif(os.environ.get("QUANTDIT_COMFY_DEVICE", "cpu") == "cuda",
                    reason="fakes an Ampere GPU for the torch backend alone; on a real GPU the other providers answer")
def test_scheme_without_fast_kernel_on_a_gpu_is_announced(comfy, archs, monkeypatch):
    """fp8 W8A8 on a GPU below compute capability 8.9: the report says the emulation runs and why."""
    _, pack = comfy
    import dataclasses
    registry = pack.quant.backends.registry
    # An Ampere GPU (8.6): CUDA is there, fp8 tensor cores are not.
    monkeypatch.setattr(pack.quant.backends.torch_native, "cuda_capability", lambda device: (8, 6))
    monkeypatch.setitem(registry._BACKENDS, "torch",
                        dataclasses.replace(registry._BACKENDS["torch"], availability=lambda: None))
    report = pack.quant.report.QuantReport(source="x", layout="y", schemes={"fp8-w8a8": 1})
    pack.quant.report.describe_kernels(report, torch.device("cuda", 0), "auto")
    text = report.text()
    assert "kernel: reference on cuda:0" in text
    assert "no fast kernel for fp8-w8a8 on cuda:0" in text and "8.9" in text, text
