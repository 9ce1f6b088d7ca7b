"""umT5 encoder checkpoints: the original Wan layout and ComfyUI's (Hugging Face) layout.

Wan's `models_t5_umt5-xxl-enc-*.pth` (and LightX2V's quantized copies) name the encoder
    token_embedding, blocks.N.{norm1, attn.{q,k,v,o}, norm2, ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}, norm
while ComfyUI's T5 module uses the Hugging Face names
    shared, encoder.block.N.layer.0.{layer_norm, SelfAttention.{q,k,v,o,relative_attention_bias}},
    encoder.block.N.layer.1.{layer_norm, DenseReluDense.{wi_0, wi_1, wo}}, encoder.final_layer_norm.
Wan's FFN is fc2(fc1(x) * gelu_tanh(gate(x))), HF's is wo(gelu_tanh(wi_0(x)) * wi_1(x)): gate is wi_0.
umT5 has one relative-position table per block, so the mapping is a pure rename.
"""
from __future__ import annotations

import re

WAN = "wan-original"
COMFY = "comfyui"

_WAN_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k",
    "attn.v": "layer.0.SelfAttention.v", "attn.o": "layer.0.SelfAttention.o",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0": "layer.1.DenseReluDense.wi_0", "ffn.fc1": "layer.1.DenseReluDense.wi_1",
    "ffn.fc2": "layer.1.DenseReluDense.wo",
}
_WAN_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_WAN_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Suffixes a quantized linear carries next to ".weight" (LightX2V, ComfyUI scaled fp8).
_LINEAR_SUFFIXES = (".weight_scale", ".scale_weight", ".scale_input", ".weight", ".bias")


def layout(keys) -> str | None:
    """WAN or COMFY for a umT5 encoder; None for anything else, plain T5 included (T5 shares one
    relative-position table from block 0, umT5 gives every block its own)."""
    keys = set(keys)
    if "blocks.0.attn.q.weight" in keys and "blocks.0.ffn.fc1.weight" in keys:
        return WAN
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in keys:
        per_block_bias = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in keys
        single_block = "encoder.block.1.layer.0.SelfAttention.q.weight" not in keys
        return COMFY if per_block_bias or single_block else None
    return None


def comfy_key(key: str) -> str | None:
    """The ComfyUI name of a Wan-layout key, or None for keys that have no place in the encoder."""
    if key in _WAN_TOP:
        return _WAN_TOP[key]
    m = _WAN_KEY.match(key)
    if m is None:
        return None
    block, rest = m.groups()
    if rest in _WAN_BLOCK:
        return f"encoder.block.{block}.{_WAN_BLOCK[rest]}"
    for suffix in _LINEAR_SUFFIXES:
        if rest.endswith(suffix) and rest[: -len(suffix)] in _WAN_BLOCK:
            return f"encoder.block.{block}.{_WAN_BLOCK[rest[: -len(suffix)]]}{suffix}"
    return None


def config_from_shapes(shape_of) -> dict:
    """ComfyUI T5 config overrides read off the tensors, so any umT5 size loads (XXL gives the
    stock values). `shape_of(key)` takes ComfyUI-layout keys."""
    n_layers = 0
    while True:
        try:
            shape_of(f"encoder.block.{n_layers}.layer.0.SelfAttention.q.weight")
        except KeyError:
            break
        n_layers += 1
    vocab, d_model = shape_of("shared.weight")
    inner = shape_of("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    buckets, heads = shape_of("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    d_ff = shape_of("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
    return {"num_layers": n_layers, "d_model": d_model, "d_kv": inner // heads, "num_heads": heads,
            "d_ff": d_ff, "vocab_size": vocab, "relative_attention_num_buckets": buckets}
