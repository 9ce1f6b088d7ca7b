"""Sibling linears as one GEMM (nodes/fused_siblings.py) in real ComfyUI models: which groups are
made (Wan's cross-attention k/v, Qwen-Image's q/k/v trios), that sampling gives the same latents
with and without them, that the weights end as slices of one buffer holding the same values, and
the rules (same input object, any order, LoRA-patched scales, saving, the row limit). On the CPU the reference backend computes; on the GPU machine the same
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
from tiny_dits import attached, load, quantize, sample, sharing

ON_CUDA = os.environ.get("QUANTDIT_COMFY_DEVICE", "cpu") == "cuda"
DEV = torch.device("cuda" if ON_CUDA else "cpu")
FUSED = "quant_fused"  # the attribute fused_siblings sets on each member


@pytest.fixture(scope="module")
def files(models_dir):
    return tiny_dits.write(models_dir, "p", seed=5)


@pytest.mark.parametrize("scheme", ["int8-w8a8", "fp8-w8a8"])
def test_wan_cross_attention_k_and_v_are_one_group(comfy, files, scheme):
    q, report = quantize(comfy, load(comfy, files, "wan"), scheme)
    assert sharing(q, FUSED) == [[f"blocks.{b}.cross_attn.k", f"blocks.{b}.cross_attn.v"] for b in (0, 1)]
    assert "2 groups of sibling linears (k/v, q/k/v) on one input run as one GEMM" in report, report


@pytest.mark.parametrize("scheme", ["fp8-block128", "int8-weight-only", "int4-g128"])
def test_schemes_without_per_channel_w8a8_are_not_grouped(comfy, files, scheme):
    q, report = quantize(comfy, load(comfy, files, "wan"), scheme)
    assert attached(q, FUSED) == {} and "sibling linears" not in report


def test_flux_has_no_groups_and_a_sibling_left_in_bf16_breaks_its_group(comfy, files):
    q, _ = quantize(comfy, load(comfy, files, "flux"), "int8-w8a8")
    assert attached(q, FUSED) == {}
    q, _ = quantize(comfy, load(comfy, files, "wan"), "int8-w8a8", skip_patterns="blocks.0.cross_attn.v")
    assert sharing(q, FUSED) == [["blocks.1.cross_attn.k", "blocks.1.cross_attn.v"]]


def _group_modules(q):
    return [[q.get_model_object(f"diffusion_model.{n}") for n in names] for names in sharing(q, FUSED)]


@pytest.mark.parametrize("scheme", ["int8-w8a8", "fp8-w8a8"])
def test_sampling_matches_the_unfused_layers_and_the_weights_become_one_buffer(comfy, files, scheme):
    q, _ = quantize(comfy, load(comfy, files, "wan"), scheme)
    before = {id(m): m.weight.detach().clone() for group in _group_modules(q) for m in group}
    if ON_CUDA:  # a fresh process's first CUDA sample differs slightly (see test_gelu_handoff.py)
        sample(comfy, files, "wan", q)
    model_calls = []
    hook = q.model.diffusion_model.register_forward_hook(lambda *a: model_calls.append(1))
    found = list({id(g): g for g in attached(q, FUSED).values()}.values())
    for p in found:
        p.fused_calls = 0
    try:
        fused = sample(comfy, files, "wan", q)
    finally:
        hook.remove()
    assert model_calls and sum(p.fused_calls for p in found) == 2 * len(model_calls)  # one per block and call
    assert all(not p.holds for p in found)  # no kept output outlives its input
    for first, second in _group_modules(q):
        assert stacked(first.weight, second.weight) is not None
        assert torch.equal(first.weight.cpu(), before[id(first)].cpu())
        assert torch.equal(second.weight.cpu(), before[id(second)].cpu())
    saved = [(m, m.quant_fused) for group in _group_modules(q) for m in group]
    try:
        for m, _ in saved:
            m.quant_fused = None
        unfused = sample(comfy, files, "wan", q)
    finally:
        for m, p in saved:
            m.quant_fused = p
    if scheme == "int8-w8a8" or not ON_CUDA:  # int32 sums are exact; the CPU reference computes per column
        assert torch.equal(fused, unfused)
    else:  # the wider GEMM may take other fp8 tiles, whose fast accumulation rounds differently
        assert torch.allclose(fused, unfused, rtol=0, atol=2e-2 * unfused.abs().max().item())


def test_the_loader_groups_too(comfy, models_dir):
    nodes, _ = comfy
    names = wan_fixtures.write_all(models_dir)
    model, report = nodes.NODE_CLASS_MAPPINGS["QuantDiTLoader"].execute(
        unet_name=names["lightx2v-int8"], backend="auto", compute_dtype="default").result
    assert len(sharing(model, FUSED)) == len(model.model.diffusion_model.blocks)
    assert "groups of sibling linears (k/v, q/k/v) on one input run as one GEMM" in report


# The rules, on quantized linears of this pack under a real ModelPatcher.

@pytest.fixture()
def pack_ops(comfy):
    _, pack = comfy
    return pack.nodes.ops, pack.nodes.fused_siblings


def _grouped(pack_ops, module, path, names, scheme="int8-w8a8"):
    """Quantizes `names` of `module` (placed at diffusion_model.<path>) as object patches of a
    ModelPatcher and lets fuse_sibling_linears group them: (groups made, {name: quantized}, report)."""
    import comfy.model_patcher
    from quant.report import QuantReport
    ops, fused_siblings = pack_ops
    root = torch.nn.Module()
    root.diffusion_model = torch.nn.Module()
    parent, leaf = root.diffusion_model, path.split(".")
    for part in leaf[:-1]:
        child = torch.nn.Module()
        setattr(parent, part, child)
        parent = child
    setattr(parent, leaf[-1], module)
    patcher = comfy.model_patcher.ModelPatcher(root, DEV, DEV)
    quantized = {}
    for name in names:
        q = ops.QuantizedLinear.from_linear(getattr(module, name), get_scheme(scheme), None, DEV)
        patcher.add_object_patch(f"diffusion_model.{path}.{name}", q)
        quantized[name] = q
    report = QuantReport(source="test", layout="test")
    return fused_siblings.fuse_sibling_linears(patcher, report), quantized, report


def _cross_attention(pack_ops, i2v=False, scheme="int8-w8a8"):
    torch.manual_seed(0)
    attn = torch.nn.Module()
    names = ("q", "k", "v", "k_img", "v_img") if i2v else ("q", "k", "v")
    for name in names:
        setattr(attn, name, torch.nn.Linear(32, 64).to(DEV))
    return _grouped(pack_ops, attn, "blocks.0.cross_attn", names, scheme)


def test_image_to_video_groups_k_img_with_v_img_and_leaves_q_alone(pack_ops):
    made, q, report = _cross_attention(pack_ops, i2v=True)
    assert made == 2
    assert q["k"].quant_fused is q["v"].quant_fused and q["k_img"].quant_fused is q["v_img"].quant_fused
    assert q["k"].quant_fused is not q["k_img"].quant_fused and q["q"].quant_fused is None
    assert report.notes[-1].startswith("2 groups of sibling linears")


def _unfused(layer, x):
    group, layer.quant_fused = layer.quant_fused, None
    try:
        return layer(x)
    finally:
        layer.quant_fused = group


def test_either_member_may_come_first_and_the_other_takes_its_output(pack_ops):
    _, q, _ = _cross_attention(pack_ops)
    x = torch.randn(2, 5, 32, device=DEV)
    group = q["k"].quant_fused
    for first, second in (("k", "v"), ("v", "k")):
        y_first = q[first](x)
        assert group.holds and group.fused_calls >= 1
        y_second = q[second](x)
        assert not group.holds
        assert torch.equal(y_first, _unfused(q[first], x)) and torch.equal(y_second, _unfused(q[second], x))
        assert y_second.shape == (2, 5, 64)


def test_another_input_or_an_in_place_write_is_not_answered_from_the_kept_output(pack_ops):
    _, q, _ = _cross_attention(pack_ops)
    group = q["k"].quant_fused
    x, other = torch.randn(3, 32, device=DEV), torch.randn(3, 32, device=DEV)
    q["k"](x)
    assert torch.equal(q["v"](other), _unfused(q["v"], other))  # computed from `other`, not kept
    q["k"](x)
    x.mul_(2)  # a write between the two calls: the kept output no longer belongs to x
    calls = group.fused_calls
    assert torch.equal(q["v"](x), _unfused(q["v"], x))
    assert group.fused_calls == calls + 1  # v ran the group's GEMM again (keeping k's output for x)


def test_a_kept_output_is_dropped_with_its_input(pack_ops):
    _, q, _ = _cross_attention(pack_ops)
    x = torch.randn(3, 32, device=DEV)
    q["k"](x)
    assert q["k"].quant_fused.holds
    del x
    assert not q["k"].quant_fused.holds


def test_inputs_over_the_row_limit_run_each_layer_on_its_own(pack_ops, monkeypatch):
    _, q, _ = _cross_attention(pack_ops)
    _, fused_siblings = pack_ops
    monkeypatch.setattr(fused_siblings, "MAX_ROWS", 4)
    group = q["k"].quant_fused
    y = q["k"](torch.randn(5, 32, device=DEV))
    assert group.fused_calls == 0 and not group.holds and y.shape == (5, 64)
    q["k"](torch.randn(4, 32, device=DEV))
    assert group.fused_calls == 1


def test_a_lora_patched_weight_keeps_its_scale_when_moved_into_the_group_buffer(pack_ops):
    _, q, _ = _cross_attention(pack_ops)
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


def test_grouped_weights_save_with_safetensors(pack_ops, tmp_path):
    _, q, _ = _cross_attention(pack_ops)
    q["k"](torch.randn(2, 32, device=DEV))
    assert stacked(q["k"].weight, q["v"].weight) is not None
    sd = {f"{n}.{key}": t for n in ("k", "v") for key, t in q[n].state_dict().items()}
    path = tmp_path / "group.safetensors"
    # ComfyUI's ModelSave writes the state dict with safetensors, which refuses overlapping tensors;
    # the slices of one buffer do not overlap, and each is written on its own.
    safetensors.torch.save_file(sd, str(path))
    back = safetensors.torch.load_file(str(path), device=str(DEV))
    assert torch.equal(back["k.weight"], q["k"].weight) and torch.equal(back["v.weight"], q["v"].weight)


# Qwen-Image: ComfyUI's own joint attention module, small, with its six projections quantized.

QWEN_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def _qwen_attention(pack_ops, scheme):
    import comfy.ops
    from comfy.ldm.qwen_image.model import Attention
    torch.manual_seed(0)
    attn = Attention(query_dim=64, dim_head=16, heads=4, out_dim=64, bias=True, device=DEV,
                     operations=comfy.ops.manual_cast)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    made, q, report = _grouped(pack_ops, attn, "transformer_blocks.0.attn", QWEN_PROJECTIONS, scheme)
    for name, layer in q.items():  # what ComfyUI does with the object patches when it loads the model
        setattr(attn, name, layer)
    return attn, made, q


def _identity_rope(tokens, head_dim):
    rot = torch.zeros(1, 1, tokens, head_dim // 2, 2, 2, device=DEV)
    rot[..., 0, 0] = rot[..., 1, 1] = 1
    return rot


@pytest.mark.parametrize("scheme", ["int8-w8a8", "fp8-w8a8"])
def test_qwen_image_attention_runs_each_trio_as_one_gemm(pack_ops, scheme):
    attn, made, q = _qwen_attention(pack_ops, scheme)
    assert made == 2
    img, txt = q["to_q"].quant_fused, q["add_q_proj"].quant_fused
    assert img is not txt and all(q[n].quant_fused is img for n in QWEN_PROJECTIONS[:3])
    assert all(q[n].quant_fused is txt for n in QWEN_PROJECTIONS[3:])
    hidden, text = torch.randn(2, 24, 64, device=DEV), torch.randn(2, 7, 64, device=DEV)
    rope = _identity_rope(7 + 24, 16)
    fused = attn(hidden, text, image_rotary_emb=rope)
    assert img.fused_calls == 1 and txt.fused_calls == 1 and not img.holds and not txt.holds
    groups_before = {n: q[n].quant_fused for n in QWEN_PROJECTIONS}
    try:
        for n in QWEN_PROJECTIONS:
            q[n].quant_fused = None
        plain = attn(hidden, text, image_rotary_emb=rope)
    finally:
        for n, g in groups_before.items():
            q[n].quant_fused = g
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)
    assert stacked(*[q[n].weight for n in QWEN_PROJECTIONS[:3]]) is not None
