"""Run by test_dynamic_vram_gpu.py in a process of its own, on the GPU machine: starts ComfyUI's
DynamicVRAM (comfy-aimdo) as ComfyUI's main.py does on NVIDIA, makes this pack's quantized models
from core loaders and from its own, runs them, and prints one JSON line of what it saw."""
from __future__ import annotations

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
COMFY = os.environ.get("QUANTDIT_COMFYUI", os.path.join(ROOT, ".comfyui"))
sys.path[:0] = [ROOT, HERE]

from scripts.comfy_gpu_boot import start  # noqa: E402

aimdo = start(COMFY, ROOT)
import torch  # noqa: E402

import comfy.clip_vision  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402

import encoder_fixtures  # noqa: E402
import tiny_dits  # noqa: E402
from quant.convert import convert  # noqa: E402
from quant.encoders import clip_vision  # noqa: E402
from quant.encoders.checkpoint import CLIP_VISION, load_encoder, shape_lookup  # noqa: E402
from scripts.tiny_models import clip_l_text, save  # noqa: E402

work = tempfile.mkdtemp()
for kind in ("diffusion_models", "text_encoders", "clip_vision"):
    os.makedirs(os.path.join(work, kind))
    folder_paths.add_model_folder_path(kind, os.path.join(work, kind), is_default=True)
files = tiny_dits.write(os.path.join(work, "diffusion_models"), "probe", seed=4)
t5_names = encoder_fixtures.write_t5_files(os.path.join(work, "text_encoders"))
save(clip_l_text(), os.path.join(work, "text_encoders", "probe_clip_l.safetensors"))
vision_names = encoder_fixtures.write_clip_files(os.path.join(work, "clip_vision"))


def node(name, **kw):
    return tuple(nodes.NODE_CLASS_MAPPINGS[name].execute(**kw).result)


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


out = {"aimdo": bool(aimdo)}
dit = tiny_dits.load((nodes, None), files, "wan")
out["unet_loader_patcher"] = type(dit).__name__
quantized, _ = tiny_dits.quantize((nodes, None), dit, "int8-w8a8")
out["quantized_patcher"] = type(quantized).__name__
seen = tiny_dits.quantized_weight_devices(quantized)
base = tiny_dits.sample((nodes, None), files, "wan", dit)
out["dit_rel_err"] = rel_err(tiny_dits.sample((nodes, None), files, "wan", quantized), base)
out["dit_weight_devices"] = sorted(set(seen))

convert(os.path.join(work, "diffusion_models", files["wan"][0]), os.path.join(work, "diffusion_models", "probe_int8.safetensors"),
        "int8-vllm", "lightx2v")
loaded, _ = node("QuantDiTLoader", unet_name="probe_int8.safetensors", backend="auto", compute_dtype="default")
out["dit_loader_patcher"] = type(loaded).__name__
seen = tiny_dits.quantized_weight_devices(loaded)
out["dit_loader_rel_err"] = rel_err(tiny_dits.sample((nodes, None), files, "wan", loaded), base)
out["dit_loader_weight_devices"] = sorted(set(seen))

clip, _ = node("QuantDiTT5Loader", clip_name=t5_names["int8"], backend="auto")
out["t5_loader_patcher"] = type(clip.patcher).__name__
seen = tiny_dits.quantized_weight_devices(clip.patcher)
out["t5_finite"] = bool(nodes.CLIPTextEncode().encode(clip, "a cat")[0][0][0].isfinite().all())
out["t5_weight_devices"] = sorted(set(seen))

(clip_l,) = nodes.CLIPLoader().load_clip("probe_clip_l.safetensors", "stable_diffusion")
out["clip_loader_patcher"] = type(clip_l.patcher).__name__
base = nodes.CLIPTextEncode().encode(clip_l, "a cat")[0][0][0]
quantized_clip, _ = node("QuantDiTQuantizeTextEncoder", clip=clip_l, scheme="int8")
out["quantized_clip_patcher"] = type(quantized_clip.patcher).__name__
seen = tiny_dits.quantized_weight_devices(quantized_clip.patcher)
out["clip_rel_err"] = rel_err(nodes.CLIPTextEncode().encode(quantized_clip, "a cat")[0][0][0], base)
out["clip_weight_devices"] = sorted(set(seen))

# CLIP vision as ComfyUI's own CLIPVisionLoader builds it: a dynamic patcher that records no way to
# load the model again, so the Quantize node shares its modules with a legacy clone (cast_lazy_weights).
ckpt = load_encoder(os.path.join(work, "clip_vision", vision_names["fp16"]), CLIP_VISION)
core_vision = comfy.clip_vision.ClipVisionModel(clip_vision.config_from_shapes(shape_lookup(ckpt)))
core_vision.load_sd(dict(ckpt.state_dict))
out["core_vision_patcher"] = type(core_vision.patcher).__name__
image = encoder_fixtures.image()
base = nodes.CLIPVisionEncode().encode(core_vision, image, "center")[0]["penultimate_hidden_states"]
quantized_vision, _ = node("QuantDiTQuantizeCLIPVision", clip_vision=core_vision, scheme="int8")
out["quantized_vision_patcher"] = type(quantized_vision.patcher).__name__
seen = tiny_dits.quantized_weight_devices(quantized_vision.patcher)
quantized_out = nodes.CLIPVisionEncode().encode(quantized_vision, image, "center")[0]["penultimate_hidden_states"]
out["vision_rel_err"] = rel_err(quantized_out, base)
out["vision_weight_devices"] = sorted(set(seen))
torch.cuda.synchronize()
print("PROBE " + json.dumps(out))
