"""quant/deferred.py's DeferredHeads: an attention output [B, H, L, D] that is ComfyUI's
`out.transpose(1, 2).reshape(B, L, H * D)` for every use, and that the per-token quantizer
(triton_quant.per_token_quant_heads, the Triton backend) reads in its own layout, bit for bit."""
from __future__ import annotations

import pytest
import torch

from quant import reference
from quant.backends import get_backend, run_linear
from quant.deferred import DeferredActivation, DeferredHeads
from quant.kernels import triton_quant
from quant.schemes import get_scheme
from test_deferred import _gelu_as_computed, recording_backend  # the interpreter's GELU, a plain backend

DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _heads(b, h, tokens, d, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tokens, d, generator=g) * 3).to(dtype).to(DEV)


def comfy_reshape(heads):
    b, h, tokens, d = heads.shape
    return heads.transpose(1, 2).reshape(b, tokens, h * d)


# ------------------------------------------------------------------ the tensor
def test_it_has_the_reshaped_outputs_metadata_and_value():
    heads = _heads(2, 3, 5, 4)
    d = DeferredHeads(heads)
    assert d.shape == (2, 5, 12) and d.dtype == heads.dtype and d.device == heads.device and d.dim() == 3
    assert torch.equal(d.materialize(), comfy_reshape(heads))
    rows = d.rows()
    assert isinstance(rows, DeferredHeads) and rows.shape == (10, 12)
    assert torch.equal(rows.materialize(), comfy_reshape(heads).reshape(10, 12))


@pytest.mark.parametrize("index", [(slice(None), slice(None, 3)), (slice(None), slice(3, None)),
                                   (slice(None), slice(1, 4))])
def test_slicing_the_tokens_stays_deferred(index):
    heads = _heads(2, 3, 5, 4)
    part = DeferredHeads(heads)[index]
    assert isinstance(part, DeferredHeads)
    assert part.heads.data_ptr() >= heads.data_ptr() and part.heads.untyped_storage().data_ptr() == \
        heads.untyped_storage().data_ptr()  # a view, no copy
    assert torch.equal(part.materialize(), comfy_reshape(heads)[index])


@pytest.mark.parametrize("use", [
    lambda t: t[0], lambda t: t[:, ::2], lambda t: t[..., :3], lambda t: t[:, 1:3, 2:],
    lambda t: t + 1, lambda t: t * torch.ones(12, dtype=t.dtype, device=t.device), lambda t: t.sum(-1),
    lambda t: torch.nn.functional.linear(t, torch.ones(6, 12, dtype=t.dtype, device=t.device)),
    lambda t: t.contiguous(), lambda t: t.float(), lambda t: t.view(2, 60),
])
def test_every_other_use_sees_comfys_reshaped_output(use):
    heads = _heads(2, 3, 5, 4)
    out = use(DeferredHeads(heads))
    assert type(out) is torch.Tensor and torch.equal(out, use(comfy_reshape(heads)))


def test_concatenated_with_a_deferred_gelu_both_stay_deferred():
    """Flux's single blocks: cat((attention, gelu(mlp)), 2) -> linear2."""
    heads, mlp = _heads(2, 3, 5, 4), _heads(1, 2, 5, 7, seed=1)[0]
    joined = torch.cat((DeferredHeads(heads), DeferredActivation(mlp)), 2)
    assert isinstance(joined, DeferredActivation) and isinstance(joined.prefix, DeferredHeads)
    expected = torch.cat((comfy_reshape(heads), torch.nn.functional.gelu(mlp, approximate="tanh")), 2)
    assert torch.equal(joined.materialize(), expected)
    rows = joined.rows()
    assert isinstance(rows.prefix, DeferredHeads) and rows.prefix.shape == (10, 12) and rows.source.shape == (10, 7)
    assert torch.equal(rows.materialize(), expected.reshape(10, 19))
    assert torch.equal(joined + 0, expected)  # any other use computes both


def test_a_cat_it_cannot_defer_computes_it():
    heads, other = _heads(1, 3, 5, 4), _heads(1, 1, 5, 7, seed=1)[:, 0]
    for parts, dim in (((DeferredHeads(heads), other), 2), ((DeferredHeads(heads), DeferredHeads(heads)), 1)):
        out = torch.cat(parts, dim)
        assert type(out) is torch.Tensor
        assert torch.equal(out, torch.cat([comfy_reshape(heads) if isinstance(t, DeferredHeads) else t
                                           for t in parts], dim))


@pytest.mark.parametrize("write", [lambda d: d.mul_(2), lambda d: d.__iadd__(1), lambda d: d.__setitem__(0, 1.0),
                                   lambda d: torch.add(d, 1, out=d)])
def test_writing_into_it_is_refused(write):
    with pytest.raises(RuntimeError, match="would modify an attention output"):
        write(DeferredHeads(_heads(1, 2, 3, 4)))


# ------------------------------------------------------------------ the quantizer
@pytest.mark.parametrize("b,h,tokens,d", [(1, 3, 7, 16), (2, 4, 5, 32), (1, 24, 3, 128), (2, 3, 4, 24)])
@pytest.mark.parametrize("fmt,dtype", [(reference.INT8, torch.int8), (reference.FP8_E4M3, torch.float8_e4m3fn)])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
def test_per_token_quant_heads_equals_reshape_then_quant(b, h, tokens, d, fmt, dtype, in_dtype):
    heads = _heads(b, h, tokens, d, dtype=in_dtype)
    q, s = triton_quant.per_token_quant_heads(heads, dtype)
    rq, rs = reference.quantize_rowwise(comfy_reshape(heads).reshape(b * tokens, h * d), fmt)
    assert q.shape == (b * tokens, h * d) and q.dtype == dtype and s.shape == (b * tokens, 1)
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())


@pytest.mark.parametrize("layout", ["token slice", "heads in BLHD memory"])
def test_per_token_quant_heads_reads_strided_outputs(layout):
    if layout == "token slice":  # Flux's double block: the image tokens of the joint output
        heads = _heads(2, 3, 9, 16)[:, :, 4:]
    else:  # what SDPA's memory-efficient kernel returns: [B, L, H, D] memory seen as [B, H, L, D]
        heads = _heads(2, 5, 3, 16).permute(0, 2, 1, 3)
    q, s = triton_quant.per_token_quant_heads(heads, torch.int8)
    b, h, tokens, d = heads.shape
    rq, rs = reference.quantize_rowwise(comfy_reshape(heads).reshape(b * tokens, h * d), reference.INT8)
    assert torch.equal(s, rs) and torch.equal(q, rq)


def test_per_token_quant_heads_rejects_what_it_cannot_read():
    assert not triton_quant.heads_fit(_heads(1, 2, 3, 8).transpose(2, 3))    # head values not contiguous
    assert not triton_quant.heads_fit(_heads(1, 3, 2, 8)[0])                 # not 4-D
    with pytest.raises(ValueError, match="contiguous heads"):
        triton_quant.per_token_quant_heads(_heads(1, 2, 3, 8).transpose(2, 3), torch.int8)
    q, s = triton_quant.per_token_quant_heads(_heads(1, 2, 0, 8), torch.int8)
    assert q.shape == (0, 16) and s.shape == (0, 1)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("fmt,dtype", [(reference.INT8, torch.int8), (reference.FP8_E4M3, torch.float8_e4m3fn)])
@pytest.mark.parametrize("b,tokens,sliced", [(1, 7, False), (2, 5, True)])
def test_per_token_quant_gelu_reads_a_head_layout_prefix(fmt, dtype, b, tokens, sliced):
    """Flux's single blocks: the attention output and the GELU quantized in one pass."""
    heads = _heads(b, 4, tokens + 3, 32)[:, :, 3:] if sliced else _heads(b, 4, tokens, 32)
    mlp = _heads(1, 1, b * tokens, 300, seed=4)[0, 0]
    q, s = triton_quant.per_token_quant_gelu(DeferredHeads(heads).rows(), mlp, dtype)
    plain = torch.cat((comfy_reshape(heads).reshape(b * tokens, 128), _gelu_as_computed(mlp)), 1)
    rq, rs = reference.quantize_rowwise(plain, fmt)
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())
    with pytest.raises(ValueError, match="does not match"):
        triton_quant.per_token_quant_gelu(DeferredHeads(heads).rows(), mlp[1:], dtype)


def test_per_token_quant_deferred_reads_what_it_can_and_computes_the_rest():
    heads = _heads(1, 2, 3, 8)
    for source in (heads, heads.transpose(2, 3).contiguous().transpose(2, 3)):  # the second is not readable
        q, s = triton_quant.per_token_quant_deferred(DeferredHeads(source), torch.int8)
        rq, rs = reference.quantize_rowwise(comfy_reshape(source).reshape(3, 16), reference.INT8)
        assert torch.equal(q, rq) and torch.equal(s, rs)


# ------------------------------------------------------------------ the linears that take it
@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
def test_triton_linear_takes_the_head_layout(scheme_name):
    triton = get_backend("triton")
    scheme = get_scheme(scheme_name)
    heads = _heads(2, 4, 6, 16)[:, :, 1:]
    k, n = 64, 40
    qdata, scale = reference.quantize_weight(_heads(1, 1, n, k, seed=2)[0, 0].float() / 8, scheme)
    bias = _heads(1, 1, 1, n, seed=3).reshape(n)
    y = triton.linear(DeferredHeads(heads).rows(), qdata.to(DEV), scale.to(DEV), bias, scheme, k)
    ref = triton.linear(comfy_reshape(heads).reshape(-1, k), qdata.to(DEV), scale.to(DEV), bias, scheme, k)
    assert type(y) is torch.Tensor and torch.equal(y, ref)


def test_run_linear_computes_it_for_backends_that_do_not_take_it():
    plain_backend, seen = recording_backend()
    scheme = get_scheme("int8-w8a8")
    heads = _heads(1, 2, 3, 32).cpu()
    qdata, scale = reference.quantize_weight(_heads(1, 1, 8, 64, seed=2)[0, 0].float().cpu() / 8, scheme)
    y = run_linear(DeferredHeads(heads).rows(), qdata, scale, None, scheme, 64, plain_backend)
    assert seen == [torch.Tensor]
    assert torch.equal(y, reference.emulated_linear(comfy_reshape(heads).reshape(3, 64), qdata, scale, scheme, None, 64))
