"""A full-size umT5-XXL encoder (random weights, Wan's layout) encoding one 512-token prompt in the
real ComfyUI runtime: bf16 and this pack's schemes side by side in one process.

    python bench/bench_encoder.py
    python bench/bench_encoder.py --variants int8:auto fp8:triton --reps 10

Variants are SCHEME:BACKEND, with the seeds' t5_quant_scheme names (int8 / fp8 = W8A8). For each:
GPU memory the loaded encoder holds, peak memory while encoding, median encode time, and the
cosine similarity of the 512x4096 output to bf16. Needs CUDA and ComfyUI (QUANTDIT_COMFYUI).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = os.environ.get("QUANTDIT_COMFYUI", os.path.join(ROOT, ".comfyui"))
sys.path.insert(0, COMFY)
sys.path.insert(1, ROOT)

import torch  # noqa: E402

VARIANTS = ["int8:auto", "int8:triton", "fp8:auto", "fp8:triton", "int8-weight-only:auto", "fp8-weight-only:auto"]
GIB = 1024 ** 3


def boot():
    import nodes
    assert asyncio.run(nodes.load_custom_node(ROOT))
    return sys.modules[ROOT.replace(".", "_x_")]


def random_umt5_xxl(pack):
    """ComfyUI-layout state dict on the CPU, generated on the GPU (minutes on a CPU)."""
    from scripts.tiny_encoders import UMT5_XXL, umt5_wan
    umt5 = sys.modules[pack.__name__ + ".quant.encoders.umt5"]
    sd = umt5_wan(**UMT5_XXL, seed=0, device="cuda")
    return {umt5.comfy_key(k): v.cpu() for k, v in sd.items()}


def checkpoint(pack, sd, scheme_name):
    """An in-memory EncoderCheckpoint with the block linears quantized as a LightX2V file would be."""
    ck = sys.modules[pack.__name__ + ".quant.encoders.checkpoint"]
    detect = sys.modules[pack.__name__ + ".quant.formats.detect"]
    reference = sys.modules[pack.__name__ + ".quant.reference"]
    schemes = sys.modules[pack.__name__ + ".quant.schemes"]
    filters = sys.modules[pack.__name__ + ".quant.filters"]
    out, layers = dict(sd), {}
    if scheme_name != "bf16":
        scheme = schemes.resolve(scheme_name, namespace="encoder").scheme
        for key, w in sd.items():
            layer = key[: -len(".weight")]
            if not key.endswith(".weight") or filters.ENCODER_FILTER.skip_reason(layer, tuple(w.shape)):
                continue
            q, s = reference.quantize_weight(w.cuda().float(), scheme)
            out[key], out[layer + ".weight_scale"] = q.cpu(), s.cpu()
            layers[layer] = detect.LayerQuant(layer, scheme.name, "lightx2v", key, layer + ".weight_scale",
                                              tuple(w.shape))
    return ck.EncoderCheckpoint("<random umT5-XXL>", ck.T5, out, layers, f"in-memory / {scheme_name}")


def measure(pack, ckpt, backend, spiece, tokens, reps):
    import comfy.model_management as mm
    loader = sys.modules[pack.__name__ + ".nodes.encoder_loader"]
    mm.unload_all_models()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    clip, report = loader.build_t5_clip(ckpt, loader.t5_config(ckpt), spiece, backend)
    out = clip.encode_from_tokens(tokens)  # loads the encoder onto the GPU, compiles/tunes kernels
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = clip.encode_from_tokens(tokens)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() - base
    kernels = sorted({f"{k.name}" for m in clip.cond_stage_model.modules() for k in getattr(m, "_kernels", {}).values()})
    del clip
    mm.unload_all_models()
    return out.float().cpu(), statistics.median(times), held, peak, kernels, report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    pack = boot()
    from scripts.tiny_encoders import train_spiece
    spiece = torch.frombuffer(bytearray(train_spiece()), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256000, (511,), generator=g).tolist() + [1]  # 511 words + the end token
    tokens = {"umt5xxl": [[(i, 1.0) for i in ids]]}
    sd = random_umt5_xxl(pack)
    print(f"umT5-XXL architecture (random weights), one 512-token prompt, {torch.cuda.get_device_name()}, "
          f"median of {a.reps}")
    ref, t_ref, held_ref, peak_ref, _, _ = measure(pack, checkpoint(pack, sd, "bf16"), "auto", spiece, tokens, a.reps)
    print("| variant | kernels | encode ms | vs bf16 | GPU weights GiB | vs bf16 | peak GiB | cosine |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| bf16 | torch | {t_ref * 1e3:.1f} | 1.00x | {held_ref / GIB:.2f} | 1.00x | {peak_ref / GIB:.2f} | 1 |")
    for v in a.variants:
        scheme, backend = v.split(":")
        out, t, held, peak, kernels, _ = measure(pack, checkpoint(pack, sd, scheme), backend, spiece, tokens, a.reps)
        cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
        print(f"| {v} | {','.join(kernels)} | {t * 1e3:.1f} | {t_ref / t:.2f}x | {held / GIB:.2f} | "
              f"{held / held_ref:.2f}x | {peak / GIB:.2f} | {cos:.5f} |")


if __name__ == "__main__":
    main()
