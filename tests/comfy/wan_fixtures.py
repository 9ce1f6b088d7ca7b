"""Tiny Wan 2.1 checkpoints in every layout the loader reads, written once per session."""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, ROOT)
from quant.convert import convert  # noqa: E402
from scripts.tiny_models import save, wan21_dit  # noqa: E402

# (file name, scheme, layout)
VARIANTS = {
    "lightx2v-int8": ("wan_tiny_int8.safetensors", "int8-vllm", "lightx2v"),
    "lightx2v-fp8": ("wan_tiny_fp8_e4m3.safetensors", "fp8-sgl", "lightx2v"),
    "lightx2v-fp8-block128": ("wan_tiny_fp8_b128.safetensors", "fp8-b128-deepgemm", "lightx2v"),
    "comfy-scaled-fp8": ("wan_tiny_scaled_fp8.safetensors", "fp8-scaled", "comfyui-scaled-fp8"),
    "comfy-metadata-fp8": ("wan_tiny_quant_meta.safetensors", "fp8-scaled", "comfyui-metadata"),
}
BF16_NAME = "wan_tiny_bf16.safetensors"


def write_all(folder) -> dict[str, str]:
    folder = str(folder)
    src = os.path.join(folder, BF16_NAME)
    # 256-wide so every block linear passes the multiple-of-16 filter; 2 blocks.
    save(wan21_dit(dim=256, ffn_dim=512, num_layers=2, seed=1), src)
    out = {"bf16": BF16_NAME}
    for key, (name, scheme, layout) in VARIANTS.items():
        convert(src, os.path.join(folder, name), scheme, layout)
        out[key] = name
    return out


def conditioning(seed=0, tokens=12, text_dim=4096):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, text_dim, generator=g), {}]]


def latent(frames=2, h=16, w=16):
    return {"samples": torch.zeros(1, 16, frames, h, w)}
