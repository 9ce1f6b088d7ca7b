"""This pack's quantized models under ComfyUI's real DynamicVRAM (comfy-aimdo), GPU machine only.

DynamicVRAM is process-wide and starts before the first model loads, so dynamic_vram_probe.py runs
it in a process of its own, as ComfyUI's main.py starts it on NVIDIA."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on the GPU machine")]

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dynamic_vram_probe.py")


@pytest.fixture(scope="module")
def seen():
    run = subprocess.run([sys.executable, PROBE], capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("PROBE ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(lines[-1][len("PROBE "):])


def test_comfyui_runs_its_dynamic_patcher_here(seen):
    assert seen["aimdo"], seen
    assert seen["unet_loader_patcher"] == seen["clip_loader_patcher"] == "ModelPatcherDynamic"


def test_quantize_model_output_keeps_its_weights_on_the_gpu(seen):
    assert seen["quantized_patcher"] == "ModelPatcher"
    assert seen["dit_weight_devices"] == ["cuda:0"]
    assert 0 < seen["dit_rel_err"] < 0.012  # int8-w8a8's tolerance in test_quantize_node


def test_dit_loader_output_keeps_its_weights_on_the_gpu(seen):
    assert seen["dit_loader_patcher"] == "ModelPatcher"
    assert seen["dit_loader_weight_devices"] == ["cuda:0"]
    assert 0 < seen["dit_loader_rel_err"] < 0.012


def test_encoders_keep_their_quantized_weights_on_the_gpu(seen):
    assert seen["t5_loader_patcher"] == seen["quantized_clip_patcher"] == "ModelPatcher"
    assert seen["t5_weight_devices"] == seen["clip_weight_devices"] == ["cuda:0"]
    assert seen["t5_finite"] and 0 < seen["clip_rel_err"] < 0.05


def test_quantized_clip_vision_from_comfyuis_own_build_keeps_its_weights_on_the_gpu(seen):
    # ComfyUI's CLIPVisionLoader path: a dynamic patcher with no recipe to load the model again
    assert seen["core_vision_patcher"] == "ModelPatcherDynamic"
    assert seen["quantized_vision_patcher"] == "ModelPatcher"
    assert seen["vision_weight_devices"] == ["cuda:0"]
    assert 0 < seen["vision_rel_err"] < 0.03  # int8's tolerance in test_encoders
