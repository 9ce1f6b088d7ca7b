"""Quantized linears at DiT shapes against bf16, every backend available here, side by side in one run.

Each quantized time includes the dynamic activation quantization (what a layer costs in a real
step). Prints ms, the speed ratio to bf16 `x @ w.t()`, and the cosine similarity of the output to
the bf16 output (the quality target is >= 0.999 for 8-bit W8A8).

Timing (`--timing`):
- `graph` (default): GPU time. The calls are captured in a CUDA graph that cycles through enough
  copies of the weights and inputs to overflow the L2 cache, so no call finds its weight cached
  (in a real step every layer's weight comes from memory). Python launch overhead is left out:
  in a DiT step the GPU runs far behind the CPU, so it is hidden there.
- `eager`: triton.testing.do_bench (L2 flushed, launches from Python). At small shapes this
  measures the launch overhead of Python as much as the kernels.

    python bench/bench_gemm.py [--models wan14b flux few-rows comfyui-text qwen-image] [--schemes fp8-w8a8 ...]
                               [--timing graph|eager]
                               [--tokens 1024 2048 ...] [--variants triton vllm ...]

`--tokens` runs the chosen models' layers at these token counts instead of their own (to find where
one provider overtakes another, see `auto`'s routing in quant/backends/registry.py); `--variants`
keeps only the named rows (backends, or variants such as triton-no-pingpong).

Needs a CUDA GPU. vLLM's kernels are used when QUANTDIT_VLLM_LIB points to its library.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quant import reference  # noqa: E402
from quant.backends import get_backend, list_backends, pick_kernels, why_not  # noqa: E402
from quant.deferred import consumes_deferred  # noqa: E402
from quant.schemes import get_scheme  # noqa: E402
from quant.shared_quant import QuantizedRows  # noqa: E402

# (label, M tokens, K in, N out). Wan 2.1 14B at 832x480x81 = 32760 video tokens; Flux at
# 1024x1024 = 4096 image tokens (+512 text tokens in the double blocks, 4608 in the single ones).
SHAPES = {
    "wan14b": [("self/cross attn q,k,v,o", 32760, 5120, 5120), ("ffn.0", 32760, 5120, 13824),
               ("ffn.2", 32760, 13824, 5120)],
    "wan1.3b": [("attn q,k,v,o", 32760, 1536, 1536), ("ffn.0", 32760, 1536, 8960), ("ffn.2", 32760, 8960, 1536)],
    "flux": [("img qkv", 4096, 3072, 9216), ("img proj", 4096, 3072, 3072), ("img mlp.0", 4096, 3072, 12288),
             ("img mlp.2", 4096, 12288, 3072), ("txt qkv", 512, 3072, 9216), ("txt mlp.0", 512, 3072, 12288),
             ("single linear1", 4608, 3072, 21504), ("single linear2", 4608, 15360, 3072)],
    # Few-row layers: modulation (one row per sample, x2 for cond/uncond), Wan cross-attn k/v on 512
    # context tokens, Flux text-stream linears (weight-only under W8A8 with keep_small_m_layers).
    "few-rows": [("flux img_mod (M=1)", 1, 3072, 18432), ("flux img_mod (M=2)", 2, 3072, 18432),
                 ("flux single mod (M=1)", 1, 3072, 9216), ("flux single mod (M=2)", 2, 3072, 9216),
                 ("wan time_projection (M=2)", 2, 5120, 30720), ("16 rows", 16, 3072, 18432),
                 ("wan ctx k/v (M=512)", 512, 5120, 5120), ("flux txt qkv (M=512)", 512, 3072, 9216),
                 ("flux txt mlp.2 (M=512)", 512, 12288, 3072)],
    # The text/context layers at the rows ComfyUI gives them: its Flux T5 prompt is padded to 256
    # tokens (not the 512 of the reference code); Wan's umT5 context to 512, which sampling with CFG
    # batches as cond + uncond.
    "comfyui-text": [("flux txt qkv (M=256)", 256, 3072, 9216), ("flux txt proj (M=256)", 256, 3072, 3072),
                     ("flux txt mlp.0 (M=256)", 256, 3072, 12288), ("flux txt mlp.2 (M=256)", 256, 12288, 3072),
                     ("wan ctx k/v, CFG batch (M=1024)", 1024, 5120, 5120), ("wan ctx k/v (M=512)", 512, 5120, 5120)],
    # Qwen-Image at 1024x1024: its joint attention's image and text projections, three on one input
    # each (a prompt of about 256 tokens).
    "qwen-image": [("img q,k,v (to_q, to_k, to_v)", 4096, 3072, 3072),
                   ("txt q,k,v (add_q/k/v_proj, M=256)", 256, 3072, 3072)],
}
SCHEMES = ["fp8-w8a8", "int8-w8a8", "fp8-block128", "int4-g128", "fp8-weight-only", "int8-weight-only"]
BACKENDS = [b for b in sorted(list_backends(), key=lambda b: -get_backend(b).priority) if b != "reference"]


L2_OVERFLOW_BYTES = 160 << 20


def eager_ms(fn, inputs):
    from triton.testing import do_bench
    return do_bench(lambda: fn(*inputs[0]), warmup=5, rep=100, return_mode="median")


def graph_ms(fn, inputs, reps=10):
    """Median ms per call of `fn` replayed from a CUDA graph, cycling through `inputs`."""
    for args in inputs:  # compile / autotune outside the capture
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for args in inputs:
                fn(*args)
    calls = reps * len(inputs)
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def copies_needed(*tensors) -> int:
    size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return max(2, min(16, -(-L2_OVERFLOW_BYTES // max(size, 1))))


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), 0))


def own_fp8_gemm(x, qdata, scale, bias, scheme, k):
    """The Triton fp8 GEMM (instead of cuBLASLt's _scaled_mm), to compare the two fp8 GEMMs."""
    from quant.kernels import triton_gemm, triton_quant
    xq, xs = triton_quant.per_token_quant(x, torch.float8_e4m3fn)
    return triton_gemm.w8a8_gemm(xq, xs, qdata, scale, bias, x.dtype)


def quant_only_rows(x, dev, timer):
    """The activation quant alone: ours (Triton) and vLLM's where present."""
    from quant.backends import vllm_backend
    from quant.kernels import triton_quant
    out = []
    for dtype in (torch.int8, torch.float8_e4m3fn):
        out.append((f"triton quant {str(dtype)[6:]}", timer(lambda t: triton_quant.per_token_quant(t, dtype), [(x,)])))
        if why_not("vllm", get_scheme("int8-w8a8"), dev) is None:
            out.append((f"vllm quant {str(dtype)[6:]}", timer(lambda t: vllm_backend._per_token(t, dtype), [(x,)])))
    return out


def with_flag(fn, name, value, module="triton_gemm"):
    """The same backend with one of the GEMM kernels' switches set (e.g. no persistent kernel)."""
    import importlib
    kernels = importlib.import_module(f"quant.kernels.{module}")

    def run(*args):
        old = getattr(kernels, name)
        setattr(kernels, name, value)
        try:
            return fn(*args)
        finally:
            setattr(kernels, name, old)
    return run


# Layers whose label names siblings reading one input, and how many share its quant (nodes/shared_quant.py):
# Wan's self-attention q, k, v; its cross-attention k, v on the text context; Qwen-Image's trios.
SHARED_INPUT_LAYERS = {"q,k,v": 3, "k/v": 2}
# Those that nodes/fused_siblings.py also runs as one GEMM (not Wan's self-attention, see there).
ONE_GEMM_LABELS = ("wan ctx k/v", "img q,k,v (to_q", "txt q,k,v (add_")


def sharing_one_quant(backend, layers):
    """`layers` sibling linears reading one input: one activation quant, then their GEMMs, each with
    a weight of its own (none finds another's in the L2 cache). Timed as a group; main() reports
    the group's time divided by `layers`, per layer."""
    b = get_backend(backend)
    siblings = {}  # weight -> the other siblings' weights, made on the first (uncaptured) call

    def run(x, qdata, scale, bias, scheme, k):
        key = qdata.data_ptr()
        if key not in siblings:
            siblings[key] = [(qdata.clone(), scale) for _ in range(layers - 1)]
        rows = QuantizedRows(*b.row_quantizer(x, scheme), x.dtype)
        return [b.linear(rows, w, s, bias, scheme, k) for w, s in [(qdata, scale)] + siblings[key]][0]
    run.layers = layers
    return run


def one_gemm_for(backend, layers):
    """`layers` sibling linears reading one input as one GEMM over their stacked weights, as
    nodes/fused_siblings.py runs them: one quant, one GEMM `layers` times as wide. main() reports
    its time divided by `layers`, per layer, against one bf16 layer (ComfyUI runs them one by one)."""
    b = get_backend(backend)
    stacks = {}  # weight -> (stacked weight, scales, bias), made on the first (uncaptured) call

    def run(x, qdata, scale, bias, scheme, k):
        key = qdata.data_ptr()
        if key not in stacks:
            raw = qdata.view(torch.uint8)  # roll and cat by bytes: not every op takes float8
            stacked = torch.cat([raw.roll(i, 0) for i in range(layers)]).view(qdata.dtype)
            stacks[key] = (stacked, torch.cat([scale] * layers), None if bias is None else torch.cat([bias] * layers))
        return b.linear(x, *stacks[key], scheme, k)[:, :qdata.shape[0]]
    run.layers = layers
    return run


def variants_for(scheme, dev, label):
    out = [(b, get_backend(b).linear) for b in BACKENDS if why_not(b, scheme, dev) is None]
    layers = next((n for name, n in SHARED_INPUT_LAYERS.items() if name in label), 0)
    if layers and consumes_deferred(scheme):  # the per-token W8A8 schemes, the ones nodes/shared_quant.py shares
        singles = list(out)
        out += [(f"{b}-{layers}-share-quant", sharing_one_quant(b, layers)) for b, _ in singles
                if get_backend(b).row_quantizer is not None]
        if any(name in label for name in ONE_GEMM_LABELS):
            out += [(f"{b}-one-gemm-for-{layers}", one_gemm_for(b, layers)) for b, _ in singles]
    if why_not("triton", scheme, dev) is None:
        if scheme.name == "fp8-w8a8":
            out.append(("triton-own-gemm", own_fp8_gemm))
        if scheme.name in ("fp8-w8a8", "int8-w8a8"):
            gemm = own_fp8_gemm if scheme.name == "fp8-w8a8" else get_backend("triton").linear
            out.append(("triton-not-persistent", with_flag(gemm, "PERSISTENT", False)))
            out.append(("triton-no-few-rows-kernel", with_flag(gemm, "USE_KERNEL", False, "few_rows_gemm")))
        if scheme.name == "int8-w8a8":
            out.append(("triton-no-pingpong", with_flag(gemm, "USE_PINGPONG", False, "gluon_gemm")))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="*", default=["wan14b", "flux", "few-rows"])
    p.add_argument("--schemes", nargs="*", default=SCHEMES)
    p.add_argument("--timing", choices=("graph", "eager"), default="graph")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--tokens", nargs="*", type=int, default=None,
                   help="run every chosen layer at these token counts instead of its own")
    p.add_argument("--variants", nargs="*", default=None, help="only these backends / variants")
    a = p.parse_args()
    dev = torch.device("cuda")
    timer = graph_ms if a.timing == "graph" else eager_ms
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, timing: {a.timing}")
    for name, why in list_backends().items():
        print(f"  backend {name:14} {'available' if why is None else 'unavailable: ' + why}")
    rows = []
    for model in a.models:
        shapes = SHAPES[model] if a.tokens is None else [
            (f"{label} @{m}", m, k, n) for label, _, k, n in SHAPES[model] for m in a.tokens]
        for label, m, k, n in shapes:
            torch.manual_seed(0)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
            bias = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.02
            copies = copies_needed(x, w) if a.timing == "graph" else 1
            xs = [x] + [torch.randn_like(x) for _ in range(copies - 1)]
            ref = torch.nn.functional.linear(x, w, bias)
            ws = [w] + [w.roll(i, 0) for i in range(1, copies)]  # same values, other addresses
            t_bf16 = timer(lambda xi, wi: torch.nn.functional.linear(xi, wi, bias), list(zip(xs, ws)))
            print(f"\n{model} {label}: M={m} K={k} N={n}  bf16 {t_bf16:.4f} ms "
                  f"({2 * m * k * n / t_bf16 / 1e9:.0f} TFLOP/s)", flush=True)
            for what, t in quant_only_rows(x, dev, timer):
                print(f"  {what:30} {t:8.4f} ms")
            del ws
            for scheme_name in a.schemes:
                scheme = get_scheme(scheme_name)
                qdata, scale = reference.quantize_weight(w.float(), scheme)
                qs = [(qdata, scale)] + [(qdata.clone(), scale.clone()) for _ in range(copies - 1)]
                auto = pick_kernels(scheme, dev).for_rows(m).name
                for backend, fn in variants_for(scheme, dev, label):
                    if a.variants is not None and backend not in a.variants:
                        continue
                    try:
                        y = fn(x, qdata, scale, bias, scheme, k)
                        t = timer(lambda xi, qi, si: fn(xi, qi, si, bias, scheme, k),
                                  [(xi, *q) for xi, q in zip(xs, qs)]) / getattr(fn, "layers", 1)
                    except Exception as e:  # one provider failing (e.g. under graph capture) is a row, not the end
                        print(f"  {scheme_name:16} {backend:22}  failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}", flush=True)
                        continue
                    row = dict(model=model, layer=label, m=m, k=k, n=n, scheme=scheme_name, backend=backend,
                               auto=backend == auto, ms=t, bf16_ms=t_bf16, speedup=t_bf16 / t, cos=cos(y, ref),
                               tflops=2 * m * k * n / t / 1e9, timing=a.timing)
                    rows.append(row)
                    print(f"  {scheme_name:16} {backend:22}{'*' if row['auto'] else ' '} {t:8.4f} ms "
                          f"{row['speedup']:5.2f}x  {row['tflops']:6.0f} TFLOP/s  cos {row['cos']:.5f}", flush=True)
                del qs
    print("\n* = the backend 'auto' picks. Speed-up = bf16 ms / quantized ms, activation quant included "
          "(-N-share-quant: N sibling layers quantize their common input once; -one-gemm-for-N: N sibling "
          "layers run as one GEMM over their stacked weights; both per layer).")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
