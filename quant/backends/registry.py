"""Kernel providers: who can run which scheme on which device, and why not when they cannot.

A backend module registers itself with `register_backend`. Each reports `availability()`
(installed / importable / GPU capable) with a reason, and `supports(scheme, device)`.
`pick_backend` returns the best one for a scheme and device, or raises NoCapableBackendError
listing every backend's reason; `pick_kernels` adds the backend that `auto` hands large inputs,
where another provider's kernel overtakes the best-ranked one as the token count grows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..deferred import Deferred
from ..schemes import Scheme, get_scheme

log = logging.getLogger("quantdit")

# fn(x2d, qdata, scale, bias, scheme, in_features) -> y2d in x2d.dtype
LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Scheme, int], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int                                   # higher wins under "auto"
    availability: Callable[[], Optional[str]]       # None if usable, else why not
    supports: Callable[[Scheme, torch.device], Optional[str]]  # None if it runs, else why not
    linear: LinearFn
    install_hint: str = ""
    # scheme name -> its rank under "auto" where it differs from `priority` (a provider that is the
    # best for some schemes and not for others)
    scheme_priority: dict[str, int] = field(default_factory=dict, compare=False, hash=False)
    # schemes whose `linear` also takes a quant.deferred.Deferred activation (and quantizes it from
    # its sources in one pass); every other backend gets it computed first
    deferred_schemes: frozenset = frozenset()
    # fn(x2d, scheme) -> (q, scale): the backend's activation quantizer for the schemes that quantize
    # per token. Where given, `linear` also takes its output as a quant.shared_quant.QuantizedRows for
    # those schemes, so sibling linears reading one activation quantize it once (nodes/shared_quant.py).
    row_quantizer: Optional[Callable[[torch.Tensor, Scheme], tuple[torch.Tensor, torch.Tensor]]] = None
    # fn(scheme, device) -> the fewest tokens from which this backend's kernel for the scheme beats
    # every other provider's on that GPU, whatever their ranks; None where it does not. `auto` hands
    # such inputs to it (pick_kernels).
    large_inputs_from: Optional[Callable[[Scheme, torch.device], Optional[int]]] = None

    def rank(self, scheme: Scheme) -> int:
        return self.scheme_priority.get(scheme.name, self.priority)


class NoCapableBackendError(RuntimeError):
    def __init__(self, scheme: Scheme, device: torch.device, reasons: dict[str, str]):
        self.reasons = reasons
        lines = "; ".join(f"{n}: {r}" for n, r in reasons.items())
        super().__init__(f"no kernel backend can run {scheme.name} on {device}: {lines}")


class BackendUnavailableError(RuntimeError):
    pass


_BACKENDS: dict[str, Backend] = {}
_warned: set[tuple] = set()


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def list_backends() -> dict[str, Optional[str]]:
    """name -> None when available, else the reason it is not."""
    return {name: b.availability() for name, b in _BACKENDS.items()}


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise BackendUnavailableError(f"unknown kernel backend {name!r}; known: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


def why_not(name: str, scheme: Scheme, device: torch.device) -> Optional[str]:
    """None if backend `name` can run `scheme` on `device`, else the reason."""
    b = _BACKENDS.get(name)
    if b is None:
        return f"no backend called {name!r} is available in this version (known: {', '.join(_BACKENDS)})"
    return b.availability() or b.supports(scheme, device)


def backend_reasons(scheme: Scheme, device: torch.device) -> dict[str, str]:
    """Why each non-reference backend cannot run `scheme` on `device` (empty ones can)."""
    out = {}
    for name in _BACKENDS:
        if name != "reference":
            why = why_not(name, scheme, device)
            if why:
                out[name] = why
    return out


def pick_backend(scheme: Scheme, device: torch.device, preferred: Optional[str] = None,
                 strict: bool = False) -> Backend:
    """The best backend for (scheme, device). A `preferred` one (e.g. from an alias such as
    int8-vllm) is used when it can run; otherwise, unless `strict`, the fallback is logged once."""
    if preferred and preferred != "auto":
        b = _BACKENDS.get(preferred)
        why = why_not(preferred, scheme, device)
        if why is None:
            return b
        if strict:
            hint = f" {b.install_hint}" if b is not None and b.install_hint else ""
            raise BackendUnavailableError(f"kernel backend {preferred!r} cannot run {scheme.name} on "
                                          f"{device}: {why}.{hint}")
        key = (preferred, scheme.name, str(device))
        if key not in _warned:
            _warned.add(key)
            log.warning("QuantDiT: backend %r cannot run %s on %s (%s); using the best available one",
                        preferred, scheme.name, device, why)
    reasons: dict[str, str] = {}
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.rank(scheme)):
        why = b.availability() or b.supports(scheme, device)
        if why is None:
            return b
        reasons[b.name] = why
    raise NoCapableBackendError(scheme, device, reasons)


@dataclass(frozen=True)
class KernelChoice:
    """A layer's kernels: `backend` runs its inputs, `large` those of at least `large_from` tokens."""
    backend: Backend
    large: Optional[Backend] = None
    large_from: int = 0

    def for_rows(self, rows: int) -> Backend:
        return self.large if self.large is not None and rows >= self.large_from else self.backend

    def describe(self) -> str:
        if self.large is None:
            return self.backend.name
        return f"{self.backend.name}, {self.large.name} from {self.large_from} tokens"


def pick_kernels(scheme: Scheme, device: torch.device, preferred: Optional[str] = None,
                 strict: bool = False) -> KernelChoice:
    """`pick_backend`'s choice and, under `auto`, the provider that overtakes it on large inputs
    (the one claiming the fewest tokens, if several do). A backend the user named runs every input."""
    backend = pick_backend(scheme, device, preferred, strict)
    if preferred not in (None, "auto") and backend.name == preferred:
        return KernelChoice(backend)
    large, start = None, None
    for b in _BACKENDS.values():
        if b is backend or b.large_inputs_from is None or b.availability() or b.supports(scheme, device):
            continue
        rows = b.large_inputs_from(scheme, device)
        if rows is not None and (start is None or rows < start):
            large, start = b, rows
    return KernelChoice(backend) if large is None else KernelChoice(backend, large, start)


def cuda_missing() -> Optional[str]:
    return None if torch.cuda.is_available() else "CUDA is not available"


def capability_reason(scheme: Scheme, device: torch.device, cap: Optional[tuple[int, int]],
                      need: Optional[tuple[int, int]], provider: str) -> Optional[str]:
    """The common `supports` answer: None when a kernel needing compute capability `need` runs on a
    GPU of capability `cap` (None: not a CUDA device); need=None means the provider has no kernel."""
    if need is None:
        return f"no {provider} kernel for {scheme.name}"
    if cap is None:
        return f"runs on CUDA devices only (got {device})"
    if cap < need:
        return f"{scheme.name} needs compute capability {need[0]}.{need[1]}+, this GPU is {cap[0]}.{cap[1]}"
    return None


def cuda_capability(device: torch.device) -> Optional[tuple[int, int]]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def run_linear(x2d: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
               scheme: Scheme, in_features: int, backend: Backend) -> torch.Tensor:
    """The quantized linear of a layer. Eager calls go straight to the backend: the custom op's
    dispatch alone costs about as much host time as a bf16 linear. Under torch.compile the call
    goes through `quantized_linear`, so the compiler sees one opaque op."""
    if isinstance(x2d, Deferred) and scheme.name not in backend.deferred_schemes:
        x2d = x2d.materialize()
    if torch.compiler.is_compiling():
        return quantized_linear(x2d, qdata, scale, bias, scheme.name, in_features, backend.name)
    return backend.linear(x2d, qdata, scale, bias, scheme, in_features)


@torch.library.custom_op("quantdit::quantized_linear", mutates_args=())
def quantized_linear(x2d: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                     scheme: str, in_features: int, backend: str) -> torch.Tensor:
    """Backend `backend`'s kernel for a [tokens, in_features] input, as one opaque op: torch.compile
    traces around it instead of into Triton launchers or foreign libraries."""
    return _BACKENDS[backend].linear(x2d, qdata, scale, bias, get_scheme(scheme), in_features)


@quantized_linear.register_fake
def _quantized_linear_shape(x2d, qdata, scale, bias, scheme, in_features, backend):
    return x2d.new_empty((x2d.shape[0], qdata.shape[0]))
