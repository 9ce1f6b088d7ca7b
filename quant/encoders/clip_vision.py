"""Wan's CLIP image encoder (open-clip XLM-RoBERTa-large / ViT-H-14) mapped onto ComfyUI's
CLIP-ViT-H (Hugging Face names).

Wan's `models_clip_open-clip-xlm-roberta-large-vit-huge-14*.pth` holds the whole CLIP: the
`visual.` tower is what Wan I2V uses (the `textual.` tower and `log_scale` are not needed for
CLIP_VISION). Per block Wan fuses q, k and v into one `attn.to_qkv` Linear; ComfyUI has three.
A per-output-channel quantized weight splits exactly along its rows, scales included.
"""
from __future__ import annotations

import re

import torch

WAN = "wan-original"
COMFY = "comfyui"
VIT_H_HEAD_DIM = 80  # ViT-H/14: 1280 wide, 16 heads

_TOP = {
    "visual.patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.pre_norm.weight": "vision_model.pre_layrnorm.weight",
    "visual.pre_norm.bias": "vision_model.pre_layrnorm.bias",
    "visual.post_norm.weight": "vision_model.post_layernorm.weight",
    "visual.post_norm.bias": "vision_model.post_layernorm.bias",
}
_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
          "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
_BLOCK_KEY = re.compile(r"^visual\.transformer\.(\d+)\.(.+)\.(weight|bias|weight_scale|scale_weight|scale_input)$")
QKV = ("q_proj", "k_proj", "v_proj")


def layout(keys) -> str | None:
    keys = set(keys)
    if "visual.transformer.0.attn.to_qkv.weight" in keys:
        return WAN
    if "vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys:
        return COMFY
    return None


def comfy_key(key: str) -> str | None:
    """ComfyUI name of a Wan visual key; None for keys outside the vision tower, and for to_qkv
    (which `split_qkv` turns into three)."""
    if key in _TOP:
        return _TOP[key]
    m = _BLOCK_KEY.match(key)
    if m is None:
        return None
    block, name, suffix = m.groups()
    if name in _BLOCK:
        return f"vision_model.encoder.layers.{block}.{_BLOCK[name]}.{suffix}"
    return None


def is_qkv(key: str) -> bool:
    m = _BLOCK_KEY.match(key)
    return m is not None and m.group(2) == "attn.to_qkv"


def qkv_targets(key: str) -> list[str]:
    """'visual.transformer.3.attn.to_qkv.weight' -> the three ComfyUI keys its rows go to."""
    block, _, suffix = _BLOCK_KEY.match(key).groups()
    return [f"vision_model.encoder.layers.{block}.self_attn.{p}.{suffix}" for p in QKV]


def split_qkv(t: torch.Tensor) -> list[torch.Tensor]:
    """Rows of a fused qkv weight / bias / per-channel scale, in q, k, v order. A scalar scale
    (one per tensor) is shared by all three."""
    if t.dim() == 0 or t.numel() == 1:
        return [t, t, t]
    if t.shape[0] % 3:
        raise ValueError(f"fused qkv tensor has {t.shape[0]} rows, not a multiple of 3")
    return [c.contiguous() for c in t.chunk(3, dim=0)]


def embeddings(cls_embedding: torch.Tensor, pos_embedding: torch.Tensor, head: torch.Tensor | None):
    """Wan stores the class token as [1,1,D], positions as [1,P,D] and the projection as a [D,out]
    matrix; ComfyUI wants [D], [P,D] and a Linear weight [out,D]."""
    out = {"vision_model.embeddings.class_embedding": cls_embedding.reshape(-1),
           "vision_model.embeddings.position_embedding.weight": pos_embedding.reshape(pos_embedding.shape[-2], -1)}
    if head is not None:
        out["visual_projection.weight"] = head.t().contiguous()
    return out


def config_from_shapes(shape_of) -> dict:
    """ComfyUI CLIP vision config for this tower (`shape_of` takes ComfyUI-layout keys)."""
    n_layers = 0
    while True:
        try:
            shape_of(f"vision_model.encoder.layers.{n_layers}.layer_norm1.weight")
        except KeyError:
            break
        n_layers += 1
    dim, channels, patch, _ = shape_of("vision_model.embeddings.patch_embedding.weight")
    positions = shape_of("vision_model.embeddings.position_embedding.weight")[0]
    side = round((positions - 1) ** 0.5)
    try:
        projection = shape_of("visual_projection.weight")[0]
    except KeyError:
        projection = dim
    if dim % VIT_H_HEAD_DIM:
        raise ValueError(f"width {dim} is not a multiple of ViT-H's head width {VIT_H_HEAD_DIM}")
    return {"hidden_size": dim, "intermediate_size": shape_of("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
            "num_attention_heads": dim // VIT_H_HEAD_DIM, "num_hidden_layers": n_layers, "patch_size": patch,
            "image_size": side * patch, "projection_dim": projection, "num_channels": channels,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
            "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02}
