"""ComfyUI's mxfp8 layers (fp8 e4m3 with one E8M0 exponent per 32 input features, in cuBLAS's
block-scaling tile order) read onto one power-of-two scale per channel for the fp8 W8A8 kernels.
The files are written by hand here; tests/comfy/test_comfy_native_files.py has ComfyUI write them."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from quant import reference as R
from quant.errors import CheckpointError
from quant.formats.block_scaled import (E8M0_BIAS, dequantize_mxfp8, mxfp8_to_per_channel, swizzle,
                                        swizzled_scale_shape, unswizzle)
from quant.formats.load import load_checkpoint
from quant.schemes import get_scheme

A = "blocks.0.self_attn.q"


def entry(**conf) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": "mxfp8", **conf}).encode("utf-8")), dtype=torch.uint8)


def mx_weight(out_f, in_f, seed=0, spread=3):
    """An e4m3 weight (magnitudes 1-448, so a shift of up to 7 binades stays in fp8's normal range) and
    [out, in/32] biased exponents within `spread` of each other per row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(out_f, in_f, generator=g)
    q = (x.sign() * (1 + x.abs() * 100)).clamp(-448, 448).to(torch.float8_e4m3fn)
    e = E8M0_BIAS - 10 + torch.randint(0, spread + 1, (out_f, in_f // 32), generator=g)
    return q, e.to(torch.uint8)


def mx_file(tmp_path, out_f=96, in_f=160, name="mx.safetensors", **conf):
    q, e = mx_weight(out_f, in_f)
    sd = {A + ".weight": q, A + ".weight_scale": swizzle(e).view(torch.float8_e8m0fnu),
          A + ".bias": torch.randn(out_f), A + ".comfy_quant": entry(**conf)}
    path = tmp_path / name
    save_file(sd, str(path))
    return str(path), q, e


def test_unswizzle_reads_the_tile_order():
    # 128 x 4 tiles of 512 bytes, row-major; (r, c) inside a tile at (r % 32) * 16 + (r // 32) * 4 + c.
    rows, blocks = 200, 6
    plain = torch.arange(rows * blocks, dtype=torch.int32).reshape(rows, blocks)
    stored = swizzle(plain)
    assert stored.shape == swizzled_scale_shape(rows, blocks) == (256, 8)
    flat = stored.reshape(-1)
    for r, c in [(0, 0), (1, 0), (32, 0), (0, 1), (37, 3), (130, 0), (199, 5), (5, 4)]:
        tile = (r // 128) * 2 + c // 4
        at = tile * 512 + (r % 128 % 32) * 16 + (r % 128 // 32) * 4 + c % 4
        assert flat[at] == plain[r, c], (r, c)
    assert torch.equal(unswizzle(stored, rows, blocks), plain)


def test_per_channel_form_is_exact_and_keeps_the_weight():
    q, e = mx_weight(64, 256, spread=4)
    shifted, scale, rounded = mxfp8_to_per_channel(q, e)
    assert shifted.dtype == torch.float8_e4m3fn and scale.shape == (64, 1) and rounded == 0
    assert torch.equal(shifted.float() * scale, dequantize_mxfp8(q, e))
    # each row's scale is its largest block's
    assert torch.equal(torch.log2(scale).reshape(-1), (e.int().amax(dim=1) - E8M0_BIAS).float())


def test_blocks_far_below_the_row_top_are_counted_when_rounded():
    q, e = mx_weight(8, 64, spread=0)
    e[0, 0] = e[0, 1] + 12  # block 1 of row 0 drops 12 binades, into fp8's subnormals
    shifted, scale, rounded = mxfp8_to_per_channel(q, e)
    err = (shifted.float() * scale - dequantize_mxfp8(q, e)).abs()
    assert rounded == int((err > 0).sum()) > 0
    assert err[1:].max() == 0 and err[0, :32].max() == 0 and err[0, 32:].max() > 0
    # rounded to fp8's subnormal step (2^-9 of the row scale) at most half a step away
    assert err[0].max() <= 2 ** -10 * scale[0, 0]


def test_mxfp8_layers_load_as_fp8_w8a8(tmp_path):
    path, q, e = mx_file(tmp_path)
    sd, plan, _ = load_checkpoint(path)
    layer = plan.layers[A]
    assert layer.scheme == "fp8-w8a8" and layer.block_scaled == "mxfp8" and layer.shape == (96, 160)
    assert set(sd) == {A + ".weight", A + ".weight_scale", A + ".bias"}
    assert sd[A + ".weight_scale"].shape == (96, 1)
    w = R.dequantize_weight(sd[A + ".weight"], sd[A + ".weight_scale"], get_scheme("fp8-w8a8"), 160)
    assert torch.equal(w, dequantize_mxfp8(q, e))
    assert plan.notes == ["1 mxfp8 layers read onto one power-of-two scale per channel (exactly)"]


def test_full_precision_mxfp8_runs_weight_only(tmp_path):
    path, q, e = mx_file(tmp_path, full_precision_matrix_mult=True)
    sd, plan, _ = load_checkpoint(path)
    assert plan.layers[A].scheme == "fp8-weight-only"
    w = R.dequantize_weight(sd[A + ".weight"], sd[A + ".weight_scale"], get_scheme("fp8-weight-only"), 160)
    assert torch.equal(w, dequantize_mxfp8(q, e))


def test_full_precision_int8_runs_weight_only(tmp_path):
    q = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    sd = {A + ".weight": q, A + ".weight_scale": torch.tensor(0.01),
          A + ".comfy_quant": torch.tensor(list(b'{"format": "int8_tensorwise", "full_precision_matrix_mult": true}'),
                                           dtype=torch.uint8)}
    save_file(sd, str(tmp_path / "i8.safetensors"))
    out, plan, _ = load_checkpoint(str(tmp_path / "i8.safetensors"))
    assert plan.layers[A].scheme == "int8-weight-only" and out[A + ".weight_scale"].shape == (32, 1)


@pytest.mark.parametrize("case", ["wrong-shape", "wrong-dtype", "odd-width"])
def test_bad_mxfp8_scales_are_refused(tmp_path, case):
    in_f = 80 if case == "odd-width" else 160
    q = torch.randn(96, in_f).to(torch.float8_e4m3fn)
    scale = {"wrong-shape": torch.zeros(96, 5, dtype=torch.uint8), "wrong-dtype": torch.zeros(128, 8),
             "odd-width": torch.zeros(128, 4, dtype=torch.uint8)}[case]
    save_file({A + ".weight": q, A + ".weight_scale": scale, A + ".comfy_quant": entry()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(tmp_path / "bad.safetensors"))
    msg = str(err.value)
    assert err.value.layer == A and "mxfp8" in msg and "Fix:" in msg, msg
    if case != "odd-width":
        assert "[128, 8]" in msg, msg


def test_a_nan_block_scale_is_refused(tmp_path):
    q, e = mx_weight(32, 64)
    e[3, 1] = 255
    with pytest.raises(ValueError, match="NaN"):
        mxfp8_to_per_channel(q, e)
    save_file({A + ".weight": q, A + ".weight_scale": swizzle(e), A + ".comfy_quant": entry()},
              str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(tmp_path / "nan.safetensors"))
    assert err.value.layer == A and "NaN" in str(err.value) and "nan.safetensors" in str(err.value)


@pytest.mark.parametrize("stored_as", [torch.uint8, torch.float8_e4m3fn])
def test_lightx2v_mxfp8_layers_load_as_fp8_w8a8(tmp_path, stored_as):
    # LightX2V's w8a8-mxfp8 export: the e4m3 bytes (its quantizer returns them as uint8) and E8M0
    # scales in the same tile order, no comfy_quant entry.
    q, e = mx_weight(96, 160)
    sd = {A + ".weight": q.view(stored_as), A + ".weight_scale": swizzle(e).view(torch.float8_e8m0fnu),
          A + ".bias": torch.randn(96), "head.weight": torch.randn(8, 8)}
    save_file(sd, str(tmp_path / "lx.safetensors"))
    out, plan, _ = load_checkpoint(str(tmp_path / "lx.safetensors"))
    assert plan.layers[A].scheme == "fp8-w8a8" and plan.layers[A].layout == "lightx2v"
    assert out[A + ".weight"].dtype == torch.float8_e4m3fn
    w = R.dequantize_weight(out[A + ".weight"], out[A + ".weight_scale"], get_scheme("fp8-w8a8"), 160)
    assert torch.equal(w, dequantize_mxfp8(q, e)) and "head.weight" not in plan.layers


def test_lightx2v_packed_4bit_layers_are_refused(tmp_path):
    sd = {A + ".weight": torch.zeros(96, 80, dtype=torch.uint8),
          A + ".weight_scale": torch.zeros(128, 12).to(torch.float8_e4m3fn),
          A + ".weight_global_scale": torch.tensor(1.0)}
    save_file(sd, str(tmp_path / "fp4.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(tmp_path / "fp4.safetensors"))
    assert err.value.layer == A and "nvfp4" in str(err.value) and "int8 or fp8" in str(err.value)
