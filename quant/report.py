"""What a load or a quantization did, as data and as the text a node shows."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backends import backend_reasons, pick_kernels, why_not
from .schemes import get_scheme


@dataclass
class QuantReport:
    source: str
    layout: str
    schemes: dict[str, int] = field(default_factory=dict)     # scheme -> layer count
    backends: dict[str, str] = field(default_factory=dict)    # scheme -> kernel backend chosen
    groups: dict[str, str] = field(default_factory=dict)      # layer group -> scheme
    quantized_bytes: int = 0
    bf16_equivalent_bytes: int = 0
    kept_bytes: int = 0  # Linear weights left in high precision, counted at 2 bytes each
    notes: list[str] = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        return self.bf16_equivalent_bytes - self.quantized_bytes

    @property
    def linear_ratio(self) -> float:
        """Weight memory of all Linears (quantized + kept) relative to all of them in bf16."""
        total = self.bf16_equivalent_bytes + self.kept_bytes
        return (self.quantized_bytes + self.kept_bytes) / total if total else 1.0

    def text(self) -> str:
        mib = 1024 * 1024
        lines = [f"QuantDiT: {self.source}", f"layout: {self.layout}"]
        for s, n in sorted(self.schemes.items()):
            lines.append(f"  {s}: {n} layers (kernel: {self.backends.get(s, '?')})")
        for g, s in sorted(self.groups.items()):
            lines.append(f"  group {g}: {s}")
        if self.bf16_equivalent_bytes:
            lines.append(f"quantized linears: {self.quantized_bytes / mib:.1f} MiB "
                         f"(bf16 would be {self.bf16_equivalent_bytes / mib:.1f} MiB, "
                         f"saved {self.saved_bytes / mib:.1f} MiB)")
        if self.kept_bytes:
            lines.append(f"all linears: {self.linear_ratio:.2f}x of bf16 "
                         f"({self.kept_bytes / mib:.1f} MiB of them kept in high precision)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def layer_group(name: str) -> str:
    """'blocks.3.self_attn.q' -> 'self_attn.q': the same sub-layer across blocks."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i + 1:]) or name
    return name


def describe_kernels(report: QuantReport, device: torch.device, backend: str | None):
    """Which kernel each scheme will run on the device ComfyUI loads the model to."""
    for name in report.schemes:
        scheme = get_scheme(name)
        kernels = pick_kernels(scheme, device, None if backend == "auto" else backend)
        chosen = kernels.backend
        report.backends[name] = f"{kernels.describe()} on {device}"
        if backend not in (None, "auto", chosen.name):
            why = why_not(backend, scheme, device)
            report.notes.append(f"backend '{backend}' cannot run {name} on {device} ({why}); "
                                f"falling back to '{chosen.name}'")
        if chosen.name == "reference" and device.type != "cpu":
            reasons = "; ".join(f"{b}: {r}" for b, r in backend_reasons(scheme, device).items())
            report.notes.append(f"no fast kernel for {name} on {device} ({reasons}); running the exact "
                                "but slow emulation. Pick a scheme this GPU supports for speed.")
