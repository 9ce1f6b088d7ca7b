"""Encoder loaders on CUDA: the quantized umT5 / CLIP-vision linears must run a GPU kernel (not the
emulation) on ComfyUI's fp32 text-encoder activations, and stay close to the unquantized encoding.

Run on the GPU machine with QUANTDIT_COMFY_DEVICE=cuda so the conftest boots ComfyUI on the GPU."""
import pytest
import torch

import encoder_fixtures as ef
from test_encoders import (clip_files, encode, encode_image, load_clip_vision, load_t5, rel_err,  # noqa: F401
                           t5_files)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on the GPU machine")]


def _kernels(module):
    return {k.for_rows(1).name for m in module.modules() for k in getattr(m, "_kernels", {}).values()}


def _best(scheme):
    from quant.backends import pick_backend
    from quant.schemes import get_scheme
    return pick_backend(get_scheme(scheme), torch.device("cuda")).name


@pytest.mark.parametrize("variant,scheme,tol", [("int8", "int8-w8a8", 0.06), ("fp8", "fp8-w8a8", 0.2)])
def test_quantized_t5_runs_gpu_kernels(comfy, t5_files, variant, scheme, tol):
    _, names = t5_files
    base = encode(comfy, load_t5(comfy, names["bf16"])[0])
    clip, report = load_t5(comfy, names[variant])
    out = encode(comfy, clip)
    used = _kernels(clip.cond_stage_model)
    print(variant, "kernels used:", used, "relative error vs bf16:", rel_err(out, base))
    assert used == {_best(scheme)} and "reference" not in used
    assert 0 < rel_err(out, base) < tol


@pytest.mark.parametrize("variant,scheme,tol", [("int8", "int8-w8a8", 0.03), ("fp8", "fp8-w8a8", 0.1)])
def test_quantized_clip_vision_runs_gpu_kernels(comfy, clip_files, variant, scheme, tol):
    _, names = clip_files
    base = encode_image(comfy, load_clip_vision(comfy, names["fp16"])[0], ef.image())
    cv, report = load_clip_vision(comfy, names[variant])
    out = encode_image(comfy, cv, ef.image())
    used = _kernels(cv.model)
    print(variant, "kernels used:", used, "relative error vs fp16:", rel_err(out, base))
    assert used == {_best(scheme)} and "reference" not in used
    assert 0 < rel_err(out, base) < tol
