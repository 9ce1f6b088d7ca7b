"""What the hand-off benchmarks (bench_gelu_handoff.py, bench_heads_handoff.py) share: their options,
the backends that run a scheme, and one side-by-side line of the plain and the handed-off path."""
from __future__ import annotations

import argparse

import torch

from bench_gemm import graph_ms
from quant.backends import get_backend, why_not


def options(more=None):
    """The parsed --schemes / --backends (and what `more(parser)` adds), after printing the run's
    header line."""
    p = argparse.ArgumentParser()
    p.add_argument("--schemes", nargs="*", default=["int8-w8a8", "fp8-w8a8"])
    p.add_argument("--backends", nargs="*", default=["triton", "vllm"])
    if more is not None:
        more(p)
    a = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, timing: graph")
    return a


def usable_linears(scheme_name: str, scheme, backends, dev):
    """(backend, its linear) for each of `backends` that runs the scheme on dev; prints why not for the rest."""
    for backend in backends:
        why = why_not(backend, scheme, dev)
        if why is not None:
            print(f"  {scheme_name} {backend}: unavailable ({why})")
            continue
        yield backend, get_backend(backend).linear


def _outputs(y):
    return y if isinstance(y, (list, tuple)) else [y]


def compare(title: str, plain, handed_off, args, t_bf16: float, labels: tuple[str, str]):
    """Graph-times `plain` and `handed_off` over args (one output or a list) and prints both against
    bf16's t_bf16 (ms), what the hand-off saves, and whether the first call's outputs are bit-equal."""
    same = all(torch.equal(x, y) for x, y in zip(_outputs(plain(*args[0])), _outputs(handed_off(*args[0]))))
    t_u = graph_ms(plain, args)
    t_h = graph_ms(handed_off, args)
    print(f"  {title} {labels[0]} {t_u * 1000:8.1f} us {t_bf16 / t_u:5.2f}x | {labels[1]} {t_h * 1000:8.1f} us "
          f"{t_bf16 / t_h:5.2f}x | saves {(t_u - t_h) * 1000:6.1f} us | bit-equal {same}", flush=True)
