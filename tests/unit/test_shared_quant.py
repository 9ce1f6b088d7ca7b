"""quant/shared_quant.py: when sibling linears may reuse a quantized activation, and the backends
that take one (reference, and the Triton kernels in Triton's CPU interpreter here)."""
from __future__ import annotations

import gc

import pytest
import torch

from quant import reference
from quant.backends import get_backend
from quant.schemes import get_scheme
from quant.shared_quant import QuantizedRows, SharedQuant

W8A8 = ["int8-w8a8", "fp8-w8a8"]
DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")  # GPU machine: compiled kernels


def _counting_quantizer(calls, scheme):
    def quantize(t):
        calls.append(t)
        return reference.quantize_activation(t, scheme)
    return quantize


def _x(m=6, k=64, seed=0):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_the_same_tensor_is_quantized_once_and_another_tensor_again():
    scheme, calls, slot = get_scheme("int8-w8a8"), [], SharedQuant()
    quantize = _counting_quantizer(calls, scheme)
    x = _x()
    first = slot.rows(x, x, ("reference", scheme.name), quantize)
    again = slot.rows(x, x.reshape(-1, 64), ("reference", scheme.name), quantize)   # a new view of x
    assert again is first and len(calls) == 1 and slot.hits == 1
    assert isinstance(first, QuantizedRows) and first.dtype == torch.bfloat16 and first.shape == (6, 64)
    rq, rs = reference.quantize_activation(x, scheme)
    assert torch.equal(first.q, rq) and torch.equal(first.scale, rs)
    same_values = x.clone()                              # equal contents, another tensor: quantized anew
    assert slot.rows(same_values, same_values, ("reference", scheme.name), quantize) is not first
    assert len(calls) == 2


def test_another_quantizer_or_scheme_does_not_reuse_the_rows():
    calls, slot, x = [], SharedQuant(), _x()
    slot.rows(x, x, ("triton", "int8-w8a8"), _counting_quantizer(calls, get_scheme("int8-w8a8")))
    fp8 = slot.rows(x, x, ("triton", "fp8-w8a8"), _counting_quantizer(calls, get_scheme("fp8-w8a8")))
    slot.rows(x, x, ("vllm", "fp8-w8a8"), _counting_quantizer(calls, get_scheme("fp8-w8a8")))
    assert len(calls) == 3 and fp8.q.dtype == torch.float8_e4m3fn and slot.hits == 0


def test_an_in_place_write_since_the_store_is_a_miss():
    scheme, calls, slot, x = get_scheme("int8-w8a8"), [], SharedQuant(), _x()
    quantize = _counting_quantizer(calls, scheme)
    slot.rows(x, x, ("reference", scheme.name), quantize)
    x.mul_(3)
    rows = slot.rows(x, x, ("reference", scheme.name), quantize)
    assert len(calls) == 2 and torch.equal(rows.q, reference.quantize_activation(x, scheme)[0])


def test_inference_tensors_are_shared_too():
    # ComfyUI samples under inference_mode, where tensors keep no version counter.
    scheme, calls, slot = get_scheme("fp8-w8a8"), [], SharedQuant()
    quantize = _counting_quantizer(calls, scheme)
    with torch.inference_mode():
        x = _x()
        assert x.is_inference()
        assert slot.rows(x, x, ("reference", scheme.name), quantize) is slot.rows(x, x, ("reference", scheme.name),
                                                                                 quantize)
    assert len(calls) == 1


def test_the_rows_are_dropped_with_their_source_and_an_old_source_leaves_a_new_entry():
    scheme, slot = get_scheme("int8-w8a8"), SharedQuant()

    def quantize(t):                                     # keeps no reference to the tensor
        return reference.quantize_activation(t, scheme)
    old = _x(seed=1)
    slot.rows(old, old, ("reference", scheme.name), quantize)
    new = _x(seed=2)
    kept = slot.rows(new, new, ("reference", scheme.name), quantize)
    del old
    gc.collect()
    assert slot.holds and slot.rows(new, new, ("reference", scheme.name), quantize) is kept
    del new
    gc.collect()
    assert not slot.holds                                # no 8-bit copy outlives its activation


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("scheme_name", W8A8)
def test_backends_give_the_same_output_from_quantized_rows(backend, scheme_name):
    scheme, b = get_scheme(scheme_name), get_backend(backend)
    x = _x(24, 384).to(DEV)
    wq, ws = reference.quantize_weight(_x(160, 384, seed=6).float().to(DEV), scheme)
    bias = _x(1, 160, seed=7)[0].to(DEV)
    q, s = b.row_quantizer(x, scheme)
    rows = QuantizedRows(q, s, x.dtype)
    assert torch.equal(b.linear(rows, wq, ws, bias, scheme, 384), b.linear(x, wq, ws, bias, scheme, 384))


def test_only_backends_with_a_row_quantizer_are_handed_rows():
    # The nodes share rows only where the chosen backend quantizes them itself.
    for name in ("triton", "vllm", "sgl-kernel"):
        assert get_backend(name).row_quantizer is not None
    for name in ("torch", "torchao", "comfy-kitchen", "deep-gemm"):
        assert get_backend(name).row_quantizer is None
