"""One sampling step of a full-size DiT (random weights) in the real ComfyUI runtime: bf16, ComfyUI's
own `fp8_e4m3fn_fast` weight dtype, and this pack's schemes, side by side in one process.

    python bench/bench_step.py --model wan14b     # Wan 2.1 14B architecture, 832x480x81 (32760 tokens)
    python bench/bench_step.py --model flux       # Flux architecture, 1024x1024 (4096 + 512 tokens)
    python bench/bench_step.py --model wan1.3b --variants fp8-w8a8:auto int8-w8a8:triton
    python bench/bench_step.py --model flux --profile 12   # + where each variant's GPU time goes
    python bench/bench_step.py --model flux --variants int8-w8a8:auto --alternate vllm triton

Variants are SCHEME:BACKEND (the Quantize Model node's two widgets), optionally followed by
`:weight-only-few-rows`, `:no-gelu-handoff` (the node's GELU hand-off patches removed),
`:no-heads-handoff` (the attention hand-off's hook removed: ComfyUI copies the attention output),
`:no-shared-quant` (q, k and v each quantize their common input, as before nodes/shared_quant.py) and/or
`:no-fused-siblings` (Wan's context k/v, Qwen-Image's q/k/v each run their own GEMM, as before
nodes/fused_siblings.py).
Prints the step time, the ratio to bf16 and to ComfyUI fp8_e4m3fn_fast, DiT block linear-weight
memory vs bf16, and the cosine similarity of the denoiser output to bf16. Needs CUDA and ComfyUI (QUANTDIT_COMFYUI, default .comfyui).

`--alternate B1 B2 ...` also runs each variant's quantized model (the same weights) under each of
these backends (`B:no-heads-handoff`: without the attention hand-off), switching at every step, so
a slow spell of the host falls on all of them alike: the variants themselves run one after
another, and their wall times move with the host.
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

VARIANTS = ["fp8-w8a8:auto", "fp8-w8a8:triton", "int8-w8a8:auto", "int8-w8a8:triton", "fp8-block128:auto",
            "int4-g128:auto", "fp8-weight-only:auto"]
WAN = {"wan14b": dict(dim=5120, ffn_dim=13824, num_layers=40), "wan1.3b": dict(dim=1536, ffn_dim=8960, num_layers=30)}


def boot():
    import nodes
    assert asyncio.run(nodes.load_custom_node(ROOT))
    return nodes


def wan_inputs(model, dev, a):
    from scripts.tiny_models import wan21_dit
    sd = wan21_dit(**WAN[model], text_dim=4096, seed=0, device=dev)
    t = (a.frames - 1) // 4 + 1
    x = torch.randn(1, 16, t, a.height // 8, a.width // 8, device=dev, dtype=torch.bfloat16)
    context = torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16)
    tokens = t * (a.height // 16) * (a.width // 16)
    title = f"Wan 2.1 {model[3:]} architecture, {a.width}x{a.height}x{a.frames} ({tokens} tokens)"
    return sd, dict(x=x, c_crossattn=context), title


def flux_inputs(dev, a, depth=19, single=38):
    """Flux-dev-sized DiT (hidden 3072, 19 double + 38 single blocks); shapes from ComfyUI's class."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    with torch.device("meta"):
        m = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                 hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=depth, depth_single_blocks=single,
                 axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False,
                 txt_ids_dims=[], operations=comfy.ops.manual_cast, dtype=torch.bfloat16, device="meta")
    g = torch.Generator(device=dev).manual_seed(0)
    sd = {}
    for k, v in m.state_dict().items():
        if v.dim() == 2:
            gain = 0.1 if (".lin." in k or "modulation" in k or "adaLN" in k) else 1.0
            sd[k] = (torch.randn(v.shape, generator=g, device=dev) * (gain / v.shape[1] ** 0.5)).to(torch.bfloat16)
        elif k.endswith("scale") or "norm" in k:
            sd[k] = torch.ones(v.shape, device=dev, dtype=torch.bfloat16)
        else:
            sd[k] = (torch.randn(v.shape, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, 16, a.height // 8, a.width // 8, device=dev, dtype=torch.bfloat16)
    context = torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16)
    pooled = torch.randn(1, 768, device=dev, dtype=torch.bfloat16)
    tokens = (a.height // 16) * (a.width // 16)
    return sd, dict(x=x, c_crossattn=context, y=pooled), f"Flux architecture, {a.width}x{a.height} ({tokens} + 512 tokens)"


HOOK = "optimized_attention_override"   # the attention hand-off's (nodes/heads_handoff.py)


def denoiser_call(model, inputs, heads_handoff=True):
    """One call of the model's denoiser at a fixed sigma, as a sampler step makes it."""
    sigma = torch.tensor([0.7], device=inputs["x"].device)
    kwargs = {k: v for k, v in inputs.items() if k != "x"}
    # What a sampler hands the model from its options (the attention hand-off's hook among them).
    kwargs["transformer_options"] = dict(model.model_options.get("transformer_options", {}))
    if not heads_handoff:
        kwargs["transformer_options"].pop(HOOK, None)
    return lambda: model.model.apply_model(inputs["x"], sigma, **kwargs)


def step_time(model, inputs, reps):
    """Median seconds of one denoiser call (what one sampling step costs), and its output."""
    import comfy.model_management as mm
    mm.load_models_gpu([model], force_full_load=True)
    denoise = denoiser_call(model, inputs)
    times = []
    with torch.inference_mode():
        for i in range(reps + 2):  # two warm-ups: Triton autotuning and cuBLAS heuristics
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = denoise()
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out.float()


def quant_linears(model):
    """The model's quantized linears, as ComfyUI runs them (its object patches applied by the load)."""
    return [m for m in model.model.diffusion_model.modules() if getattr(m, "quant_scheme", None) is not None]


def use_backend(model, backend):
    """Every quantized linear of the loaded model runs `backend`'s kernels from now on. Each keeps
    its choice per backend, so taking turns does not add the choice's host time to every step."""
    for m in quant_linears(model):
        m.quant_backend_pref = backend
        m._kernels = m.__dict__.setdefault("_kernels_per_backend", {}).setdefault(backend, {})


def alternating_step_times(model, inputs, reps, turns):
    """turn -> (median seconds of one denoiser call, GPU kernel ms), the turns taking turns at every
    step on the same loaded model. A turn is a backend, optionally `:no-heads-handoff` (the step
    without the attention hand-off's hook)."""
    import comfy.model_management as mm
    mm.load_models_gpu([model], force_full_load=True)
    calls = {t: denoiser_call(model, inputs, heads_handoff=not t.endswith(":no-heads-handoff")) for t in turns}
    times = {t: [] for t in turns}
    with torch.inference_mode():
        for i in range(reps + 2):  # two warm-up rounds
            for t in turns:
                use_backend(model, t.split(":")[0])
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                calls[t]()
                torch.cuda.synchronize()
                if i >= 2:
                    times[t].append(time.perf_counter() - t0)
    out = {}
    for t in turns:
        use_backend(model, t.split(":")[0])
        out[t] = (sorted(times[t])[len(times[t]) // 2],
                  gpu_kernels(model, inputs, not t.endswith(":no-heads-handoff"))[1] / 1000)
    return out


def gpu_kernels(model, inputs, heads_handoff=True):
    """The GPU kernels of one denoiser call (profiler events), the summed kernel time in us and the
    wall time in us. Kernel time does not depend on how fast the host launches them."""
    from torch.profiler import ProfilerActivity, profile
    denoise = denoiser_call(model, inputs, heads_handoff)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        denoise()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return kernels, sum(e.self_device_time_total for e in kernels), wall_us


def profile_step(model, inputs, top):
    """Prints the GPU kernels of one denoiser call by total time, and how busy the GPU was: a
    GPU idle for much of the wall time means the step waits on Python, not on kernels."""
    kernels, busy, wall_us = gpu_kernels(model, inputs)
    print(f"    profiled: wall {wall_us / 1000:.1f} ms, GPU kernels {busy / 1000:.1f} ms "
          f"({busy / wall_us:.0%} busy), {sum(e.count for e in kernels)} launches")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"    {e.self_device_time_total / 1000:8.2f} ms {e.count:5}x  {e.key[:110]}")
    # The host side: the Python functions the step spends its own time in.
    import cProfile
    import io
    import pstats
    host = cProfile.Profile()
    denoise = denoiser_call(model, inputs)
    with torch.inference_mode():
        host.enable()
        denoise()
        host.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(top)
    print("    host: " + "\n    ".join(ln for ln in text.getvalue().splitlines()[4:] if ln.strip()))


def linear_bytes(model):
    """Bytes of the transformer blocks' linear weights (+ scales), patched modules and the
    modulation linears (`img_mod.lin`, `modulation.lin`) included."""
    total = 0
    for name, m in model.model.diffusion_model.named_modules():
        m = model.object_patches.get(f"diffusion_model.{name}", m)
        if "blocks." not in name or not hasattr(m, "weight") or m.weight is None or m.weight.dim() != 2:
            continue
        total += m.weight.numel() * m.weight.element_size()
        for extra in ("weight_scale", "scale_weight"):
            s = getattr(m, extra, None)
            total += 0 if s is None else s.numel() * s.element_size()
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["wan14b", "wan1.3b", "flux"], default="wan14b")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=VARIANTS)
    p.add_argument("--alternate", nargs="*", default=[], metavar="BACKEND[:no-heads-handoff]",
                   help="also run each variant's model under these backends (with or without the attention "
                        "hand-off), taking turns at every step")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="also profile one step per variant and print its TOP kernels")
    a = p.parse_args()
    flux = a.model == "flux"
    a.height = a.height or (1024 if flux else 480)
    a.width = a.width or (1024 if flux else 832)
    nodes = boot()
    import comfy.model_management as mm
    import comfy.sd
    dev = mm.get_torch_device()
    sd, inputs, title = flux_inputs(dev, a) if flux else wan_inputs(a.model, dev, a)
    print(f"{title}, {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    bf16 = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.bfloat16})
    ref_t, ref_out = step_time(bf16, inputs, a.reps)
    ref_bytes = linear_bytes(bf16)
    if a.profile:
        profile_step(bf16, inputs, a.profile)
    rows = [("bf16", ref_t, gpu_kernels(bf16, inputs)[1], ref_bytes, 1.0, "-")]
    Quantize = nodes.NODE_CLASS_MAPPINGS["QuantDiTQuantizeModel"]
    for variant in a.variants:
        scheme, backend, *flags = variant.split(":")
        # The node defaults, and `:weight-only-few-rows` for 8-bit weight-only on the few-row layers and
        # modulation (the keep_small_m_layers switch).
        q, report = Quantize.execute(model=bf16, scheme=scheme, backend=backend, quantize_modulation=True,
                                     keep_small_m_layers="weight-only-few-rows" in flags).result
        if "no-gelu-handoff" in flags:  # the GELUs written out, as before the hand-off (nodes/gelu_handoff.py)
            for key in [k for k, v in q.object_patches.items() if type(v).__name__ == "DeferredGelu"]:
                del q.object_patches[key]
        if "no-heads-handoff" in flags:  # the attention output copied, as before nodes/heads_handoff.py
            q.model_options.get("transformer_options", {}).pop(HOOK, None)
        if "no-shared-quant" in flags:  # this variant's own quantized linears: q, k, v quantize x each
            for v in q.object_patches.values():
                if getattr(v, "quant_share", None) is not None:
                    v.quant_share = None
        if "no-fused-siblings" in flags:  # each sibling its own GEMM, as before nodes/fused_siblings.py
            for v in q.object_patches.values():
                if getattr(v, "quant_fused", None) is not None:
                    v.quant_fused = None
        qt, out = step_time(q, inputs, a.reps)
        kernel = [ln.split("kernel: ")[1].rstrip(")") for ln in report.splitlines() if "kernel: " in ln]
        rows.append((variant, qt, gpu_kernels(q, inputs)[1], linear_bytes(q), _cos(out, ref_out),
                     kernel[0] if kernel else "?"))
        print(f"  {variant}: {qt * 1000:.1f} ms", flush=True)
        if a.alternate:
            turns = alternating_step_times(q, inputs, a.reps, a.alternate)
            print(f"  {scheme} taking turns each step: " + ", ".join(
                f"{b} {t * 1000:.1f} ms ({gpu:.1f} ms GPU)" for b, (t, gpu) in turns.items()), flush=True)
        if a.profile:
            profile_step(q, inputs, a.profile)
        del q, out
    mm.unload_all_models()
    del bf16
    torch.cuda.empty_cache()
    fast = comfy.sd.load_diffusion_model_state_dict(
        sd, model_options={"dtype": torch.float8_e4m3fn, "fp8_optimizations": True})
    del sd
    ft, out = step_time(fast, inputs, a.reps)
    if a.profile:
        print("  comfy fp8_e4m3fn_fast:")
        profile_step(fast, inputs, a.profile)
    rows.insert(1, ("comfy fp8_e4m3fn_fast", ft, gpu_kernels(fast, inputs)[1], linear_bytes(fast), _cos(out, ref_out),
                    "ComfyUI"))
    # GPU ms: the summed kernel time of one call; it leaves out the host (a slow or busy CPU moves
    # the step time between runs, not this), so its ratios are what a GPU-bound machine sees.
    ref_gpu, fast_gpu = rows[0][2], rows[1][2]
    print(f"\n{'variant':24} {'step ms':>9} {'vs bf16':>8} {'vs comfy fp8 fast':>18} {'GPU ms':>8} {'vs bf16':>8} "
          f"{'vs fp8 fast':>12} {'block linears GiB':>18} {'mem vs bf16':>12} {'cos vs bf16':>12}  kernel")
    for name, tm, gpu, b, cs, kern in rows:
        print(f"{name:24} {tm * 1000:9.1f} {ref_t / tm:7.2f}x {ft / tm:17.2f}x {gpu / 1000:8.1f} {ref_gpu / gpu:7.2f}x "
              f"{fast_gpu / gpu:11.2f}x {b / 2**30:18.2f} {b / ref_bytes:11.2f}x {cs:12.5f}  {kern}")


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))


if __name__ == "__main__":
    main()
