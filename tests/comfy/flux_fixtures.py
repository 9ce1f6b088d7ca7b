"""A tiny Flux-architecture DiT (schnell-style, no guidance embed), built from ComfyUI's own Flux
class so the key layout is exactly what ComfyUI detects; random weights."""
from __future__ import annotations

import torch
from safetensors.torch import save_file


def flux_state_dict(seed=0, hidden=256, depth=1, depth_single=2):
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    m = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
             hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // 128, depth=depth,
             depth_single_blocks=depth_single, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
             qkv_bias=True, guidance_embed=False, txt_ids_dims=[], operations=comfy.ops.manual_cast,
             dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in m.state_dict().items():
        if v.dim() == 2:
            t = torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5
            if ".lin." in k or "modulation" in k or "adaLN" in k:
                t = t * 0.1  # keep the adaLN shifts/scales modest
        elif k.endswith("scale") or "norm" in k:
            t = torch.ones(v.shape)
        else:
            t = torch.randn(v.shape, generator=g) * 0.02
        sd[k] = t.to(torch.bfloat16).contiguous()
    return sd


def write_flux(path):
    save_file(flux_state_dict(), str(path))


def conditioning(seed=0, tokens=8):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]


def latent(h=16, w=16):
    return {"samples": torch.zeros(1, 16, h, w)}
