"""Unit tests for quant/filters.py: which DiT linears get quantized, with a reason for each skip.

Names are the real module paths of Wan 2.1, Flux and Qwen-Image (ComfyUI's diffusion_model keys,
also seen with the 'model.diffusion_model.' prefix of full checkpoints)."""
from __future__ import annotations

import pytest

from quant.filters import DEFAULT_FILTER, ENCODER_FILTER, LayerFilter, is_modulation
from quant.schemes import get_scheme, weight_only_partner

SQUARE = (3072, 3072)

WAN_QUANTIZE = ["blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v", "blocks.0.self_attn.o",
                "blocks.11.cross_attn.q", "blocks.39.cross_attn.o", "blocks.3.cross_attn.k_img",
                "blocks.3.cross_attn.v_img", "blocks.0.ffn.0", "blocks.29.ffn.2", "vace_blocks.1.ffn.0"]
WAN_SKIP = {
    "blocks.0.modulation": "modulation",
    "head.head": "outside",
    "text_embedding.0": "outside",
    "text_embedding.2": "outside",
    "time_embedding.0": "outside",
    "time_projection.1": "outside",
    "patch_embedding": "outside",
    "img_emb.proj.1": "outside",
    "blocks.0.norm3": "norm",
    "blocks.0.self_attn.norm_q": "norm",
    "blocks.0.cross_attn.norm_k": "norm",
}
FLUX_QUANTIZE = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.qkv",
                 "double_blocks.18.txt_attn.proj", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
                 "double_blocks.0.txt_mlp.0", "single_blocks.3.linear1", "single_blocks.37.linear2"]
FLUX_SKIP = {
    "double_blocks.0.img_mod.lin": "modulation",
    "double_blocks.0.txt_mod.lin": "modulation",
    "single_blocks.0.modulation.lin": "modulation",
    "final_layer.linear": "outside",
    "final_layer.adaLN_modulation.1": "outside",
    "img_in": "outside",
    "txt_in": "outside",
    "time_in.in_layer": "outside",
    "time_in.out_layer": "outside",
    "vector_in.in_layer": "outside",
    "guidance_in.in_layer": "outside",
}
QWEN_QUANTIZE = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
                 "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.add_q_proj",
                 "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.img_mlp.net.0.proj",
                 "transformer_blocks.59.img_mlp.net.2", "transformer_blocks.0.txt_mlp.net.0.proj"]
QWEN_SKIP = {
    "transformer_blocks.0.img_mod.1": "modulation",
    "transformer_blocks.0.txt_mod.1": "modulation",
    "proj_out": "outside",
    "img_in": "outside",
    "txt_in": "outside",
    "norm_out.linear": "outside",
    "time_text_embed.timestep_embedder.linear_1": "outside",
    "time_text_embed.timestep_embedder.linear_2": "outside",
}

QUANTIZE = WAN_QUANTIZE + FLUX_QUANTIZE + QWEN_QUANTIZE
SKIP = {**WAN_SKIP, **FLUX_SKIP, **QWEN_SKIP}
REASON_WORDS = {"outside": "outside the transformer blocks", "modulation": "modulation", "norm": "norm"}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
@pytest.mark.parametrize("name", QUANTIZE)
def test_block_linears_are_quantized(name, prefix):
    assert DEFAULT_FILTER.skip_reason(prefix + name, SQUARE) is None


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("name", list(SKIP))
def test_sensitive_and_outside_layers_are_skipped_with_a_reason(name, prefix):
    reason = DEFAULT_FILTER.skip_reason(prefix + name, SQUARE)
    assert isinstance(reason, str) and reason
    assert REASON_WORDS[SKIP[name]] in reason, reason


def test_sensitive_names_are_skipped_even_when_blocks_only_is_off():
    f = LayerFilter(blocks_only=False)
    for name in ("text_embedding.0", "head.head", "final_layer.linear", "norm_out.linear", "proj_out",
                 "time_text_embed.timestep_embedder.linear_1", "blocks.0.modulation"):
        reason = f.skip_reason(name, SQUARE)
        assert reason is not None and "norm / modulation / embedding / head" in reason, name
    for name in QUANTIZE:
        assert f.skip_reason(name, SQUARE) is None, name


@pytest.mark.parametrize("shape", [(3072,), (1, 6, 3072), (3072, 16, 1, 2, 2), ()])
def test_non_linear_shapes_are_skipped(shape):
    assert DEFAULT_FILTER.skip_reason("blocks.0.self_attn.q", shape) == "not a Linear weight"


@pytest.mark.parametrize("shape,bad", [((3072, 3080), "3072x3080"), ((100, 3072), "100x3072"),
                                       ((8, 8), "8x8"), ((3072, 1), "3072x1")])
def test_dimensions_not_multiple_of_16_are_skipped(shape, bad):
    reason = DEFAULT_FILTER.skip_reason("blocks.0.ffn.0", shape)
    assert reason is not None and bad in reason and "16" in reason


def test_dimension_multiple_is_configurable():
    assert DEFAULT_FILTER.skip_reason("blocks.0.ffn.0", (16, 32)) is None
    assert DEFAULT_FILTER.skip_reason("blocks.0.ffn.0", (16, 40)) is not None
    assert LayerFilter(min_dim_multiple=8).skip_reason("blocks.0.ffn.0", (16, 40)) is None
    assert LayerFilter(min_dim_multiple=1).skip_reason("blocks.0.ffn.0", (13, 7)) is None
    assert "32" in LayerFilter(min_dim_multiple=32).skip_reason("blocks.0.ffn.0", (48, 64))


def test_extra_skip_patterns():
    f = LayerFilter(extra_skip=("cross_attn", "ffn.2", ""))
    for name in ("blocks.0.cross_attn.q", "blocks.7.cross_attn.o", "blocks.0.ffn.2"):
        reason = f.skip_reason(name, SQUARE)
        assert reason is not None and "user skip pattern" in reason, name
    assert "'cross_attn'" in f.skip_reason("blocks.0.cross_attn.q", SQUARE)
    assert "'ffn.2'" in f.skip_reason("blocks.0.ffn.2", SQUARE)
    # an empty pattern matches nothing; other layers are still quantized
    for name in ("blocks.0.self_attn.q", "blocks.0.ffn.0"):
        assert f.skip_reason(name, SQUARE) is None
    assert DEFAULT_FILTER.skip_reason("blocks.0.cross_attn.q", SQUARE) is None


def test_block_word_must_be_a_whole_path_segment():
    """'blocks' must be its own segment followed by an index, not a suffix of another word."""
    for name in ("myblocks.0.ffn.0", "blocks.x.ffn.0", "blocks_0.ffn.0", "transformer.blocks"):
        assert DEFAULT_FILTER.skip_reason(name, SQUARE) is not None, name
    for name in ("transformer.blocks.0.ffn.0", "model.layers.3.mlp.fc1"):
        assert DEFAULT_FILTER.skip_reason(name, SQUARE) is None, name


@pytest.mark.parametrize("name,small", [
    ("double_blocks.3.txt_attn.qkv", True), ("double_blocks.3.txt_mlp.0", True),
    ("double_blocks.3.img_attn.qkv", False), ("double_blocks.3.img_mlp.2", False),
    ("single_blocks.5.linear1", False), ("blocks.2.cross_attn.k", True), ("blocks.2.cross_attn.q", False),
    ("transformer_blocks.1.attn.add_k_proj", True), ("transformer_blocks.1.attn.to_q", False),
])
def test_text_stream_layers_count_as_small_m(name, small):
    assert DEFAULT_FILTER.is_small_m(name) is small


# Modulation (adaLN) linears inside blocks: Flux / HunyuanVideo (ComfyUI names) and Qwen-Image.
BLOCK_MODULATION = ["double_blocks.0.img_mod.lin", "double_blocks.18.txt_mod.lin", "single_blocks.3.modulation.lin",
                    "transformer_blocks.0.img_mod.1", "transformer_blocks.59.txt_mod.1"]
MOD_FILTER = LayerFilter(quantize_modulation=True)
MOD_FEW_ROWS = LayerFilter(quantize_modulation=True, few_rows_weight_only=True)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("name", BLOCK_MODULATION)
def test_quantize_modulation_quantizes_block_modulation(name, prefix):
    assert is_modulation(prefix + name)
    assert MOD_FILTER.skip_reason(prefix + name, (18432, 3072)) is None
    # The default (LightX2V layout, pre-quantized loader) still keeps them.
    assert "modulation" in DEFAULT_FILTER.skip_reason(prefix + name, (18432, 3072))
    assert "modulation" in ENCODER_FILTER.skip_reason(prefix + name, (18432, 3072))


@pytest.mark.parametrize("name", BLOCK_MODULATION)
@pytest.mark.parametrize("scheme,runs_as", [
    ("fp8-w8a8", "fp8-weight-only"), ("int8-w8a8", "int8-weight-only"), ("fp8-block128", "fp8-weight-only"),
    ("int4-g128", "int4-g128"), ("fp8-weight-only", "fp8-weight-only"), ("int8-weight-only", "int8-weight-only"),
    ("fp8-scaled", "fp8-scaled")])
def test_modulation_runs_weight_only_when_asked(name, scheme, runs_as):
    s = get_scheme(scheme)
    weight_only = MOD_FEW_ROWS.runs_weight_only(name, s)
    assert weight_only is s.quantizes_activation
    assert (weight_only_partner(s) if weight_only else s).name == runs_as
    assert not DEFAULT_FILTER.runs_weight_only(name, s)
    assert not MOD_FILTER.runs_weight_only(name, s)  # the default: the scheme itself


@pytest.mark.parametrize("name", ["final_layer.adaLN_modulation.1", "norm_out.linear", "blocks.0.modulation",
                                  "head.modulation", "final_layer.linear",
                                  "double_blocks.0.img_norm1", "transformer_blocks.0.norm1.linear"])
def test_modulation_outside_blocks_and_norms_stay_skipped(name):
    assert not is_modulation(name)
    for f in (MOD_FILTER, LayerFilter(quantize_modulation=True, blocks_only=False)):
        assert f.skip_reason(name, SQUARE) is not None, name


def test_quantize_modulation_keeps_the_other_checks():
    name = "double_blocks.0.img_mod.lin"
    f = LayerFilter(quantize_modulation=True, extra_skip=("img_mod",))
    assert "user skip pattern" in f.skip_reason(name, SQUARE)
    assert "not a multiple of 16" in MOD_FILTER.skip_reason(name, (18440, 3072))
    # Other layers are unaffected.
    for n in QUANTIZE:
        assert MOD_FILTER.skip_reason(n, SQUARE) is None, n
        assert MOD_FEW_ROWS.runs_weight_only(n, get_scheme("fp8-w8a8")) is DEFAULT_FILTER.is_small_m(n), n
        assert not MOD_FILTER.runs_weight_only(n, get_scheme("fp8-w8a8")), n
    assert not DEFAULT_FILTER.quantize_modulation and not ENCODER_FILTER.quantize_modulation


def test_few_rows_weight_only_is_off_by_default():
    from quant.schemes import get_scheme
    on = LayerFilter(quantize_modulation=True, few_rows_weight_only=True)
    off = LayerFilter(quantize_modulation=True)
    w8a8 = get_scheme("fp8-w8a8")
    for name in ("double_blocks.0.txt_mlp.0", "blocks.3.cross_attn.k", "double_blocks.0.img_mod.lin"):
        assert on.runs_weight_only(name, w8a8) and not off.runs_weight_only(name, w8a8), name
    assert off.skip_reason("double_blocks.0.img_mod.lin", (18432, 3072)) is None
