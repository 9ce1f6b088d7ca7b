"""Tiny Wan and Flux DiTs for the ComfyUI tests of the quantize-time patches (GELU hand-off, shared
activation quant): written once per module, loaded with UNETLoader, quantized with the Quantize
Model node and sampled with KSampler."""
from __future__ import annotations

import os

import flux_fixtures
import wan_fixtures
from scripts.tiny_models import save, wan21_dit


def write(models_dir: str, prefix: str, seed: int) -> dict:
    """{arch: (file name under models_dir, its conditioning / latent fixtures)}."""
    wan, flux = f"{prefix}_wan_bf16.safetensors", f"{prefix}_flux_bf16.safetensors"
    save(wan21_dit(dim=256, ffn_dim=512, num_layers=2, seed=seed), os.path.join(models_dir, wan))
    flux_fixtures.write_flux(os.path.join(models_dir, flux))
    return {"wan": (wan, wan_fixtures), "flux": (flux, flux_fixtures)}


def load(comfy, files, arch):
    nodes, _ = comfy
    return nodes.UNETLoader().load_unet(files[arch][0], "default")[0]


def quantize(comfy, model, scheme, backend="auto", **kw):
    nodes, _ = comfy
    return tuple(nodes.NODE_CLASS_MAPPINGS["QuantDiTQuantizeModel"].execute(
        model=model, scheme=scheme, backend=backend, **kw).result)


def sample(comfy, files, arch, model):
    nodes, _ = comfy
    fx = files[arch][1]
    (out,) = nodes.KSampler().sample(model, 5, 2, 2.0, "euler", "simple", fx.conditioning(1), fx.conditioning(2),
                                     fx.latent(), denoise=1.0)
    return out["samples"].float()


def attached(model, attr: str) -> dict:
    """{module path under diffusion_model: its `attr`} of every quantized linear (object patch or
    loaded module) whose `attr` (quant_share, quant_fused) is set."""
    found = {}
    for key, obj in model.object_patches.items():
        if getattr(obj, attr, None) is not None:
            found[key[len("diffusion_model."):]] = getattr(obj, attr)
    for name, module in model.model.diffusion_model.named_modules():
        if getattr(module, attr, None) is not None:
            found.setdefault(name, getattr(module, attr))
    return found


def sharing(model, attr: str) -> list:
    """The sorted module paths of each object in attached(model, attr), sorted."""
    by_object = {}
    for name, obj in attached(model, attr).items():
        by_object.setdefault(id(obj), []).append(name)
    return sorted(sorted(names) for names in by_object.values())


def quantized_weight_devices(patcher) -> list:
    """A list that records the device of each quantized linear's weight whenever it runs: those the
    patcher swaps in as object patches and those built into its model (a quantized loader's)."""
    seen = []
    modules = {id(m): m for m in [*patcher.object_patches.values(), *patcher.model.modules()]}
    for module in modules.values():
        if getattr(module, "quant_scheme", None) is not None:
            module.register_forward_pre_hook(lambda m, a: seen.append(str(m.weight.device)))
    return seen
