"""ComfyUI's own quantized-file layout in quant/formats: per-layer `X.comfy_quant` uint8 tensors
holding JSON (what ComfyUI saves today) or the `_quantization_metadata` header entry. The files here
are written by hand in that layout; tests/comfy/test_comfy_native_files.py has ComfyUI write them."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from quant import reference as R
from quant.errors import CheckpointError
from quant.formats import detect
from quant.formats.detect import plan_checkpoint
from quant.formats.load import load_checkpoint, scaled_fp8_as_w8a8
from quant.formats.safetensors_file import SafetensorsFile
from quant.schemes import get_scheme

A, B = "blocks.0.self_attn.q", "blocks.0.ffn.0"
OUT, IN = 32, 64


def conf(**entry) -> torch.Tensor:
    """A comfy_quant tensor as ComfyUI writes it: the JSON's utf-8 bytes as uint8."""
    return torch.tensor(list(json.dumps(entry).encode("utf-8")), dtype=torch.uint8)


def fp8_layer(name, seed=0, scale=0.02, **entry):
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed))
    return {name + ".weight": (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn),
            name + ".weight_scale": torch.tensor(scale), name + ".bias": torch.randn(OUT),
            name + ".comfy_quant": conf(format="float8_e4m3fn", **entry)}


def int8_layer(name, scale, seed=0, **entry):
    q = torch.randint(-127, 128, (OUT, IN), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    return {name + ".weight": q, name + ".weight_scale": scale,
            name + ".comfy_quant": conf(format="int8_tensorwise", **entry)}


def write(tmp_path, sd, metadata=None, name="native.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path), metadata=metadata)
    return str(path)


def plan_of(path):
    return plan_checkpoint(SafetensorsFile(path))


def refused(path, layer, *needles):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert path in msg and "Fix:" in msg and e.value.layer == layer, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_in_file_entries_are_read_and_dropped_from_the_state_dict(tmp_path):
    sd = {**fp8_layer(A), **int8_layer(B, torch.tensor(0.01)), "head.weight": torch.randn(4, 4)}
    path = write(tmp_path, sd)
    plan = plan_of(path)
    assert {n: q.scheme for n, q in plan.layers.items()} == {A: "fp8-scaled", B: "int8-w8a8"}
    assert plan.layouts() == {detect.COMFY_QUANT_METADATA}
    assert sorted(plan.ignored_keys) == sorted([A + ".comfy_quant", B + ".comfy_quant"])
    out, plan, _ = load_checkpoint(path)
    assert not [k for k in out if k.endswith("comfy_quant")]
    assert out[A + ".weight"].dtype == torch.float8_e4m3fn and out[A + ".weight_scale"].shape == ()
    assert torch.equal(out[A + ".bias"], sd[A + ".bias"]) and torch.equal(out["head.weight"], sd["head.weight"])


@pytest.mark.parametrize("scale", [torch.tensor(0.01), torch.full((OUT, 1), 0.01), torch.full((OUT,), 0.01)],
                         ids=["per-tensor", "per-channel", "per-channel-flat"])
def test_int8_tensorwise_runs_int8_w8a8_with_a_scale_per_channel(tmp_path, scale):
    scale = scale * (1 + torch.arange(OUT).reshape(-1, *([1] * (scale.dim() - 1))) / OUT) if scale.dim() else scale
    path = write(tmp_path, int8_layer(A, scale))
    out, plan, _ = load_checkpoint(path)
    assert plan.layers[A].scheme == "int8-w8a8"
    s = out[A + ".weight_scale"]
    assert s.shape == (OUT, 1) and s.dtype == torch.float32
    assert torch.equal(s, scale.reshape(-1, 1).expand(OUT, 1))
    # The weight means what ComfyUI's int8_tensorwise means: q * scale.
    w = R.dequantize_weight(out[A + ".weight"], s, get_scheme("int8-w8a8"), IN)
    assert torch.equal(w, out[A + ".weight"].float() * scale.reshape(-1, 1))


def test_e5m2_layers_are_read(tmp_path):
    sd = {A + ".weight": torch.randn(OUT, IN).to(torch.float8_e5m2), A + ".weight_scale": torch.tensor(0.5),
          A + ".comfy_quant": conf(format="float8_e5m2")}
    assert plan_of(write(tmp_path, sd)).layers[A].scheme == "fp8-e5m2-scaled"


def test_static_input_scales_are_dropped_and_reported(tmp_path):
    sd = {**fp8_layer(A), A + ".input_scale": torch.tensor(0.1), **fp8_layer(B, seed=1)}
    out, plan, _ = load_checkpoint(write(tmp_path, sd))
    assert A + ".input_scale" not in out
    assert plan.notes == ["1 layers carry a static input_scale, not used: activations are quantized per "
                          "token at run time"]


def test_header_metadata_wins_over_an_in_file_entry(tmp_path):
    # ComfyUI writes the header's entries over the in-file ones (comfy.utils.convert_old_quants).
    sd = fp8_layer(A)
    sd[A + ".comfy_quant"] = conf(format="nvfp4")
    path = write(tmp_path, sd, {"_quantization_metadata": json.dumps({"layers": {A: {"format": "float8_e4m3fn"}}})})
    assert plan_of(path).layers[A].scheme == "fp8-scaled"
    refused(write(tmp_path, sd, name="no_header.safetensors"), A, "nvfp4")


@pytest.mark.parametrize("fmt", ["nvfp4", "convrot_w4a4"])
def test_formats_without_a_kernel_here_are_refused_by_name(tmp_path, fmt):
    sd = fp8_layer(A)
    sd[A + ".comfy_quant"] = conf(format=fmt)
    refused(write(tmp_path, sd), A, fmt, "no kernel for", "Load Diffusion Model")


@pytest.mark.parametrize("where", ["top", "params"])
def test_int8_with_convrot_is_refused(tmp_path, where):
    entry = {"convrot": True} if where == "top" else {"params": {"convrot": True}}
    refused(write(tmp_path, int8_layer(A, torch.tensor(0.01), **entry)), A, "ConvRot", "Load Diffusion Model")


@pytest.mark.parametrize("case", ["not-json", "not-uint8", "not-a-map", "unknown-format", "no-format"])
def test_bad_entries_are_refused(tmp_path, case):
    sd = fp8_layer(A)
    sd[A + ".comfy_quant"] = {"not-json": torch.tensor(list(b"{format"), dtype=torch.uint8),
                              "not-uint8": torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.int32),
                              "not-a-map": conf(), "unknown-format": conf(format="float3"),
                              "no-format": conf(params={})}[case]
    if case == "not-a-map":
        sd[A + ".comfy_quant"] = torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)
    needle = {"not-json": "not JSON", "not-uint8": "not JSON", "not-a-map": "not JSON",
              "unknown-format": "'float3' is not supported", "no-format": "None is not supported"}[case]
    refused(write(tmp_path, sd), A, needle)


@pytest.mark.parametrize("case", ["int8-vector-scale", "fp8-vector-scale", "int8-weight-is-fp8", "no-scale"])
def test_mismatched_tensors_are_refused(tmp_path, case):
    if case == "int8-vector-scale":
        sd, needle = int8_layer(A, torch.full((OUT, 2), 0.01)), "[32, 2]"
    elif case == "fp8-vector-scale":
        sd, needle = fp8_layer(A), "one scalar per weight"
        sd[A + ".weight_scale"] = torch.full((OUT, 1), 0.02)
    elif case == "int8-weight-is-fp8":
        sd, needle = fp8_layer(A), "F8_E4M3"
        sd[A + ".comfy_quant"] = conf(format="int8_tensorwise")
    else:
        sd, needle = fp8_layer(A), "weight_scale"
        del sd[A + ".weight_scale"]
    refused(write(tmp_path, sd), A, needle)


def test_full_precision_layers_keep_a_float_matmul_under_w8a8(tmp_path):
    sd = {**fp8_layer(A, full_precision_matrix_mult=True), **fp8_layer(B, seed=1)}
    path = write(tmp_path, sd)
    plan = plan_of(path)
    assert plan.layers[A].float_matmul and not plan.layers[B].float_matmul
    moved = scaled_fp8_as_w8a8(plan)
    assert {n: q.scheme for n, q in moved.layers.items()} == {A: "fp8-scaled", B: "fp8-w8a8"}
    assert moved.notes == ["1 per-tensor fp8 layers run fp8 W8A8 (activations quantized per token)",
                           "1 per-tensor fp8 layers keep a bf16 matmul, as the file asks"]
    assert plan.layers[B].scheme == "fp8-scaled", "the input plan is not changed"


def test_scaled_fp8_as_w8a8_keeps_the_weight_exactly(tmp_path):
    path = write(tmp_path, fp8_layer(A, scale=0.0123))
    stored, _, _ = load_checkpoint(path)
    as_w8a8, plan, _ = load_checkpoint(path, scaled_fp8_w8a8=True)
    assert plan.layers[A].scheme == "fp8-w8a8" and as_w8a8[A + ".weight_scale"].shape == (OUT, 1)
    assert torch.equal(as_w8a8[A + ".weight"].view(torch.uint8), stored[A + ".weight"].view(torch.uint8))
    w_stored = R.dequantize_weight(stored[A + ".weight"], stored[A + ".weight_scale"], get_scheme("fp8-scaled"), IN)
    w_moved = R.dequantize_weight(as_w8a8[A + ".weight"], as_w8a8[A + ".weight_scale"], get_scheme("fp8-w8a8"), IN)
    assert torch.equal(w_stored, w_moved)


def test_legacy_two_element_marker_asks_for_a_float_matmul(tmp_path):
    base = {A + ".weight": torch.randn(OUT, IN).to(torch.float8_e4m3fn), A + ".scale_weight": torch.tensor(0.5)}
    one = plan_of(write(tmp_path, {**base, "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, name="a.st"))
    two = plan_of(write(tmp_path, {**base, "scaled_fp8": torch.empty(2, dtype=torch.float8_e4m3fn)}, name="b.st"))
    assert not one.layers[A].float_matmul and two.layers[A].float_matmul
    assert scaled_fp8_as_w8a8(one).layers[A].scheme == "fp8-w8a8"
    assert scaled_fp8_as_w8a8(two).layers[A].scheme == "fp8-scaled"


def test_lightx2v_files_are_unchanged_by_the_w8a8_option(tmp_path):
    sd = {A + ".weight": torch.randint(-127, 128, (OUT, IN), dtype=torch.int8), A + ".weight_scale": torch.rand(OUT, 1)}
    path = write(tmp_path, sd)
    plain, plan, _ = load_checkpoint(path)
    moved, plan2, _ = load_checkpoint(path, scaled_fp8_w8a8=True)
    assert plan == plan2 and plan.layouts() == {detect.LIGHTX2V}
    assert all(torch.equal(plain[k], moved[k]) for k in plain)
