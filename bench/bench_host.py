"""Host time of one quantized linear per backend: what a host-bound step pays per layer.

A DiT step at a small resolution (Flux at 512x512) launches its hundreds of linears faster than
Python can issue them, so the GPU waits on the host. This times the eager Python side of one
`run_linear` call (the activation quant + the GEMM launch), the GPU running behind: calls are
issued in loops of `--calls`, the clock stopping before the GPU is waited for, and the least time
of `--repeats` loops counts. A bf16
`F.linear` on the same shape is the baseline.

    python bench/bench_host.py [--tokens 1 1024] [--schemes int8-w8a8 fp8-w8a8] [--profile 20]

`--profile N` also prints the N functions with the most own time (cProfile) of the Triton path.
Needs a CUDA GPU; vLLM's kernels are used when QUANTDIT_VLLM_LIB points to its library.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quant import reference  # noqa: E402
from quant.backends import get_backend, run_linear  # noqa: E402
from quant.schemes import get_scheme  # noqa: E402

# (label, K in, N out): Flux's single-block modulation and its image qkv
SHAPES = {1: ("flux single mod", 3072, 9216), 16: ("16 rows", 3072, 9216)}
DEFAULT_SHAPE = ("flux img qkv", 3072, 9216)


def host_us(fn, calls: int, repeats: int) -> float:
    """The least host time per call over `repeats` loops of `calls` (noise on a shared host only
    adds time); each loop starts on an idle GPU and stays well inside CUDA's launch queue."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
    torch.cuda.synchronize()
    return 1e6 * best / calls


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 1024])
    p.add_argument("--schemes", nargs="+", default=["int8-w8a8", "fp8-w8a8"])
    p.add_argument("--backends", nargs="+", default=["triton", "vllm"])
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--profile", type=int, default=0, metavar="N")
    a = p.parse_args()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}; host µs per call, least of {a.repeats} eager loops of {a.calls}")
    print(f"{'layer':18} {'tokens':>6} {'scheme':10} {'backend':8} {'host µs':>8} {'x bf16':>7}")
    for m in a.tokens:
        label, k, n = SHAPES.get(m, DEFAULT_SHAPE)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = (torch.randn(n, k, device=dev) / k ** 0.5)
        w16 = w.to(torch.bfloat16)
        bf16 = host_us(lambda: torch.nn.functional.linear(x, w16), a.calls, a.repeats)
        print(f"{label:18} {m:6} {'bf16':10} {'torch':8} {bf16:8.1f} {1.0:6.2f}x")
        for scheme_name in a.schemes:
            scheme = get_scheme(scheme_name)
            q, s = reference.quantize_weight(w, scheme)
            for name in a.backends:
                backend = get_backend(name)
                why = backend.availability() or backend.supports(scheme, dev)
                if why:
                    print(f"{label:18} {m:6} {scheme_name:10} {name:8} unavailable: {why}")
                    continue
                call = lambda: run_linear(x, q, s, None, scheme, k, backend)  # noqa: E731
                us = host_us(call, a.calls, a.repeats)
                print(f"{label:18} {m:6} {scheme_name:10} {name:8} {us:8.1f} {us / bf16:6.2f}x", flush=True)
                if a.profile and name == "triton":
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(a.calls):
                        call()
                    prof.disable()
                    torch.cuda.synchronize()
                    pstats.Stats(prof).sort_stats("tottime").print_stats(a.profile)


if __name__ == "__main__":
    main()
