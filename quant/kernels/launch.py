"""Launching Triton kernels from the hot path with little Python per call.

A DiT step calls its quantized linears hundreds of times. Triton's own launch path (the
autotuner's dictionaries and pre-hooks, argument specialization, environment lookups, stream
queries) costs tens of microseconds of host time per kernel, and on a slow host a step then
waits on Python while the GPU idles (measured in bench/bench_step.py --profile).

`Launcher` lets Triton launch a call the first time it meets the call's key, and keeps what
Triton chose: the compiled kernel and, for an autotuned kernel, the config. Later calls with the
same key go straight to the compiled kernel. The key holds every integer argument by value and
every tensor by dtype and 16-byte alignment, a superset of what Triton specializes on, so a
cached kernel is only reused where Triton would have picked that same kernel.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch
from triton.runtime.autotuner import Autotuner

from . import interpreted

log = logging.getLogger("quantdit")

# Escape hatch (and for benchmarks): QUANTDIT_TRITON_DIRECT_LAUNCH=0 launches through Triton every time.
DIRECT = os.environ.get("QUANTDIT_TRITON_DIRECT_LAUNCH", "1") != "0"


def _descriptor_type():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
        return TensorDescriptor
    except ImportError:  # Triton < 3.4
        return None


_DESCRIPTOR = _descriptor_type()


def call_key(values) -> tuple:
    """What a launch is specialized on, and more (see the module docstring)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append((v.dtype, v.data_ptr() % 16 == 0))
        elif _DESCRIPTOR is not None and isinstance(v, _DESCRIPTOR):
            out.append((v.base.dtype, v.base.data_ptr() % 16 == 0, tuple(v.shape), tuple(v.strides)))
        else:
            out.append(v)
    return tuple(out)


class Launcher:
    """Calls `kernel` (a @triton.jit function, or one wrapped by triton.autotune) like
    `kernel[grid](*args, **kwargs)`, through the cached compiled kernel after the first call.

    `prepare(named)` runs before each cached launch with the arguments and the config's values
    by name, for what an autotune config's pre-hook would do (e.g. set TMA block shapes)."""

    def __init__(self, kernel, prepare: Optional[Callable[[dict], None]] = None):
        self.tuned = kernel if isinstance(kernel, Autotuner) else None
        self.fn = kernel.fn if self.tuned is not None else kernel
        self.names = list(self.fn.arg_names)
        self.prepare = prepare
        self.cache: dict[tuple, tuple] = {}

    def __call__(self, grid, *args, **kwargs):
        direct = DIRECT and not interpreted()
        named = dict(zip(self.names, args))
        named.update(kwargs)
        key = call_key(named.values()) if direct else None
        hit = self.cache.get(key) if direct else None
        if hit is None:
            kernel = (self.tuned if self.tuned is not None else self.fn)[grid](*args, **kwargs)
            if direct and kernel is not None:
                config = self.tuned.best_config.all_kwargs() if self.tuned is not None else {}
                self.cache[key] = (kernel, config)
            return
        kernel, config = hit
        named.update(config)
        if self.prepare is not None:
            self.prepare(named)
        g = grid(named) if callable(grid) else grid
        kernel[(g + (1, 1))[:3]](*[named[n] for n in self.names])  # the compiled kernel takes x, y, z
