"""quant/backends/pack_rows.py: what vLLM's and sgl-kernel's backends hand to their own quant ops
and what they take from the pack (rows a sibling quantized, deferred inputs the pack reads)."""
from __future__ import annotations

import pytest
import torch

from quant import reference
from quant.backends import pack_rows
from quant.deferred import DeferredHeads
from quant.kernels import triton_quant
from quant.shared_quant import QuantizedRows

DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _heads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 3, 6, 16, generator=g) * 3).to(torch.bfloat16).to(DEV)


def test_rows_a_sibling_quantized_are_used_as_they_are():
    q = torch.zeros(4, 8, dtype=torch.int8, device=DEV)
    s = torch.ones(4, 1, device=DEV)
    got = pack_rows.quantized_by_pack(QuantizedRows(q, s, torch.bfloat16), torch.int8)
    assert got[0] is q and got[1] is s


@pytest.mark.parametrize("dtype,fmt", [(torch.int8, reference.INT8), (torch.float8_e4m3fn, reference.FP8_E4M3)])
def test_a_deferred_input_is_quantized_by_the_pack_as_if_written(dtype, fmt):
    rows = DeferredHeads(_heads()).rows()
    q, s = pack_rows.quantized_by_pack(rows, dtype)
    rq, rs = triton_quant.per_token_quant(rows.materialize(), dtype)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    eq, es = reference.quantize_rowwise(rows.materialize(), fmt)
    assert torch.equal(s, es) and torch.equal(q.float(), eq.float())


def test_a_plain_tensor_is_left_to_the_provider():
    x = torch.randn(4, 8, device=DEV, dtype=torch.bfloat16)
    assert pack_rows.quantized_by_pack(x, torch.int8) is None


def test_without_triton_a_deferred_input_is_left_to_the_provider(monkeypatch):
    monkeypatch.setattr(pack_rows, "triton_quant", lambda: None)
    assert pack_rows.quantized_by_pack(DeferredHeads(_heads()).rows(), torch.int8) is None


def test_written_makes_deferred_inputs_and_strided_views_plain():
    rows = DeferredHeads(_heads()).rows()
    plain = pack_rows.written(rows)
    assert type(plain) is torch.Tensor and plain.is_contiguous() and torch.equal(plain, rows.materialize())
    x = torch.randn(8, 6, device=DEV)[:, ::2]
    assert pack_rows.written(x).is_contiguous() and torch.equal(pack_rows.written(x), x)
