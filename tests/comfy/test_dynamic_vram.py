"""Quantized layers stay out of ComfyUI's DynamicVRAM (nodes/dynamic_vram.py).

ComfyUI's ModelPatcherDynamic needs CUDA and comfy-aimdo's native library, so on the CPU a
stand-in patcher plays it: a real ModelPatcher that says is_dynamic() and borrows ComfyUI's own
get_non_dynamic_delegate. What the pack does with a dynamic input is all that these tests check;
the real ModelPatcherDynamic runs in test_dynamic_vram_gpu.py on the GPU machine.
"""
from __future__ import annotations

import pytest
import torch

import encoder_fixtures as ef
import tiny_dits
from scripts.tiny_models import clip_l_text, save

PROMPT = "a cat walks on the beach at sunset"


@pytest.fixture(scope="module")
def patchers(comfy):
    import comfy.model_patcher as mp

    class DynamicStandIn(mp.ModelPatcher):
        non_dynamic_delegate_model = None
        get_non_dynamic_delegate = mp.ModelPatcherDynamic.get_non_dynamic_delegate

        def is_dynamic(self):
            return True

    return mp, DynamicStandIn


@pytest.fixture
def dynamic_default(patchers, monkeypatch):
    """ComfyUI with DynamicVRAM on: core loaders build the (stand-in) dynamic patcher until the
    test calls the returned function, which turns it off again."""
    mp, stand_in = patchers
    monkeypatch.setattr(mp, "CoreModelPatcher", stand_in)
    return lambda: monkeypatch.setattr(mp, "CoreModelPatcher", mp.ModelPatcher)


@pytest.fixture(scope="module")
def files(models_dir):
    return tiny_dits.write(str(models_dir), "dyn", seed=21)


def linear_types(model):
    return {type(m).__name__ for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)}


def test_quantize_model_from_a_dynamic_core_loader_gets_a_fresh_legacy_copy(comfy, files, dynamic_default):
    model = tiny_dits.load(comfy, files, "wan")
    assert model.is_dynamic() and model.cached_patcher_init is not None
    quantized, report = tiny_dits.quantize(comfy, model, "int8-w8a8")
    assert type(quantized).__name__ == "ModelPatcher" and not quantized.is_dynamic()
    assert quantized.model is not model.model  # loaded again from the file, as ComfyUI's TorchCompileModel does
    assert "int8-w8a8: 20 layers" in report, report
    # A second quantize of the same input reuses that copy instead of reading the file again.
    again, _ = tiny_dits.quantize(comfy, model, "fp8-w8a8")
    assert again.model is quantized.model
    # The input is untouched, and the result samples exactly as when quantized without DynamicVRAM.
    assert not model.object_patches and linear_types(model) == {"Linear"}
    dynamic_out = tiny_dits.sample(comfy, files, "wan", quantized)
    dynamic_default()  # the reference: DynamicVRAM off
    legacy, _ = tiny_dits.quantize(comfy, tiny_dits.load(comfy, files, "wan"), "int8-w8a8")
    assert torch.equal(dynamic_out, tiny_dits.sample(comfy, files, "wan", legacy))


def test_quantize_model_without_a_recorded_loader_shares_the_modules(comfy, files, patchers):
    mp, stand_in = patchers
    legacy = tiny_dits.load(comfy, files, "wan")
    model = stand_in(legacy.model, legacy.load_device, legacy.offload_device)  # a custom loader's output
    assert model.cached_patcher_init is None
    quantized, report = tiny_dits.quantize(comfy, model, "int8-w8a8")
    assert type(quantized) is mp.ModelPatcher and quantized.model is model.model
    assert "int8-w8a8: 20 layers" in report
    assert torch.isfinite(tiny_dits.sample(comfy, files, "wan", quantized)).all()


def test_layerwise_fp8_cast_leaves_dynamic_vram(comfy, files, dynamic_default):
    model = tiny_dits.load(comfy, files, "wan")
    out, _ = comfy[0].NODE_CLASS_MAPPINGS["QuantDiTLayerwiseFP8Cast"].execute(model=model, scale="per-channel").result
    assert not out.is_dynamic() and out.model is not model.model


@pytest.fixture(scope="module")
def encoder_files(comfy, tmp_path_factory):
    import folder_paths
    t5 = tmp_path_factory.mktemp("dyn_text_encoders")
    folder_paths.add_model_folder_path("text_encoders", str(t5), is_default=True)
    save(clip_l_text(), str(t5 / "dyn_clip_l.safetensors"))
    cv = tmp_path_factory.mktemp("dyn_clip_vision")
    folder_paths.add_model_folder_path("clip_vision", str(cv), is_default=True)
    return ef.write_t5_files(t5), ef.write_clip_files(cv)


def node(comfy, name, **kw):
    return tuple(comfy[0].NODE_CLASS_MAPPINGS[name].execute(**kw).result)


def test_encoder_loaders_build_legacy_patchers(comfy, encoder_files, dynamic_default):
    t5_names, clip_names = encoder_files
    clip, _ = node(comfy, "QuantDiTT5Loader", clip_name=t5_names["int8"], backend="auto")
    vision, _ = node(comfy, "QuantDiTCLIPVisionLoader", clip_name=clip_names["int8"], backend="auto")
    assert not clip.patcher.is_dynamic() and not vision.patcher.is_dynamic()
    assert vision.patcher.model is vision.model
    assert comfy[0].CLIPTextEncode().encode(clip, PROMPT)[0][0][0].isfinite().all()


def test_quantize_text_encoder_from_a_dynamic_clip_loader(comfy, encoder_files, dynamic_default):
    (clip,) = comfy[0].CLIPLoader().load_clip("dyn_clip_l.safetensors", "stable_diffusion")
    assert clip.patcher.is_dynamic()
    quantized, report = node(comfy, "QuantDiTQuantizeTextEncoder", clip=clip, scheme="int8")
    assert "int8-w8a8: 72 layers" in report, report
    assert not quantized.patcher.is_dynamic()
    # CLIP.encode runs cond_stage_model: it must be the copy the legacy patcher swaps the layers into.
    assert quantized.cond_stage_model is quantized.patcher.model is not clip.cond_stage_model
    encoded = comfy[0].CLIPTextEncode().encode(quantized, PROMPT)[0][0][0]
    dynamic_default()
    (plain,) = comfy[0].CLIPLoader().load_clip("dyn_clip_l.safetensors", "stable_diffusion")
    reference, _ = node(comfy, "QuantDiTQuantizeTextEncoder", clip=plain, scheme="int8")
    assert torch.equal(encoded, comfy[0].CLIPTextEncode().encode(reference, PROMPT)[0][0][0])


def test_quantize_clip_vision_from_a_dynamic_patcher(comfy, encoder_files, patchers):
    mp, stand_in = patchers
    vision, _ = node(comfy, "QuantDiTCLIPVisionLoader", clip_name=encoder_files[1]["fp16"], backend="auto")
    base = comfy[0].CLIPVisionEncode().encode(vision, ef.image(), "center")[0]["penultimate_hidden_states"].detach()
    # As ComfyUI's CLIPVisionLoader makes it under DynamicVRAM: no recorded way to load it again.
    vision.patcher = stand_in(vision.model, vision.patcher.load_device, vision.patcher.offload_device)
    quantized, report = node(comfy, "QuantDiTQuantizeCLIPVision", clip_vision=vision, scheme="int8")
    assert "int8-w8a8: 18 layers" in report and not quantized.patcher.is_dynamic()
    assert quantized.model is quantized.patcher.model
    out = comfy[0].CLIPVisionEncode().encode(quantized, ef.image(), "center")[0]["penultimate_hidden_states"].detach()
    assert 0 < float((out - base).norm() / base.norm()) < 0.03


def test_weights_left_in_the_files_dtype_are_cast_for_the_legacy_patcher(comfy, patchers):
    """DynamicVRAM builds models lazily: a module that does not cast in its forward keeps the file's
    dtype (bf16) next to the model's (fp16), for the dynamic loader to cast. A legacy patcher never
    casts, so a shared model gets those weights cast once; modules that cast in forward are left."""
    import comfy.ops as ops
    _, pack = comfy
    plain = ops.disable_weight_init.Linear(8, 4, dtype=torch.float16)
    casting = ops.manual_cast.Linear(8, 4, dtype=torch.float16)
    model = torch.nn.Sequential(plain, casting)
    g = torch.Generator().manual_seed(0)
    for m in model:  # as ops.py's lazy init leaves them: the file's bf16 under an fp16 model dtype
        m.weight = torch.nn.Parameter(torch.randn(4, 8, generator=g).to(torch.bfloat16), requires_grad=False)
        m.bias = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16), requires_grad=False)
        m.weight_comfy_model_dtype = torch.float16
    before = plain.weight.clone()
    assert pack.nodes.dynamic_vram.cast_lazy_weights(model) == 1
    assert plain.weight.dtype == torch.float16 and torch.equal(plain.weight.to(torch.bfloat16), before)
    assert casting.weight.dtype == torch.bfloat16 and plain.bias.dtype == torch.float16
    assert plain(torch.randn(2, 8, dtype=torch.float16)).dtype == torch.float16
