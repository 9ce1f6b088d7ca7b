"""Bad files through the real loader node: each error names the file, the layer and a fix, and
nothing is ever loaded silently as unquantized."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_dit_loader import load_quantized
from wan_fixtures import write_all


@pytest.fixture(scope="module")
def files(models_dir):
    return write_all(models_dir)


def variant_of(models_dir, files, base, name, edit):
    """Write `name` = the `base` file with `edit(state_dict)` applied; returns the file name."""
    sd = load_file(os.path.join(models_dir, files[base]))
    edit(sd)
    save_file(sd, os.path.join(models_dir, name))
    return name


def expect_error(comfy, name, *needles):
    _, pack = comfy
    with pytest.raises(pack.quant.errors.CheckpointError) as e:
        load_quantized(comfy, name)
    msg = str(e.value)
    assert name in msg, msg
    assert "Fix:" in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_scale(comfy, models_dir, files):
    name = variant_of(models_dir, files, "lightx2v-int8", "bad_missing_scale.safetensors",
                      lambda sd: sd.pop("blocks.0.ffn.0.weight_scale"))
    expect_error(comfy, name, "blocks.0.ffn.0", "weight_scale")


def test_scale_of_wrong_shape(comfy, models_dir, files):
    def edit(sd):
        sd["blocks.1.self_attn.q.weight_scale"] = torch.ones(256, 2)
    name = variant_of(models_dir, files, "lightx2v-int8", "bad_scale_shape.safetensors", edit)
    expect_error(comfy, name, "blocks.1.self_attn.q", "[256, 2]")


def test_unknown_dtype(comfy, models_dir, files):
    def edit(sd):
        sd["blocks.0.ffn.2.weight"] = sd["blocks.0.ffn.2.weight"].to(torch.int16)
    name = variant_of(models_dir, files, "lightx2v-int8", "bad_dtype.safetensors", edit)
    expect_error(comfy, name, "blocks.0.ffn.2", "I16")


def test_layer_shape_disagrees_with_model(comfy, models_dir, files):
    def edit(sd):
        # block 1's FFN is wider than block 0's, from which ComfyUI infers ffn_dim.
        sd["blocks.1.ffn.0.weight"] = torch.zeros(528, 256, dtype=torch.int8)
        sd["blocks.1.ffn.0.weight_scale"] = torch.ones(528, 1)
        sd["blocks.1.ffn.0.bias"] = torch.zeros(528, dtype=torch.bfloat16)
    name = variant_of(models_dir, files, "lightx2v-int8", "bad_layer_shape.safetensors", edit)
    expect_error(comfy, name, "blocks.1.ffn.0", "[528, 256]", "[512, 256]")


def test_truncated_file(comfy, models_dir, files):
    src = os.path.join(models_dir, files["lightx2v-fp8"])
    data = open(src, "rb").read()
    with open(os.path.join(models_dir, "bad_truncated.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])
    expect_error(comfy, "bad_truncated.safetensors", "truncated")


def test_not_a_safetensors_file(comfy, models_dir):
    torch.save({"x": torch.zeros(3)}, os.path.join(models_dir, "bad_pickle.safetensors"))
    expect_error(comfy, "bad_pickle.safetensors", "not a safetensors file")


def test_quantized_tensor_without_any_scale_info(comfy, models_dir, files):
    # int8 data with no scale anywhere: must never be read as plain numbers.
    def edit(sd):
        for k in [k for k in sd if k.endswith(".weight_scale")]:
            del sd[k]
    name = variant_of(models_dir, files, "lightx2v-int8", "bad_no_scales.safetensors", edit)
    expect_error(comfy, name, "int8 weight has no")


def test_unquantized_file_is_refused_with_a_pointer(comfy, files):
    expect_error(comfy, files["bf16"], "holds no quantized layers", "Load Diffusion Model")


def test_unsupported_comfy_format(comfy, models_dir, files):
    src = os.path.join(models_dir, files["comfy-metadata-fp8"])
    from safetensors import safe_open
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    sd = load_file(src)
    meta["_quantization_metadata"] = meta["_quantization_metadata"].replace("float8_e4m3fn", "nvfp4", 1)
    save_file(sd, os.path.join(models_dir, "bad_nvfp4.safetensors"), metadata=meta)
    expect_error(comfy, "bad_nvfp4.safetensors", "nvfp4", "no kernel for", "Load Diffusion Model")
    meta["_quantization_metadata"] = meta["_quantization_metadata"].replace("nvfp4", "float3_made_up", 1)
    save_file(sd, os.path.join(models_dir, "bad_unknown.safetensors"), metadata=meta)
    expect_error(comfy, "bad_unknown.safetensors", "'float3_made_up' is not supported", "Load Diffusion Model")


def test_source_files_are_untouched(comfy, models_dir, files):
    path = os.path.join(models_dir, files["lightx2v-int8"])
    before = (os.path.getmtime(path), open(path, "rb").read())
    load_quantized(comfy, files["lightx2v-int8"])
    assert (os.path.getmtime(path), open(path, "rb").read()) == before
