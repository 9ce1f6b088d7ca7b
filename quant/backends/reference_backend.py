"""The emulated path: quant/reference.py math on any device. Always available, slowest."""
from __future__ import annotations

from .. import reference
from ..shared_quant import QuantizedRows
from .registry import Backend, register_backend


def _linear(x2d, qdata, scale, bias, scheme, in_features):
    if isinstance(x2d, QuantizedRows):
        return reference.emulated_linear_quantized(x2d.q, x2d.scale, x2d.dtype, qdata, scale, scheme, bias,
                                                   in_features)
    return reference.emulated_linear(x2d, qdata, scale, scheme, bias, in_features)


REFERENCE = register_backend(Backend(
    name="reference", priority=0,
    availability=lambda: None,
    supports=lambda scheme, device: None if scheme.is_quantized else "nothing to do for an unquantized scheme",
    linear=_linear,
    row_quantizer=reference.quantize_activation,
))
