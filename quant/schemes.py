"""The one registry of quantization schemes and every name users already know them by.

A *scheme* is a storage + compute format (what the weight is stored as, whether and how the
activation is quantized). An *alias* is a name from LightX2V, LLMC or the torchao-style
``quantize_component`` design that points at a scheme and, optionally, at a preferred kernel
provider. Pure data: no torch kernels, no ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Weight / activation formats.
FP8_E4M3 = "fp8_e4m3"
FP8_E5M2 = "fp8_e5m2"   # more range, less precision: storage-only (layerwise cast)
INT8 = "int8"
INT4 = "int4"
NONE = "none"

# Granularities.
PER_CHANNEL = "per_channel"      # one scale per output row of the weight
PER_TOKEN = "per_token"          # one scale per row of the activation
PER_TENSOR = "per_tensor"
BLOCK_128 = "block_128x128"      # weight: one scale per 128x128 tile
GROUP_128 = "group_128"          # one scale per 128 consecutive input features


@dataclass(frozen=True)
class Scheme:
    name: str
    weight_format: str
    weight_granularity: str
    activation_format: str
    activation_granularity: str
    # Compute capability needed for the *native* fast path (None: any GPU / CPU reference).
    min_capability: Optional[tuple[int, int]]
    bits_per_weight: float
    description: str

    @property
    def quantizes_activation(self) -> bool:
        return self.activation_format != NONE

    @property
    def is_quantized(self) -> bool:
        return self.weight_format != NONE

    @property
    def is_8bit_weight_only(self) -> bool:
        """int8 / fp8 weights with high-precision activations (upcast or widened in the GEMM)."""
        return self.weight_format in (INT8, FP8_E4M3, FP8_E5M2) and not self.quantizes_activation

    def __post_init__(self):
        if self.weight_format not in (FP8_E4M3, FP8_E5M2, INT8, INT4, NONE):
            raise ValueError(f"scheme {self.name}: unknown weight format {self.weight_format!r}")
        if self.activation_format not in (FP8_E4M3, INT8, NONE):
            raise ValueError(f"scheme {self.name}: unknown activation format {self.activation_format!r}")


@dataclass(frozen=True)
class Alias:
    name: str
    scheme: str
    backend: Optional[str]
    origin: str


@dataclass(frozen=True)
class ResolvedScheme:
    scheme: Scheme
    backend: Optional[str]  # preferred kernel provider named by the alias, if any
    asked_as: str


class UnknownSchemeError(ValueError):
    """A scheme name that no registry entry or alias knows."""


_SCHEMES: dict[str, Scheme] = {}
_ALIASES: dict[tuple[str, str], Alias] = {}  # (namespace, lowercased name) -> alias


def register_scheme(scheme: Scheme) -> Scheme:
    if scheme.name in _SCHEMES:
        raise ValueError(f"scheme {scheme.name!r} registered twice")
    _SCHEMES[scheme.name] = scheme
    return scheme


def register_alias(name: str, scheme: str, backend: Optional[str], origin: str, namespace: str = "common"):
    if scheme not in _SCHEMES:
        raise ValueError(f"alias {name!r} points at unknown scheme {scheme!r}")
    key = (namespace, name.lower())
    if key in _ALIASES:
        raise ValueError(f"alias {name!r} registered twice in namespace {namespace!r}")
    _ALIASES[key] = Alias(name=name, scheme=scheme, backend=backend, origin=origin)


register_scheme(Scheme("none", NONE, PER_TENSOR, NONE, NONE, None, 16,
                       "No quantization: weights and compute in the model dtype."))
register_scheme(Scheme("fp8-w8a8", FP8_E4M3, PER_CHANNEL, FP8_E4M3, PER_TOKEN, (8, 9), 8,
                       "FP8 e4m3 weight, one scale per output channel; FP8 activation quantized "
                       "per token at run time (symmetric). Tensor-core fp8 GEMM."))
register_scheme(Scheme("int8-w8a8", INT8, PER_CHANNEL, INT8, PER_TOKEN, (7, 5), 8,
                       "INT8 weight, one scale per output channel; INT8 activation quantized per "
                       "token at run time (symmetric). Tensor-core int8 GEMM."))
register_scheme(Scheme("fp8-block128", FP8_E4M3, BLOCK_128, FP8_E4M3, GROUP_128, (9, 0), 8,
                       "FP8 weight with one scale per 128x128 tile; activation quantized per token "
                       "in groups of 128 features (DeepGEMM style)."))
register_scheme(Scheme("int4-g128", INT4, GROUP_128, NONE, NONE, (8, 0), 4.25,
                       "INT4 weight, symmetric, one scale per 128 input features; activation stays "
                       "in the model dtype (Marlin style weight-only)."))
register_scheme(Scheme("fp8-weight-only", FP8_E4M3, PER_CHANNEL, NONE, NONE, None, 8,
                       "FP8 weight with per-channel scale, upcast to the model dtype for the matmul."))
register_scheme(Scheme("int8-weight-only", INT8, PER_CHANNEL, NONE, NONE, None, 8,
                       "INT8 weight with per-channel scale, upcast to the model dtype for the matmul."))
register_scheme(Scheme("fp8-scaled", FP8_E4M3, PER_TENSOR, NONE, NONE, None, 8,
                       "ComfyUI's scaled fp8: one fp32 scale per weight tensor, upcast for the matmul."))
register_scheme(Scheme("fp8-e5m2-weight-only", FP8_E5M2, PER_CHANNEL, NONE, NONE, None, 8,
                       "FP8 e5m2 weight (wider range, 2-bit mantissa) with per-channel scale, upcast."))
register_scheme(Scheme("fp8-e5m2-scaled", FP8_E5M2, PER_TENSOR, NONE, NONE, None, 8,
                       "FP8 e5m2 weight with one scale per tensor, upcast for the matmul."))

_LIGHTX2V_MM = "LightX2V mm_type"
_LIGHTX2V_DIT = "LightX2V dit_quant_scheme"
_LIGHTX2V_ENC = "LightX2V t5/clip quant_scheme"
_TORCHAO = "torchao quantize_component method"
_LLMC = "LightX2V/LLMC format name"

for _name, _scheme, _backend in [
    ("Default", "none", None),
    ("W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm", "fp8-w8a8", "vllm"),
    ("W-int8-channel-sym-A-int8-channel-sym-dynamic-Vllm", "int8-w8a8", "vllm"),
    ("W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Q8F", "fp8-w8a8", "q8f"),
    ("W-int8-channel-sym-A-int8-channel-sym-dynamic-Q8F", "int8-w8a8", "q8f"),
    ("W-fp8-block128-sym-A-fp8-channel-group128-sym-dynamic-Deepgemm", "fp8-block128", "deep-gemm"),
    ("W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Sgl", "fp8-w8a8", "sgl-kernel"),
    ("W-int8-channel-sym-A-int8-channel-sym-dynamic-Sgl", "int8-w8a8", "sgl-kernel"),
    ("W-int8-channel-sym-A-int8-channel-sym-dynamic-Torchao", "int8-w8a8", "torchao"),
    ("W-int4-group128-sym-Marlin", "int4-g128", "vllm"),
]:
    register_alias(_name, _scheme, _backend, _LIGHTX2V_MM)

for _name, _scheme, _backend in [
    ("fp8-vllm", "fp8-w8a8", "vllm"), ("int8-vllm", "int8-w8a8", "vllm"),
    ("fp8-sgl", "fp8-w8a8", "sgl-kernel"), ("int8-sgl", "int8-w8a8", "sgl-kernel"),
    ("fp8-q8f", "fp8-w8a8", "q8f"), ("int8-q8f", "int8-w8a8", "q8f"),
    ("int8-torchao", "int8-w8a8", "torchao"), ("int4-g128-marlin", "int4-g128", "vllm"),
    ("fp8-b128-deepgemm", "fp8-block128", "deep-gemm"),
]:
    register_alias(_name, _scheme, _backend, _LIGHTX2V_DIT)

for _name, _scheme, _backend in [
    ("w8a8-int8", "int8-w8a8", None), ("w8a8-fp8", "fp8-w8a8", None),
    ("w8a8-fp8block", "fp8-block128", None), ("fp8-scaled", "fp8-scaled", None),
]:
    register_alias(_name, _scheme, _backend, _LLMC)

# torchao-style method names (quantize_component). "fp8" is their alias for fp8-dynamic.
for _name, _scheme in [("none", "none"), ("fp8-dynamic", "fp8-w8a8"), ("fp8", "fp8-w8a8"),
                       ("fp8-weight-only", "fp8-weight-only"), ("int8", "int8-weight-only"),
                       ("int4", "int4-g128")]:
    register_alias(_name, _scheme, None, _TORCHAO)

# LightX2V's T5/CLIP names. Their bare "int8" means W8A8 (vLLM kernel), unlike torchao's "int8"
# (weight-only); inside the encoder namespace the LightX2V meaning wins.
for _name, _scheme, _backend in [("int8", "int8-w8a8", "vllm"), ("fp8", "fp8-w8a8", "vllm")]:
    register_alias(_name, _scheme, _backend, _LIGHTX2V_ENC, namespace="encoder")


def get_scheme(name: str) -> Scheme:
    """A canonical scheme by its exact registry name."""
    try:
        return _SCHEMES[name]
    except KeyError:
        raise UnknownSchemeError(_unknown_message(name)) from None


def resolve(name: str, namespace: str = "common") -> ResolvedScheme:
    """Resolve a canonical name or any alias. ``namespace="encoder"`` gives LightX2V's T5/CLIP
    meaning to the bare ``int8``/``fp8``; otherwise the torchao meaning applies."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownSchemeError(_unknown_message(repr(name)))
    key = name.strip()
    if key.lower() in _SCHEMES:  # canonical names are lower-case
        return ResolvedScheme(_SCHEMES[key.lower()], None, name)
    for ns in ((namespace, "common") if namespace != "common" else ("common",)):
        alias = _ALIASES.get((ns, key.lower()))
        if alias is not None:
            return ResolvedScheme(_SCHEMES[alias.scheme], alias.backend, name)
    raise UnknownSchemeError(_unknown_message(key))


def list_schemes() -> list[Scheme]:
    return list(_SCHEMES.values())


def list_aliases(namespace: Optional[str] = None) -> list[Alias]:
    return [a for (ns, _), a in _ALIASES.items() if namespace is None or ns == namespace]


def all_names() -> list[str]:
    """Every accepted name: canonical schemes first, then aliases."""
    seen, names = set(), []
    for n in list(_SCHEMES) + [a.name for a in _ALIASES.values()]:
        if n not in seen:
            seen.add(n)
            names.append(n)
    return names


def _unknown_message(name: str) -> str:
    return (f"unknown quantization scheme {name!r}. Valid schemes: {', '.join(_SCHEMES)}. "
            f"Also accepted: {', '.join(n for n in all_names() if n not in _SCHEMES)}.")


def weight_only_partner(scheme: Scheme) -> Scheme:
    """The 8-bit weight-only scheme with the same weight format: what a W8A8 scheme uses on layers
    that see few rows (context k/v, text streams), where activation quantization costs more than
    it saves but the weight memory should still shrink."""
    if not scheme.quantizes_activation:
        return scheme
    return get_scheme("int8-weight-only" if scheme.weight_format == INT8 else "fp8-weight-only")
