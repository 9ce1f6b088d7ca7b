"""Quantized linears at DiT shapes against bf16, every backend available here, side by side in one run.

Each quantized time includes the dynamic activation quantization (what a layer costs in a real
step). Prints ms, the speed ratio to bf16 `x @ w.t()`, and the cosine similarity of the output to
the bf16 output (the quality target is >= 0.999 for 8-bit W8A8).

    python bench/bench_gemm.py [--models wan14b flux] [--schemes fp8-w8a8 int8-w8a8 ...] [--out FILE]

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
from quant.backends import get_backend, list_backends, pick_backend, why_not  # noqa: E402
from quant.schemes import get_scheme  # noqa: E402

# (label, M tokens, K in, N out). Wan 2.1 14B at 832x480x81 = 32760 video tokens; Flux at
# 1024x1024 = 4096 image tokens (+512 text tokens in the double blocks, 4608 in the single ones).
SHAPES = {
    "wan14b": [("self/cross attn q,k,v,o", 32760, 5120, 5120), ("ffn.0", 32760, 5120, 13824),
               ("ffn.2", 32760, 13824, 5120)],
    "wan1.3b": [("attn q,k,v,o", 32760, 1536, 1536), ("ffn.0", 32760, 1536, 8960), ("ffn.2", 32760, 8960, 1536)],
    "flux": [("img qkv", 4096, 3072, 9216), ("img proj", 4096, 3072, 3072), ("img mlp.0", 4096, 3072, 12288),
             ("img mlp.2", 4096, 12288, 3072), ("txt qkv", 512, 3072, 9216), ("txt mlp.0", 512, 3072, 12288),
             ("single linear1", 4608, 3072, 21504), ("single linear2", 4608, 15360, 3072)],
}
SCHEMES = ["fp8-w8a8", "int8-w8a8", "fp8-block128", "int4-g128"]
BACKENDS = [b for b in sorted(list_backends(), key=lambda b: -get_backend(b).priority) if b != "reference"]


def bench_ms(fn, reps=20):
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=reps * 5, return_mode="median")


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), 0))


def own_fp8_gemm(x, qdata, scale, bias, scheme, k):
    """The Triton fp8 GEMM (instead of cuBLASLt's _scaled_mm), to compare the two fp8 GEMMs."""
    from quant.kernels import triton_gemm, triton_quant
    xq, xs = triton_quant.per_token_quant(x, torch.float8_e4m3fn)
    return triton_gemm.w8a8_gemm(xq, xs, qdata, scale, bias, x.dtype)


def quant_only_rows(x, dev):
    """The activation quant alone: ours (Triton) and vLLM's where present."""
    from quant.backends import vllm_backend
    from quant.kernels import triton_quant
    out = []
    for dtype in (torch.int8, torch.float8_e4m3fn):
        out.append((f"triton quant {str(dtype)[6:]}", bench_ms(lambda: triton_quant.per_token_quant(x, dtype))))
        if why_not("vllm", get_scheme("int8-w8a8"), dev) is None:
            out.append((f"vllm quant {str(dtype)[6:]}", bench_ms(lambda: vllm_backend._per_token(x, dtype))))
    return out


def no_tma(fn):
    """The same backend with the Triton GEMM's pre-Hopper (non-TMA) tile loads."""
    from quant.kernels import triton_gemm

    def run(*args):
        triton_gemm.USE_TMA = False
        try:
            return fn(*args)
        finally:
            triton_gemm.USE_TMA = True
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="*", default=["wan14b", "flux"])
    p.add_argument("--schemes", nargs="*", default=SCHEMES)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, why in list_backends().items():
        print(f"  backend {name:14} {'available' if why is None else 'unavailable: ' + why}")
    rows = []
    for model in a.models:
        for label, m, k, n in SHAPES[model]:
            torch.manual_seed(0)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
            bias = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.02
            ref = torch.nn.functional.linear(x, w, bias)
            t_bf16 = bench_ms(lambda: torch.nn.functional.linear(x, w, bias))
            print(f"\n{model} {label}: M={m} K={k} N={n}  bf16 {t_bf16:.3f} ms "
                  f"({2 * m * k * n / t_bf16 / 1e9:.0f} TFLOP/s)")
            for what, t in quant_only_rows(x, dev):
                print(f"  {what:30} {t:8.3f} ms")
            for scheme_name in a.schemes:
                scheme = get_scheme(scheme_name)
                qdata, scale = reference.quantize_weight(w.float(), scheme)
                auto = pick_backend(scheme, dev).name
                variants = [(b, get_backend(b).linear) for b in BACKENDS if why_not(b, scheme, dev) is None]
                if scheme_name == "fp8-w8a8" and why_not("triton", scheme, dev) is None:
                    variants.append(("triton-own-gemm", own_fp8_gemm))
                if scheme_name == "int8-w8a8" and why_not("triton", scheme, dev) is None:
                    variants.append(("triton-no-tma", no_tma(get_backend("triton").linear)))
                for backend, fn in variants:
                    y = fn(x, qdata, scale, bias, scheme, k)
                    t = bench_ms(lambda: fn(x, qdata, scale, bias, scheme, k))
                    row = dict(model=model, layer=label, m=m, k=k, n=n, scheme=scheme_name, backend=backend,
                               auto=backend == auto, ms=t, bf16_ms=t_bf16, speedup=t_bf16 / t, cos=cos(y, ref),
                               tflops=2 * m * k * n / t / 1e9)
                    rows.append(row)
                    print(f"  {scheme_name:13} {backend:16}{'*' if row['auto'] else ' '} {t:8.3f} ms "
                          f"{row['speedup']:5.2f}x  {row['tflops']:6.0f} TFLOP/s  cos {row['cos']:.5f}")
    print("\n* = the backend 'auto' picks. Speed-up = bf16 ms / quantized ms, activation quant included.")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
