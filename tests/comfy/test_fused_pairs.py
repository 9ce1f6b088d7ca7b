"""Wan's cross-attention k/v as one GEMM (nodes/fused_pairs.py) in real ComfyUI models: which
pairs are made, that sampling gives the same latents with and without them, that the weights end as
halves of one buffer holding the same values, and the pair's rules (same input object, either order,
LoRA-patched scales, saving). On the CPU the reference backend computes; on the GPU machine the same
tests run with QUANTDIT_COMFY_DEVICE=cuda, where `auto` picks the Triton or vLLM kernels."""
from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

import tiny_dits
import wan_fixtures
from quant.schemes import get_scheme
from quant.stacked_weights import stacked
from tiny_dits import load, quantize, sample

ON_CUDA = os.environ.get("QUANTDIT_COMFY_DEVICE", "cpu") == "cuda"
DEV = torch.device("cuda" if ON_CUDA else "cpu")


@pytest.fixture(scope="module")
def files(models_dir):
    return tiny_dits.write(models_dir, "p", seed=5)


def pairs(model):
    """{module path: pair} of every quantized linear (object patch or loaded module) that has one."""
    found = {}
    for key, obj in model.object_patches.items():
        if getattr(obj, "quant_pair", None) is not None:
            found[key[len("diffusion_model."):]] = obj.quant_pair
    for name, module in model.model.diffusion_model.named_modules():
        if getattr(module, "quant_pair", None) is not None:
            found.setdefault(name, module.quant_pair)
    return found


def members(model):
    return sorted(sorted(names) for names in _by_pair(model).values())


def _by_pair(model):
    out = {}
    for name, pair in pairs(model).items():
        out.setdefault(id(pair), []).append(name)
    return out


@pytest.mark.parametrize("scheme", ["int8-w8a8", "fp8-w8a8"])
def test_wan_cross_attention_k_and_v_are_paired(comfy, files, scheme):
    q, report = quantize(comfy, load(comfy, files, "wan"), scheme)
    assert members(q) == [[f"blocks.{b}.cross_attn.k", f"blocks.{b}.cross_attn.v"] for b in (0, 1)]
    assert "2 cross-attention k/v pairs run as one GEMM" in report, report


@pytest.mark.parametrize("scheme", ["fp8-block128", "int8-weight-only", "int4-g128"])
def test_schemes_without_per_channel_w8a8_are_not_paired(comfy, files, scheme):
    q, report = quantize(comfy, load(comfy, files, "wan"), scheme)
    assert pairs(q) == {} and "k/v pairs" not in report


def test_flux_has_no_pairs_and_a_sibling_left_in_bf16_breaks_its_pair(comfy, files):
    q, _ = quantize(comfy, load(comfy, files, "flux"), "int8-w8a8")
    assert pairs(q) == {}
    q, _ = quantize(comfy, load(comfy, files, "wan"), "int8-w8a8", skip_patterns="blocks.0.cross_attn.v")
    assert members(q) == [["blocks.1.cross_attn.k", "blocks.1.cross_attn.v"]]


def _pair_modules(q):
    return [[q.get_model_object(f"diffusion_model.{n}") for n in names] for names in _by_pair(q).values()]


@pytest.mark.parametrize("scheme", ["int8-w8a8", "fp8-w8a8"])
def test_sampling_matches_the_unfused_layers_and_the_weights_become_one_buffer(comfy, files, scheme):
    q, _ = quantize(comfy, load(comfy, files, "wan"), scheme)
    before = {id(m): m.weight.detach().clone() for pair in _pair_modules(q) for m in pair}
    if ON_CUDA:  # a fresh process's first CUDA sample differs slightly (see test_gelu_handoff.py)
        sample(comfy, files, "wan", q)
    model_calls = []
    hook = q.model.diffusion_model.register_forward_hook(lambda *a: model_calls.append(1))
    found = list({id(p): p for p in pairs(q).values()}.values())
    for p in found:
        p.fused_calls = 0
    try:
        fused = sample(comfy, files, "wan", q)
    finally:
        hook.remove()
    assert model_calls and sum(p.fused_calls for p in found) == 2 * len(model_calls)  # one per block and call
    assert all(not p.holds for p in found)  # no kept output outlives its input
    for first, second in _pair_modules(q):
        assert stacked(first.weight, second.weight) is not None
        assert torch.equal(first.weight.cpu(), before[id(first)].cpu())
        assert torch.equal(second.weight.cpu(), before[id(second)].cpu())
    saved = [(m, m.quant_pair) for pair in _pair_modules(q) for m in pair]
    try:
        for m, _ in saved:
            m.quant_pair = None
        unfused = sample(comfy, files, "wan", q)
    finally:
        for m, p in saved:
            m.quant_pair = p
    if scheme == "int8-w8a8" or not ON_CUDA:  # int32 sums are exact; the CPU reference computes per column
        assert torch.equal(fused, unfused)
    else:  # the wider GEMM may take other fp8 tiles, whose fast accumulation rounds differently
        assert torch.allclose(fused, unfused, rtol=0, atol=2e-2 * unfused.abs().max().item())


def test_the_loader_pairs_too(comfy, models_dir):
    nodes, _ = comfy
    names = wan_fixtures.write_all(models_dir)
    model, report = nodes.NODE_CLASS_MAPPINGS["QuantDiTLoader"].execute(
        unet_name=names["lightx2v-int8"], backend="auto", compute_dtype="default").result
    assert len(members(model)) == len(model.model.diffusion_model.blocks)
    assert "cross-attention k/v pairs run as one GEMM" in report


# The pair's rules, on two quantized linears of this pack under a real ModelPatcher.

@pytest.fixture()
def pack_ops(comfy):
    _, pack = comfy
    return pack.nodes.ops, pack.nodes.fused_pairs


def _patched_attention(pack_ops, scheme="int8-w8a8", i2v=False, n=64, k=32):
    import comfy.model_patcher
    ops, fused_pairs = pack_ops
    torch.manual_seed(0)
    attn = torch.nn.Module()
    names = ("k", "v", "k_img", "v_img") if i2v else ("k", "v")
    for name in names:
        setattr(attn, name, torch.nn.Linear(k, n).to(DEV))
    root = torch.nn.Module()
    root.diffusion_model = torch.nn.Module()
    root.diffusion_model.blocks = torch.nn.ModuleList([torch.nn.Module()])
    root.diffusion_model.blocks[0].cross_attn = attn
    patcher = comfy.model_patcher.ModelPatcher(root, DEV, DEV)
    quantized = {}
    for name in names:
        q = ops.QuantizedLinear.from_linear(getattr(attn, name), get_scheme(scheme), None, DEV)
        patcher.add_object_patch(f"diffusion_model.blocks.0.cross_attn.{name}", q)
        quantized[name] = q
    from quant.report import QuantReport
    report = QuantReport(source="test", layout="test")
    made = fused_pairs.fuse_context_pairs(patcher, report)
    return made, quantized, report


def test_image_to_video_pairs_k_img_with_v_img(pack_ops):
    made, q, report = _patched_attention(pack_ops, i2v=True)
    assert made == 2
    assert q["k"].quant_pair is q["v"].quant_pair and q["k_img"].quant_pair is q["v_img"].quant_pair
    assert q["k"].quant_pair is not q["k_img"].quant_pair
    assert "2 cross-attention k/v pairs" in report.notes[-1]


def _unfused(layer, x):
    pair, layer.quant_pair = layer.quant_pair, None
    try:
        return layer(x)
    finally:
        layer.quant_pair = pair


def test_either_member_may_come_first_and_the_other_takes_its_output(pack_ops):
    _, q, _ = _patched_attention(pack_ops)
    x = torch.randn(2, 5, 32, device=DEV)
    pair = q["k"].quant_pair
    for first, second in (("k", "v"), ("v", "k")):
        y_first = q[first](x)
        assert pair.holds and pair.fused_calls >= 1
        y_second = q[second](x)
        assert not pair.holds
        assert torch.equal(y_first, _unfused(q[first], x)) and torch.equal(y_second, _unfused(q[second], x))
        assert y_second.shape == (2, 5, 64)


def test_another_input_or_an_in_place_write_is_not_answered_from_the_kept_output(pack_ops):
    _, q, _ = _patched_attention(pack_ops)
    pair = q["k"].quant_pair
    x, other = torch.randn(3, 32, device=DEV), torch.randn(3, 32, device=DEV)
    q["k"](x)
    assert torch.equal(q["v"](other), _unfused(q["v"], other))  # computed from `other`, not kept
    q["k"](x)
    x.mul_(2)  # a write between the two calls: the kept output no longer belongs to x
    calls = pair.fused_calls
    assert torch.equal(q["v"](x), _unfused(q["v"], x))
    assert pair.fused_calls == calls + 1  # v ran the pair's GEMM again (keeping k's output for x)


def test_a_kept_output_is_dropped_with_its_input(pack_ops):
    _, q, _ = _patched_attention(pack_ops)
    x = torch.randn(3, 32, device=DEV)
    q["k"](x)
    assert q["k"].quant_pair.holds
    del x
    assert not q["k"].quant_pair.holds


def test_a_lora_patched_weight_keeps_its_scale_when_moved_into_the_pair_buffer(pack_ops):
    _, q, _ = _patched_attention(pack_ops)
    k = q["k"]
    w = k.convert_weight(k.weight.to(torch.float32))
    k.set_weight(w * 3)  # what ComfyUI's patch_weight_to_device does for a LoRA
    patched_scale = k.current_scale()
    x = torch.randn(4, 32, device=DEV)
    expected_k, expected_v = _unfused(k, x), _unfused(q["v"], x)
    assert torch.equal(k(x), expected_k) and torch.equal(q["v"](x), expected_v)
    assert stacked(k.weight, q["v"].weight) is not None  # the patched weight moved into the buffer ...
    assert k.current_scale() is patched_scale  # ... and still pairs with its own scale
    assert torch.allclose(k.convert_weight(k.weight.to(torch.float32)), 3 * w, rtol=0.02, atol=1e-3)


def test_paired_weights_save_with_safetensors(pack_ops, tmp_path):
    _, q, _ = _patched_attention(pack_ops)
    q["k"](torch.randn(2, 32, device=DEV))
    assert stacked(q["k"].weight, q["v"].weight) is not None
    sd = {f"k.{n}": t for n, t in q["k"].state_dict().items()}
    sd.update({f"v.{n}": t for n, t in q["v"].state_dict().items()})
    path = tmp_path / "pair.safetensors"
    safetensors.torch.save_file(sd, str(path))  # refuses tensors that share memory
    back = safetensors.torch.load_file(str(path), device=str(DEV))
    assert torch.equal(back["k.weight"], q["k"].weight) and torch.equal(back["v.weight"], q["v"].weight)
