"""Launching Triton kernels from the hot path with little Python per call.

A DiT step calls its quantized linears hundreds of times. Triton's own launch path (the
autotuner's dictionaries and pre-hooks, argument specialization, environment lookups, stream
queries) costs tens of microseconds of host time per kernel, and on a slow host a step then
waits on Python while the GPU idles (measured in bench/bench_step.py --profile).

`Launcher` lets Triton launch a call the first time it meets the call's key, and keeps what
Triton chose: the compiled kernel and, for an autotuned kernel, the config. Later calls with the
same key go straight to the compiled kernel. The key holds every integer argument by value and
every tensor by dtype and 16-byte alignment, a superset of what Triton specializes on, so a
cached kernel is only reused where Triton would have picked that same kernel. Callers on the
hottest paths (`launch_keyed`, and the memos below) key a launch themselves with the few values
that decide it, which costs less than the generic key.
"""
from __future__ import annotations

import functools
import os

import torch
import triton.language as tl
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner

try:
    from triton import knobs  # Triton >= 3.4: where the launch hooks (profilers) are set
except ImportError:
    knobs = None

from . import interpreted

# Escape hatch (and for benchmarks): QUANTDIT_TRITON_DIRECT_LAUNCH=0 launches through Triton every time.
DIRECT = os.environ.get("QUANTDIT_TRITON_DIRECT_LAUNCH", "1") != "0"


def _descriptor_types():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # Triton < 3.4
        return None, ()
    types = [TensorDescriptor]
    try:
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
        types.append(GluonDescriptor)
    except Exception:  # a Triton without Gluon
        pass
    return TensorDescriptor, tuple(types)


# Triton's host-side TMA descriptor class (None before 3.4), and every descriptor class a launch may take
TENSOR_DESCRIPTOR, _DESCRIPTORS = _descriptor_types()


def tma_descriptor(t: torch.Tensor, block: tuple):
    """Triton's host TMA descriptor over a row-major 2-D tensor, whole, tiled in `block`."""
    return TENSOR_DESCRIPTOR(t, list(t.shape), [t.stride(0), 1], list(block))


def call_key(values) -> tuple:
    """What a launch is specialized on, and more (see the module docstring)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append((v.dtype, v.data_ptr() % 16 == 0))
        elif isinstance(v, _DESCRIPTORS):
            out.append((v.base.dtype, v.base.data_ptr() % 16 == 0, tuple(v.shape), tuple(v.strides)))
        else:
            out.append(v)
    return tuple(out)


class Launcher:
    """Calls `kernel` (a @triton.jit function, or one wrapped by triton.autotune) like
    `kernel[grid](*args, **kwargs)`, through the cached compiled kernel after the first call.
    A cached launch runs the chosen config's pre-hook itself (e.g. setting TMA block shapes), as
    the autotuner would."""

    def __init__(self, kernel):
        self.tuned = kernel if isinstance(kernel, Autotuner) else None
        self.fn = kernel.fn if self.tuned is not None else kernel
        self.names = list(self.fn.arg_names)
        self.cache: dict[tuple, tuple] = {}
        self.by_key: dict = {}   # launch_keyed's caller keys -> (compiled kernel, trailing arguments)

    def __call__(self, grid, *args, **kwargs):
        direct = DIRECT and not interpreted()
        named = dict(zip(self.names, args))
        named.update(kwargs)
        key = call_key(named.values()) if direct else None
        hit = self.cache.get(key) if direct else None
        if hit is None:
            kernel = (self.tuned if self.tuned is not None else self.fn)[grid](*args, **kwargs)
            if direct and kernel is not None:
                best = self.tuned.best_config if self.tuned is not None else None
                self.cache[key] = (kernel, best.all_kwargs() if best else {}, best.pre_hook if best else None)
            return
        kernel, config, pre_hook = hit
        named.update(config)
        if pre_hook is not None:
            pre_hook(named)
        g = grid(named) if callable(grid) else grid
        run_compiled(kernel, (g + (1, 1))[:3], [named[n] for n in self.names])  # the compiled kernel takes x, y, z

    def launch_keyed(self, key, grid: tuple, *args, **kwargs):
        """`self(grid, *args, **kwargs)` for a caller whose own cheap `key` fixes every keyword
        argument and everything Triton specializes the positional ones on (values of integers,
        dtypes and 16-byte alignment of tensors). A repeated key launches the compiled kernel
        straight away, with no per-call dictionaries. For kernels without config pre-hooks;
        `grid` is a tuple, and the positional arguments lead the kernel's signature."""
        hit = self.by_key.get(key) if DIRECT else None
        if hit is not None:
            kernel, tail = hit
            run_compiled(kernel, (grid + (1, 1))[:3], args + tail)
            return
        self(grid, *args, **kwargs)
        chosen = self.chosen(args, kwargs)
        if chosen is not None:
            kernel, config = chosen
            named = dict(zip(self.names, args), **kwargs, **config)
            self.by_key[key] = (kernel, tuple(named[n] for n in self.names[len(args):]))

    def chosen(self, args, kwargs):
        """(compiled kernel, config kwargs) that a launch with these arguments was cached under,
        or None (not launched yet, or launches are not cached)."""
        if not DIRECT or interpreted():
            return None
        named = dict(zip(self.names, args))
        named.update(kwargs)
        hit = self.cache.get(call_key(named.values()))
        return None if hit is None else hit[:2]


# Relaunch memos: a caller's own cheap key -> (compiled kernel, config, grid, *extra), for kernels
# whose every call would otherwise pay the Launcher's generic key and a config pre-hook that builds
# TMA descriptors (gluon_gemm, triton_gemm's persistent GEMM).

def relaunch(memo: dict, key):
    """What `remember` kept under key, or None (not launched yet, or launches are not cached)."""
    return memo.get(key) if DIRECT else None


def remember(memo: dict, key, launcher: Launcher, args, kwargs, grid, *extra):
    """After `launcher(grid, *args, **kwargs)`: keeps the kernel and config it chose under key."""
    chosen = launcher.chosen(args, kwargs)
    if chosen is not None:
        kernel, cfg = chosen
        memo[key] = (kernel, cfg, grid(cfg) + (1, 1), *extra)


def run_compiled(kernel, grid: tuple, args) -> None:
    """`kernel[grid](*args)` for a compiled kernel that has launched before (grid: 3 ints), on the
    current stream as Triton launches, without Triton's per-call closure. With a launch hook set
    (a profiler) the launch goes through Triton, which builds the metadata the hook reads."""
    if knobs is None or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
        kernel[grid](*args)
        return
    active = driver.active
    kernel.run(grid[0], grid[1], grid[2], active.get_current_stream(active.get_current_device()), kernel.function,
               kernel.packed_metadata, None, None, None, *args)


def _hooked(hook) -> bool:
    # A launch hook is a function or None up to Triton 3.5, and from 3.6 a chain of them (never None)
    return hook is not None and getattr(hook, "calls", True) != []


@functools.lru_cache(maxsize=None)
def _descriptor_template(make, dtype: torch.dtype, block: tuple):
    # Built (and checked by its constructor) once over a small CPU tensor that is never launched:
    # only its class and its fields other than the tensor's are copied.
    return make(torch.empty(block, dtype=dtype), block)


def descriptor(make, t: torch.Tensor, block: tuple):
    """`make(t, block)` (a host TMA descriptor of the 2-D tensor t, its whole shape, `block` tiles)
    copied from a template instead of constructed: the constructor's checks cost microseconds on
    every call. For callers that checked t themselves: 16-byte aligned base and row pitch, rows
    contiguous, no empty dimension."""
    template = _descriptor_template(make, t.dtype, block)
    out = object.__new__(type(template))
    out.__dict__.update(template.__dict__)
    out.base, out.shape, out.strides, out.block_shape = t, list(t.shape), [t.stride(0), 1], list(block)
    return out


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 (n >= 1) in one step: Triton 3.6 made its own a constexpr function,
    whose argument unwrapping costs microseconds on every launch."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (what persistent grids are sized by)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


# Programmatic dependent launch (Hopper and newer, a Triton with griddepcontrol): a kernel launched
# with it starts while the kernel before it still runs, and waits for that kernel's results itself.
GRID_DEPENDENCY_CONTROL = hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")


@functools.lru_cache(maxsize=None)
def _nvidia_hopper_or_newer(index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (9, 0)


def dependent_launch_ok(t: torch.Tensor) -> bool:
    """Kernels working on t may use programmatic dependent launch."""
    return GRID_DEPENDENCY_CONTROL and t.is_cuda and not interpreted() and _nvidia_hopper_or_newer(t.get_device())
