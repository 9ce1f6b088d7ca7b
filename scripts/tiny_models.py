"""Small random models with the real architectures' key layouts (no weights can be downloaded here).

Pure torch. Used by the demo and the tests:
- `wan21_dit`: a Wan 2.1 text-to-video DiT (same key names and shapes rules as the released
  1.3B/14B checkpoints; only dim / ffn_dim / layer count are small).
- `clip_l_text`: a CLIP-L text encoder (ComfyUI's SD1 CLIP layout) to produce conditioning in
  workflows; the demo DiT is built with text_dim=768 to match it.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

WAN_TEXT_DIM_FOR_CLIP_L = 768


class _Random:
    """randn in float32 on `device`, stored at once in `dtype` (a full-size DiT never exists in fp32)."""

    def __init__(self, seed, device, dtype):
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device, self.dtype = device, dtype

    def randn(self, *shape, scale=1.0):
        return (torch.randn(*shape, generator=self.gen, device=self.device) * scale).to(self.dtype)

    def full(self, value, *shape):
        return torch.full(shape, value, device=self.device, dtype=self.dtype)


def _linear(sd, name, out_f, in_f, rnd, bias=True, gain=1.0):
    sd[name + ".weight"] = rnd.randn(out_f, in_f, scale=gain / in_f ** 0.5)
    if bias:
        sd[name + ".bias"] = rnd.randn(out_f, scale=0.02)


def wan21_dit(dim=128, ffn_dim=256, num_layers=2, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256,
              seed=0, dtype=torch.bfloat16, device="cpu") -> dict[str, torch.Tensor]:
    if dim % 128:
        raise ValueError("Wan uses 128-wide heads: dim must be a multiple of 128")
    g = _Random(seed, device, dtype)
    sd: dict[str, torch.Tensor] = {}
    sd["patch_embedding.weight"] = g.randn(dim, in_dim, 1, 2, 2, scale=1 / (in_dim * 4) ** 0.5)
    sd["patch_embedding.bias"] = g.full(0.0, dim)
    _linear(sd, "text_embedding.0", dim, text_dim, g)
    _linear(sd, "text_embedding.2", dim, dim, g)
    _linear(sd, "time_embedding.0", dim, freq_dim, g)
    _linear(sd, "time_embedding.2", dim, dim, g)
    _linear(sd, "time_projection.1", dim * 6, dim, g)  # gates ~1: blocks matter
    for i in range(num_layers):
        b = f"blocks.{i}."
        sd[b + "modulation"] = g.randn(1, 6, dim, scale=0.02)
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                _linear(sd, f"{b}{attn}.{p}", dim, dim, g)
            sd[f"{b}{attn}.norm_q.weight"] = g.full(1.0, dim)
            sd[f"{b}{attn}.norm_k.weight"] = g.full(1.0, dim)
        sd[b + "norm3.weight"] = g.full(1.0, dim)
        sd[b + "norm3.bias"] = g.full(0.0, dim)
        _linear(sd, b + "ffn.0", ffn_dim, dim, g)
        _linear(sd, b + "ffn.2", dim, ffn_dim, g)
    sd["head.modulation"] = g.randn(1, 2, dim, scale=0.02)
    _linear(sd, "head.head", out_dim * 4, dim, g, gain=0.5)
    return sd


def wan21_metadata(text_dim: int) -> dict[str, str]:
    """ComfyUI reads architecture overrides from the 'config' metadata entry."""
    return {"config": json.dumps({"transformer": {"text_dim": text_dim}})} if text_dim != 4096 else {}


def clip_l_text(seed=0, dtype=torch.float16, layers=12, width=768, vocab=49408, ctx=77) -> dict[str, torch.Tensor]:
    g = _Random(seed, "cpu", torch.float32)
    p = "text_model."
    sd = {p + "embeddings.token_embedding.weight": g.randn(vocab, width, scale=0.02),
          p + "embeddings.position_embedding.weight": g.randn(ctx, width, scale=0.01)}
    for i in range(layers):
        b = f"{p}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(sd, b + "self_attn." + n, width, width, g)
        for n in ("layer_norm1", "layer_norm2"):
            sd[b + n + ".weight"] = torch.ones(width)
            sd[b + n + ".bias"] = torch.zeros(width)
        _linear(sd, b + "mlp.fc1", width * 4, width, g)
        _linear(sd, b + "mlp.fc2", width, width * 4, g)
    sd[p + "final_layer_norm.weight"] = torch.ones(width)
    sd[p + "final_layer_norm.bias"] = torch.zeros(width)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def save(sd: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None):
    save_file(sd, path, metadata=metadata or None)
