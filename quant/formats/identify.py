"""Name what a checkpoint is from its keys, for errors like "this is a CLIP vision file, not a T5"."""
from __future__ import annotations

from ..encoders import clip_vision, umt5

_STRIP = ("model.diffusion_model.", "diffusion_model.", "text_encoders.", "conditioner.")


def _strip(key: str) -> str:
    for p in _STRIP:
        if key.startswith(p):
            return key[len(p):]
    return key


def describe(keys) -> str:
    keys = {_strip(k) for k in keys}
    if any(".lora_" in k or "lora_down" in k or "lora_A" in k for k in keys):
        return "a LoRA (load it with a LoRA loader)"
    if umt5.layout(keys) == umt5.WAN:
        return "a umT5 text encoder in Wan's layout (use 'Load Quantized T5 Encoder')"
    if umt5.layout(keys) == umt5.COMFY:
        return "a umT5 text encoder in ComfyUI's layout (use 'Load Quantized T5 Encoder')"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in keys:
        return "a T5 (not umT5) text encoder (use ComfyUI's CLIP loaders)"
    if clip_vision.layout(keys) == clip_vision.WAN:
        return "Wan's CLIP image encoder (use 'Load Quantized CLIP Vision')"
    if clip_vision.layout(keys) == clip_vision.COMFY:
        return "a CLIP vision encoder in ComfyUI's layout (use 'Load Quantized CLIP Vision')"
    if any(k.startswith("text_model.encoder.layers.") for k in keys):
        return "a CLIP text encoder (use ComfyUI's CLIP loaders)"
    if any(k.startswith(("blocks.0.self_attn.", "double_blocks.0.", "transformer_blocks.0.")) for k in keys):
        return "a diffusion transformer (use 'Load Quantized DiT')"
    if any(k.startswith(("decoder.conv_in", "decoder.head", "encoder.conv1", "decoder.up_blocks")) for k in keys):
        return "a VAE (use ComfyUI's 'Load VAE')"
    sample = ", ".join(sorted(keys)[:3])
    return f"an unrecognized checkpoint (first keys: {sample})"
