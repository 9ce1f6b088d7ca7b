"""Keep this pack's quantized layers out of ComfyUI's DynamicVRAM.

ComfyUI 0.30 loads models through ModelPatcherDynamic (comfy-aimdo) by default on NVIDIA. It leaves
each module that has `comfy_cast_weights` on the CPU and expects the module's forward to fetch its
weight through comfy.ops.cast_bias_weight, applying LoRA to that fetched weight as floats. A quantized
linear reads its 8-bit weight and scale itself and must requantize a LoRA-patched weight, so it
would copy its weight to the GPU on every call there. Every patcher holding quantized layers is
therefore a legacy ModelPatcher: ComfyUI moves their weights to the GPU once per load (part of them
under lowvram), as it did before DynamicVRAM.
"""
from __future__ import annotations

import contextlib

import torch

import comfy.memory_management
import comfy.model_patcher


@contextlib.contextmanager
def built_as_without_dynamic_vram():
    """While DynamicVRAM is on, ComfyUI builds even a non-dynamic model lazily: its weights stay in
    the file's dtype for the dynamic loader to cast at each call. A legacy patcher does not cast
    them (a Wan DiT then fails with "Half and BFloat16"), so its copy is built as ComfyUI builds
    models without DynamicVRAM."""
    saved = comfy.memory_management.aimdo_enabled
    comfy.memory_management.aimdo_enabled = False
    try:
        yield
    finally:
        comfy.memory_management.aimdo_enabled = saved


def cast_lazy_weights(model: torch.nn.Module) -> int:
    """Casts to the model's dtype the weights that DynamicVRAM's lazy init left in the file's dtype,
    in modules that do not cast in their forward; returns how many. The dynamic patcher sharing
    these modules casts whatever it finds, so it is not affected."""
    cast = 0
    for module in model.modules():
        if getattr(module, "comfy_cast_weights", False):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            dtype = getattr(module, f"{name}_comfy_model_dtype", None)
            if dtype is not None and param.dtype != dtype and param.is_floating_point():
                setattr(module, name, torch.nn.Parameter(param.detach().to(dtype), requires_grad=False))
                cast += 1
    return cast


def non_dynamic(patcher):
    """`patcher` itself, or when it is dynamic, a legacy clone of it. Core loaders record how to load
    their file again, and the clone gets that fresh copy (as ComfyUI's own TorchCompileModel does);
    other loaders' models are shared with the dynamic patcher."""
    if not patcher.is_dynamic():
        return patcher
    if patcher.cached_patcher_init is not None:
        with built_as_without_dynamic_vram():
            return patcher.get_non_dynamic_delegate()
    cast_lazy_weights(patcher.model)
    return patcher.clone(disable_dynamic=True, model_override=patcher.get_clone_model_override())


def legacy_patcher(patcher):
    """A legacy patcher over the modules of `patcher`, for models this pack built itself (nothing
    else holds them yet)."""
    if not patcher.is_dynamic():
        return patcher
    return comfy.model_patcher.ModelPatcher(patcher.model, load_device=patcher.load_device,
                                            offload_device=patcher.offload_device)
