"""Shared activation quant (nodes/shared_quant.py) in real ComfyUI models: which attention modules'
q/k/v linears share one slot, that sampling does not change by a single bit with it, and that the
shared input is quantized once. On the CPU the reference backend quantizes; on the GPU machine the
same tests run with QUANTDIT_COMFY_DEVICE=cuda, where `auto` picks the Triton or vLLM kernels."""
from __future__ import annotations

import os

import pytest
import torch

import tiny_dits
import wan_fixtures
from tiny_dits import attached, load, quantize, sample, sharing

ON_CUDA = os.environ.get("QUANTDIT_COMFY_DEVICE", "cpu") == "cuda"
SHARE = "quant_share"  # the attribute shared_quant sets on each sibling


@pytest.fixture(scope="module")
def files(models_dir):
    return tiny_dits.write(models_dir, "s", seed=4)


WAN_GROUPS = [[f"blocks.{b}.{attn}.{p}" for p in ("k", "q", "v")] for b in (0, 1)
              for attn in ("cross_attn", "self_attn")]


@pytest.mark.parametrize("scheme", ["int8-w8a8", "fp8-w8a8"])
def test_wan_attention_siblings_share_a_slot(comfy, files, scheme):
    q, report = quantize(comfy, load(comfy, files, "wan"), scheme)
    assert sharing(q, SHARE) == WAN_GROUPS
    assert "4 attention modules quantize the input of their q/k/v linears once" in report, report


@pytest.mark.parametrize("scheme", ["fp8-block128", "int8-weight-only", "int4-g128"])
def test_schemes_that_do_not_quantize_per_token_share_nothing(comfy, files, scheme):
    q, report = quantize(comfy, load(comfy, files, "wan"), scheme)
    assert attached(q, SHARE) == {} and "q/k/v" not in report


def test_flux_has_fused_qkv_and_nothing_to_share(comfy, files):
    q, report = quantize(comfy, load(comfy, files, "flux"), "int8-w8a8")
    assert attached(q, SHARE) == {} and "q/k/v" not in report


def test_a_sibling_left_unquantized_is_not_given_the_slot(comfy, files):
    q, _ = quantize(comfy, load(comfy, files, "wan"), "int8-w8a8", skip_patterns="self_attn.v")
    assert sharing(q, SHARE)[0] == ["blocks.0.cross_attn.k", "blocks.0.cross_attn.q", "blocks.0.cross_attn.v"]
    assert ["blocks.0.self_attn.k", "blocks.0.self_attn.q"] in sharing(q, SHARE)


@pytest.mark.parametrize("scheme", ["int8-w8a8", "fp8-w8a8"])
def test_sampling_is_bit_equal_and_the_shared_input_is_quantized_once(comfy, files, scheme):
    q, _ = quantize(comfy, load(comfy, files, "wan"), scheme)
    if ON_CUDA:  # a fresh process's first CUDA sample differs slightly (see test_gelu_handoff.py)
        sample(comfy, files, "wan", q)
    shared = list({id(s): s for s in attached(q, SHARE).values()}.values())
    for s in shared:
        s.hits = 0
    model_calls = []
    hook = q.model.diffusion_model.register_forward_hook(lambda *a: model_calls.append(1))
    try:
        with_sharing = sample(comfy, files, "wan", q)
    finally:
        hook.remove()
    # Per model call and block: self-attention's k and v reuse q's rows. Cross-attention's v quantizes
    # nothing: k computed its output in their one GEMM (nodes/fused_siblings.py); its q reads the
    # video tokens, not the context.
    assert model_calls and sum(s.hits for s in shared) == 2 * 2 * len(model_calls)
    assert all(not s.holds for s in shared)  # no 8-bit copy outlives the activation it came from
    saved = [(obj, obj.quant_share) for obj in q.object_patches.values()
             if getattr(obj, "quant_share", None) is not None]
    try:
        for obj, _ in saved:
            obj.quant_share = None
        without = sample(comfy, files, "wan", q)
    finally:
        for obj, slot in saved:
            obj.quant_share = slot
    assert torch.equal(with_sharing, without)


def test_the_loader_shares_too(comfy, models_dir):
    nodes, _ = comfy
    names = wan_fixtures.write_all(models_dir)
    model, report = nodes.NODE_CLASS_MAPPINGS["QuantDiTLoader"].execute(
        unet_name=names["lightx2v-int8"], backend="auto", compute_dtype="default").result
    assert len(sharing(model, SHARE)) == 2 * len(model.model.diffusion_model.blocks)
    assert "attention modules quantize the input of their q/k/v linears once" in report
    model, report = nodes.NODE_CLASS_MAPPINGS["QuantDiTLoader"].execute(
        unet_name=names["lightx2v-fp8-block128"], backend="auto", compute_dtype="default").result
    assert sharing(model, SHARE) == [] and "q/k/v" not in report
