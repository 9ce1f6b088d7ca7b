"""Host time of one quantized linear per backend: what a host-bound step pays per layer.

A DiT step at a small resolution (Flux at 512x512) launches its hundreds of linears faster than
Python can issue them, so the GPU waits on the host. This times the eager Python side of one
`run_linear` call (the activation quant + the GEMM launch), the GPU running behind: calls are
issued in loops of `--calls`, the clock stopping before the GPU is waited for; the contenders take
turns for `--repeats` rounds and each one's least time counts. A bf16
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


def host_us(contenders: dict, calls: int, repeats: int) -> dict:
    """The least host time per call of each contender over `repeats` rounds, one loop of `calls`
    each per round, taken in turn so that a busy spell of a shared host falls on all of them (noise
    only adds time). Each loop starts on an idle GPU and stays well inside CUDA's launch queue."""
    best = dict.fromkeys(contenders, float("inf"))
    for fn in contenders.values():
        for _ in range(20):
            fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], time.perf_counter() - start)
    torch.cuda.synchronize()
    return {name: 1e6 * t / calls for name, t in best.items()}


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
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}; host µs per call, least of {a.repeats} "
          f"rounds of {a.calls}-call eager loops")
    print(f"{'layer':18} {'tokens':>6} {'scheme':10} {'backend':8} {'host µs':>8} {'x bf16':>7}")
    for m in a.tokens:
        label, k, n = SHAPES.get(m, DEFAULT_SHAPE)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = (torch.randn(n, k, device=dev) / k ** 0.5)
        w16 = w.to(torch.bfloat16)
        contenders = {("bf16", "torch"): lambda: torch.nn.functional.linear(x, w16)}
        for scheme_name in a.schemes:
            scheme = get_scheme(scheme_name)
            q, s = reference.quantize_weight(w, scheme)
            for name in a.backends:
                backend = get_backend(name)
                why = backend.availability() or backend.supports(scheme, dev)
                if why:
                    print(f"{label:18} {m:6} {scheme_name:10} {name:8} unavailable: {why}")
                    continue
                contenders[(scheme_name, name)] = (
                    lambda q=q, s=s, scheme=scheme, backend=backend: run_linear(x, q, s, None, scheme, k, backend))
        times = host_us(contenders, a.calls, a.repeats)
        bf16 = times[("bf16", "torch")]
        for (scheme_name, name), us in times.items():
            print(f"{label:18} {m:6} {scheme_name:10} {name:8} {us:8.1f} {us / bf16:6.2f}x", flush=True)
        for (scheme_name, name), call in contenders.items():
            if a.profile and name == "triton":
                print(f"cProfile, {scheme_name} triton, {m} tokens")
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(a.calls):
                    call()
                prof.disable()
                torch.cuda.synchronize()
                pstats.Stats(prof).sort_stats("tottime").print_stats(a.profile)


if __name__ == "__main__":
    main()
