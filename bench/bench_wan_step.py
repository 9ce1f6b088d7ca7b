"""One sampling step of a full-size Wan 2.1 1.3B-architecture DiT (random weights) in the real
ComfyUI runtime, bf16 against every runtime scheme of the Quantize Model node, side by side in
one process. Prints a table of step time, speed ratio vs bf16 and DiT linear-weight memory.

    python bench/bench_wan_step.py [--frames 81 --height 480 --width 832] [--schemes ...]

Needs a CUDA GPU and ComfyUI importable (QUANTDIT_COMFYUI=path, default .comfyui).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = os.environ.get("QUANTDIT_COMFYUI", os.path.join(ROOT, ".comfyui"))
sys.path.insert(0, COMFY)
sys.path.insert(1, ROOT)

import torch  # noqa: E402

SCHEMES = ["fp8-w8a8", "int8-w8a8", "fp8-block128", "fp8-weight-only", "int8-weight-only", "int4-g128"]


def boot():
    import nodes
    assert asyncio.run(nodes.load_custom_node(ROOT))
    return nodes, sys.modules[ROOT.replace(".", "_x_")]


def wan_1_3b_state_dict():
    from scripts.tiny_models import wan21_dit
    torch.manual_seed(0)
    return wan21_dit(dim=1536, ffn_dim=8960, num_layers=30, text_dim=4096, seed=0)


def step_time(model, x, sigma, context, reps):
    """Median seconds of one denoiser call (what one Euler step costs)."""
    import comfy.model_management as mm
    mm.load_models_gpu([model], force_full_load=True)
    base = model.model
    times = []
    with torch.inference_mode():
        for i in range(reps + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            base.apply_model(x, sigma, c_crossattn=context)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out = base.apply_model(x, sigma, c_crossattn=context).float()
    times.sort()
    return times[len(times) // 2], out


def linear_bytes(model):
    total = 0
    for name, m in model.model.diffusion_model.named_modules():
        m = model.object_patches.get(f"diffusion_model.{name}", m)
        if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2 and name.startswith("blocks."):
            total += m.weight.numel() * m.weight.element_size()
            s = getattr(m, "weight_scale", None)
            total += 0 if s is None else s.numel() * s.element_size()
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--schemes", nargs="*", default=SCHEMES)
    a = p.parse_args()
    nodes, pack = boot()
    import comfy.model_management as mm
    import comfy.sd
    sd = wan_1_3b_state_dict()
    bf16 = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.bfloat16})
    del sd
    dev = mm.get_torch_device()
    t = (a.frames - 1) // 4 + 1
    x = torch.randn(1, 16, t, a.height // 8, a.width // 8, device=dev, dtype=torch.bfloat16)
    sigma = torch.tensor([0.7], device=dev)
    context = torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16)
    tokens = t * (a.height // 16) * (a.width // 16)
    print(f"Wan 2.1 1.3B architecture, {a.width}x{a.height}x{a.frames} ({tokens} tokens), "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ref_t, ref_out = step_time(bf16, x, sigma, context, a.reps)
    ref_bytes = linear_bytes(bf16)
    rows = [("bf16", ref_t, 1.0, ref_bytes, 1.0, 1.0, "-")]
    Quantize = nodes.NODE_CLASS_MAPPINGS["QuantDiTQuantizeModel"]
    for scheme in a.schemes:
        mm.unload_all_models()
        torch.cuda.empty_cache()
        q, report = Quantize.execute(model=bf16, scheme=scheme, backend="auto").result
        qt, out = step_time(q, x, sigma, context, a.reps)
        cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref_out.flatten(), 0))
        kernel = [ln for ln in report.splitlines() if "kernel:" in ln]
        rows.append((scheme, qt, ref_t / qt, linear_bytes(q), linear_bytes(q) / ref_bytes, cos,
                     kernel[0].split("kernel: ")[1].rstrip(")") if kernel else "?"))
        del q
    print(f"{'variant':18} {'step ms':>9} {'speed vs bf16':>14} {'block linears MiB':>18} {'mem vs bf16':>12} "
          f"{'cos vs bf16':>12}  kernel")
    for name, tm, ratio, b, mr, cos, kern in rows:
        print(f"{name:18} {tm * 1000:9.1f} {ratio:13.2f}x {b / 2**20:18.0f} {mr:11.2f}x {cos:12.5f}  {kern}")


if __name__ == "__main__":
    main()
