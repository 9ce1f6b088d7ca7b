"""A Quantize Model step under ComfyUI's DynamicVRAM against bf16 (GPU machine).

Starts comfy-aimdo as ComfyUI's main.py does on NVIDIA (or not, with --legacy), loads a random
Wan 2.1 1.3B-architecture DiT with UNETLoader, quantizes it with the Quantize Model node, samples 3
steps at 832x480x17 with each, and prints the patcher classes, where one quantized linear's weight
is when it runs, and the step times of bf16 and int8-w8a8. Run from the repo root:

    QUANTDIT_COMFYUI=/path/to/ComfyUI python bench/bench_dynamic_vram.py [--legacy]

PACK=/path/to/an/older/checkout measures that checkout's nodes instead (README, "ComfyUI's
DynamicVRAM", compares session 19's code).
"""
import os
import sys
import time

ROOT = os.path.abspath(os.environ.get("PACK", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
COMFY = os.environ.get("QUANTDIT_COMFYUI", os.path.join(ROOT, ".comfyui"))
sys.path.insert(0, COMFY)
sys.path.insert(1, ROOT)
LEGACY = "--legacy" in sys.argv

from comfy.cli_args import args  # noqa: E402

args.cpu = False
if not LEGACY:
    import comfy_aimdo.control  # noqa: E402
    for kwargs in (dict(simple_vram_headroom=None, nvml_pressure=True), dict(simple_vram_headroom=None), {}):
        try:
            comfy_aimdo.control.init(**kwargs)
            break
        except TypeError:
            continue

import asyncio  # noqa: E402

import torch  # noqa: E402

import comfy.memory_management  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402

if not LEGACY:
    devices = comfy.model_management.get_all_torch_devices()
    try:
        ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3)) for d in devices)
    except TypeError:
        ok = comfy_aimdo.control.init_devices(d.index for d in devices)
    print("aimdo init_devices:", ok)
    if ok:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True

assert asyncio.run(nodes.load_custom_node(ROOT))
from scripts.tiny_models import save, wan21_dit  # noqa: E402

models = "/tmp/dyn_models"
print("pack:", ROOT, "legacy:", LEGACY)
os.makedirs(models, exist_ok=True)
folder_paths.add_model_folder_path("diffusion_models", models, is_default=True)
name = "wan13b_random.safetensors"
if not os.path.exists(os.path.join(models, name)):
    save(wan21_dit(dim=1536, ffn_dim=8960, num_layers=30, seed=0), os.path.join(models, name))

model = nodes.UNETLoader().load_unet(name, "default")[0]
print("UNETLoader patcher:", type(model).__name__, "dynamic:", model.is_dynamic())
quantized, report = nodes.NODE_CLASS_MAPPINGS["QuantDiTQuantizeModel"].execute(
    model=model, scheme="int8-w8a8", backend="auto").result
print("quantized patcher:", type(quantized).__name__, "dynamic:", quantized.is_dynamic())
layer = quantized.get_model_object("diffusion_model.blocks.0.ffn.0")
seen = []
layer.register_forward_pre_hook(lambda m, a: seen.append((str(m.weight.device), str(a[0].device))))

g = torch.Generator().manual_seed(0)
cond = [[torch.randn(1, 512, 4096, generator=g), {}]]
latent = {"samples": torch.zeros(1, 16, 5, 60, 104)}


def step_ms(m):
    nodes.KSampler().sample(m, 0, 1, 1.0, "euler", "simple", cond, cond, latent, denoise=1.0)  # warm / load
    torch.cuda.synchronize()
    t = time.perf_counter()
    nodes.KSampler().sample(m, 0, 3, 1.0, "euler", "simple", cond, cond, latent, denoise=1.0)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 3 * 1000


print(f"bf16 step {step_ms(model):.1f} ms")
print(f"int8-w8a8 step {step_ms(quantized):.1f} ms")
print("ffn.0 weight device / input device at forward:", seen[:1], "calls:", len(seen))
print(report)
