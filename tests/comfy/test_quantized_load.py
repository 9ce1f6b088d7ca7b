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


@pytest.mark.parametrize("arch", ["wan", "flux"])
def test_quantized_clone_loads_its_weights_after_the_input_ran(comfy, files, arch):
    model = tiny_dits.load(comfy, files, arch)
    tiny_dits.sample(comfy, files, arch, model)  # a cold CUDA run differs in the last bits from warm ones
    first = tiny_dits.sample(comfy, files, arch, model)  # ComfyUI now holds the bf16 weights loaded
    quantized, _ = tiny_dits.quantize(comfy, model, "int8-w8a8")
    seen = tiny_dits.quantized_weight_devices(quantized)
    out = tiny_dits.sample(comfy, files, arch, quantized)
    assert model.model.current_weight_patches_uuid == quantized.patches_uuid != model.patches_uuid
    assert seen and set(seen) == {str(quantized.load_device)}, set(seen)
    assert 0 < float((out - first).norm() / first.norm()) < 0.02
    # Back to the input: its own weights again, bit-equal to its warm run.
    assert torch.equal(tiny_dits.sample(comfy, files, arch, model), first)

