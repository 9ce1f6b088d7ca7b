"""What a load or a quantization did, as data and as the text a node shows."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QuantReport:
    source: str
    layout: str
    schemes: dict[str, int] = field(default_factory=dict)     # scheme -> layer count
    backends: dict[str, str] = field(default_factory=dict)    # scheme -> kernel backend chosen
    groups: dict[str, str] = field(default_factory=dict)      # layer group -> scheme
    quantized_bytes: int = 0
    bf16_equivalent_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        return self.bf16_equivalent_bytes - self.quantized_bytes

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
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def layer_group(name: str) -> str:
    """'blocks.3.self_attn.q' -> 'self_attn.q': the same sub-layer across blocks."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i + 1:]) or name
    return name
