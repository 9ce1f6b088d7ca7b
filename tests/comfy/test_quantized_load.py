"""The Quantize Model node's output loads its own quantized weights when ComfyUI already holds the
input model loaded (the input was sampled first, or by an earlier run).

ComfyUI takes two clones of one model with the same patches_uuid to have the same weights, and then
only swaps object patches in: the quantized layers' weights stayed on the offload device and were
copied to the GPU in every call. Runs on the CPU (ComfyUI's load bookkeeping) and, with
QUANTDIT_COMFY_DEVICE=cuda, on the GPU machine (where each weight is at forward time)."""
from __future__ import annotations

import pytest
import torch

import tiny_dits


@pytest.fixture(scope="module")
def files(models_dir):
    return tiny_dits.write(str(models_dir), "reload", seed=8)


def quantized_weight_devices(patcher) -> list:
    seen = []
    for module in patcher.object_patches.values():
        if getattr(module, "quant_scheme", None) is not None:
            module.register_forward_pre_hook(lambda m, a: seen.append(str(m.weight.device)))
    return seen


@pytest.mark.parametrize("arch", ["wan", "flux"])
def test_quantized_clone_loads_its_weights_after_the_input_ran(comfy, files, arch):
    model = tiny_dits.load(comfy, files, arch)
    tiny_dits.sample(comfy, files, arch, model)  # a cold CUDA run differs in the last bits from warm ones
    first = tiny_dits.sample(comfy, files, arch, model)  # ComfyUI now holds the bf16 weights loaded
    quantized, _ = tiny_dits.quantize(comfy, model, "int8-w8a8")
    seen = quantized_weight_devices(quantized)
    out = tiny_dits.sample(comfy, files, arch, quantized)
    assert model.model.current_weight_patches_uuid == quantized.patches_uuid != model.patches_uuid
    assert seen and set(seen) == {str(quantized.load_device)}, set(seen)
    assert 0 < float((out - first).norm() / first.norm()) < 0.02
    # Back to the input: its own weights again, bit-equal to its warm run.
    assert torch.equal(tiny_dits.sample(comfy, files, arch, model), first)


def test_a_lora_patched_scale_follows_its_module_to_the_load_device(comfy):
    """ComfyUI patches a LoRA into the weight before it moves the module (Module.to); the patched
    scale, a plain attribute, must follow (on the GPU a CPU scale was an illegal memory access).
    The meta device stands in for the GPU here."""
    _, pack = comfy
    from quant.schemes import get_scheme
    layer = pack.nodes.ops.QuantizedLinear.from_linear(torch.nn.Linear(32, 16), get_scheme("int8-w8a8"), None,
                                                       torch.device("cpu"))
    w = layer.convert_weight(layer.weight.to(torch.float32))
    layer.set_weight(w * 3)  # what ComfyUI's patch_weight_to_device does for a LoRA
    patched = layer.current_scale()
    assert not torch.equal(patched, layer.weight_scale)
    layer.to("meta")
    moved = layer.current_scale()
    assert moved.device.type == "meta" and moved.shape == patched.shape
