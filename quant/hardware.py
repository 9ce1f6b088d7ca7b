"""What this machine can run, and which scheme to pick for each model part.

`probe` gathers the facts (GPU, compute capability, memory, the kernel `auto` picks for each
scheme, the providers that cannot load and why); `suggest` turns facts into advice and is a pure
function, so it is tested with made-up machines. The reasons quote what was measured on the GPU
machine (README, "Measured on the GPU machine").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .backends import BackendUnavailableError, NoCapableBackendError, list_backends, pick_backend, pick_kernels
from .backends.registry import cuda_capability
from .schemes import get_scheme

# Providers whose fused W8A8 kernels were measured faster than bf16 at DiT shapes. torch's own
# int8 path (unfused dequant) and its fp8 one (unvectorized quant) were not, and the reference
# backend only emulates.
FAST_W8A8 = ("vllm", "sgl-kernel", "triton")
PROBED_SCHEMES = ("int8-w8a8", "fp8-w8a8", "fp8-block128", "int8-weight-only", "fp8-weight-only", "int4-g128")
FP8_TENSOR_CORES = (8, 9)


def fused_w8a8_kernel(scheme: str, device: torch.device, preferred: Optional[str] = None) -> Optional[str]:
    """The fused provider that runs `scheme` (a W8A8 one) at `device`: `preferred` if it can, else
    under `auto` the best one. None where that is not one of FAST_W8A8 (the CPU, a GPU without the
    tensor cores, no Triton) or the preferred provider cannot run it here."""
    try:
        name = pick_backend(get_scheme(scheme), device, preferred, strict=True).name
    except (NoCapableBackendError, BackendUnavailableError):
        return None
    return name if name in FAST_W8A8 else None


@dataclass(frozen=True)
class MachineFacts:
    device: str                                  # "cuda:0", "cpu"
    name: str                                    # the GPU's name, or "CPU"
    capability: Optional[tuple[int, int]]        # CUDA compute capability; None off CUDA
    memory_gib: Optional[float]                  # total GPU memory
    kernels: dict                                # scheme -> the backend `auto` picks ("" where none can)
    unavailable: dict                            # provider -> why it cannot load here
    # scheme -> the route where `auto` hands large inputs to another provider ("vllm, triton from 8192 tokens")
    routes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Suggestion:
    part: str       # "diffusion model", "text / vision encoders"
    scheme: str     # a name the Quantize nodes take
    why: str


def probe(device: torch.device) -> MachineFacts:
    cap = cuda_capability(device)
    name, memory = "CPU", None
    if cap is not None:
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory / 1024 ** 3
    kernels, routes = {}, {}
    for scheme in PROBED_SCHEMES:
        try:
            choice = pick_kernels(get_scheme(scheme), device)
        except NoCapableBackendError:
            kernels[scheme] = ""
            continue
        kernels[scheme] = choice.backend.name
        if choice.large is not None:
            routes[scheme] = choice.describe()
    unavailable = {n: why for n, why in list_backends().items() if why}
    return MachineFacts(str(device), name, cap, memory, kernels, unavailable, routes)


def _fast(facts: MachineFacts, scheme: str) -> Optional[str]:
    backend = facts.kernels.get(scheme, "")
    return backend if backend in FAST_W8A8 else None


def _dit(facts: MachineFacts) -> Suggestion:
    part = "diffusion model"
    if facts.capability is None:
        return Suggestion(part, "int8-weight-only",
                          "no CUDA GPU: every scheme runs emulated here, slower than bf16; int8 weight-only "
                          "halves the weight memory with the smallest error of the 8-bit schemes")
    int8 = _fast(facts, "int8-w8a8")
    if int8:
        return Suggestion(part, "int8-w8a8",
                          f"int8 W8A8 runs on {int8}'s fused kernel: on an H100 a Wan 14B step ran 1.14x and a "
                          "Flux step 1.21x as fast as bf16, at 0.50x the block weight memory, with the output "
                          "closest to bf16 of the 8-bit schemes (cosine 0.99996 on Wan)")
    fp8 = _fast(facts, "fp8-w8a8")
    if fp8:
        return Suggestion(part, "fp8-w8a8",
                          f"fp8 W8A8 runs on {fp8}'s fused kernel: on an H100 a Wan 14B step ran 1.13x and a "
                          "Flux step 1.22x as fast as bf16, at 0.50x the block weight memory")
    hint = "install triton (triton-windows on Windows) for the fused W8A8 kernels"
    if facts.capability >= FP8_TENSOR_CORES:
        return Suggestion(part, "fp8-weight-only",
                          f"no fused W8A8 kernel can run here ({hint}); fp8 weight-only halves the weight "
                          "memory and keeps bf16 math")
    return Suggestion(part, "int8-weight-only",
                      f"no fused W8A8 kernel can run here ({hint}); int8 weight-only halves the weight "
                      "memory and keeps bf16 math")


def _encoders(facts: MachineFacts) -> Suggestion:
    part = "text / vision encoders"
    int8 = _fast(facts, "int8-w8a8") if facts.capability is not None else None
    if int8:
        return Suggestion(part, "int8", f"LightX2V's int8 (W8A8) runs on {int8}'s fused kernel")
    return Suggestion(part, "int8-weight-only",
                      "no fused int8 W8A8 kernel runs here; int8 weight-only halves the encoders' weight "
                      "memory, and they run once per prompt, so memory matters more than speed there")


def suggest(facts: MachineFacts) -> list[Suggestion]:
    return [_dit(facts), _encoders(facts)]


def describe(facts: MachineFacts, suggestions: list[Suggestion]) -> str:
    lines = [f"QuantDiT hardware probe: {facts.name} ({facts.device})"]
    if facts.capability is not None:
        lines.append(f"compute capability {facts.capability[0]}.{facts.capability[1]}, "
                     f"{facts.memory_gib:.1f} GiB"
                     + ("" if facts.capability >= FP8_TENSOR_CORES else ", no fp8 tensor cores"))
    for s in suggestions:
        lines.append(f"suggested for the {s.part}: {s.scheme} ({s.why})")
    lines.append("kernel 'auto' picks per scheme:")
    for scheme, backend in facts.kernels.items():
        lines.append(f"  {scheme}: {facts.routes.get(scheme, backend) or 'none can run it here'}"
                     + ("" if backend != "reference" else " (emulated in plain torch: slow)"))
    if facts.unavailable:
        lines.append("providers not available:")
        lines += [f"  {name}: {why}" for name, why in sorted(facts.unavailable.items())]
    return "\n".join(lines)
