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

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.abspath(os.environ.get("PACK", HERE))
COMFY = os.environ.get("QUANTDIT_COMFYUI", os.path.join(ROOT, ".comfyui"))
LEGACY = "--legacy" in sys.argv

sys.path.insert(0, HERE)
from scripts.comfy_gpu_boot import start  # noqa: E402  (this checkout's, whatever PACK is)

print("aimdo on:", start(COMFY, ROOT, dynamic=not LEGACY))
import torch  # noqa: E402

import folder_paths  # noqa: E402
import nodes  # noqa: E402

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
