"""quant/deferred.py: a deferred GELU is the GELU for every use but the one it is made for, and the
kernels that consume it (triton_quant.per_token_quant_gelu, the Triton backend) match the
ordinary path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant import reference
from quant.backends import get_backend, run_linear
from quant.backends.registry import Backend
from quant.deferred import DeferredActivation, DeferredGelu, consumes_deferred
from quant.kernels import interpreted, triton_quant
from quant.schemes import get_scheme

DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _t(*shape, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(dtype).to(DEV)


def gelu(x):
    return F.gelu(x, approximate="tanh")


# ------------------------------------------------------------------ the tensor
def test_deferred_gelu_has_the_gelus_metadata_and_value():
    x = _t(2, 5, 7)
    d = DeferredGelu()(x)
    assert isinstance(d, DeferredActivation) and d.source is x and d.prefix is None
    assert d.shape == x.shape and d.dtype == x.dtype and d.device == x.device and d.dim() == 3 and d.size(-1) == 7
    assert torch.equal(d.materialize(), gelu(x))


def test_concatenation_on_the_last_dim_stays_deferred():
    a, x = _t(2, 5, 3, seed=1), _t(2, 5, 7)
    for dim in (2, -1):
        c = torch.cat((a, DeferredGelu()(x)), dim)
        assert isinstance(c, DeferredActivation) and c.prefix is a and c.source is x
        assert c.shape == (2, 5, 10)
        assert torch.equal(c.materialize(), torch.cat((a, gelu(x)), dim))
    r = torch.cat((a, DeferredGelu()(x)), 2).rows()
    assert r.shape == (10, 10) and r.source.shape == (10, 7) and r.prefix.shape == (10, 3)
    assert torch.equal(r.materialize(), torch.cat((a, gelu(x)), 2).reshape(10, 10))


@pytest.mark.parametrize("use", [
    lambda d, a, w: F.linear(d, w),                          # a linear that is not quantized
    lambda d, a, w: d * a[..., :1],                          # Flux's yak_mlp multiplies the activation
    lambda d, a, w: torch.cat((d, a), -1),                   # another order
    lambda d, a, w: torch.cat((a, d), 1),                    # another dim
    lambda d, a, w: torch.cat((a, a, d), -1),                # more parts
    lambda d, a, w: d.reshape(-1, d.shape[-1]) + 1,
    lambda d, a, w: d.float().sum(-1),
    lambda d, a, w: d.clone(),
])
def test_every_other_use_computes_the_gelu_first(use):
    x, a, w = _t(2, 5, 7), _t(2, 5, 7, seed=1), _t(4, 7, seed=2)
    out = use(DeferredGelu()(x), a, w)
    assert type(out) is torch.Tensor
    assert torch.equal(out, use(gelu(x), a, w))


@pytest.mark.parametrize("write", [
    lambda d: d.mul_(2),
    lambda d: d.add_(1),
    lambda d: d.__iadd__(1),
    lambda d: d.__setitem__(0, 1.0),
    lambda d: torch.add(d, 1, out=d),
    lambda d: torch.mul(d, 2, out=d),
])
def test_writing_into_a_deferred_output_is_refused(write):
    """In place, the op would write into a temporary while the caller's tensor stays unchanged."""
    d = DeferredGelu()(_t(3, 4))
    with pytest.raises(RuntimeError, match="would modify a GELU output"):
        write(d)


def test_torch_dispatch_catches_what_bypasses_torch_function():
    d = DeferredGelu()(_t(3, 4))
    with torch._C.DisableTorchFunctionSubclass():
        out = torch.add(d, 1)
    assert type(out) is torch.Tensor and torch.equal(out, gelu(d.source) + 1)


def test_gradients_and_compilation_get_the_plain_gelu():
    x = _t(3, 4).float().requires_grad_()
    out = DeferredGelu()(x)
    assert type(out) is torch.Tensor
    out.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        assert isinstance(DeferredGelu()(x), DeferredActivation)


def test_which_schemes_consume_it():
    assert consumes_deferred(get_scheme("int8-w8a8")) and consumes_deferred(get_scheme("fp8-w8a8"))
    for name in ("fp8-block128", "int4-g128", "int8-weight-only", "fp8-scaled"):
        assert not consumes_deferred(get_scheme(name)), name
    assert not consumes_deferred(None)


# ------------------------------------------------------------------ the fused quantizer
def _gelu_as_computed(x):
    """The kernel's GELU: on the GPU torch's own formula (libdevice tanh, bit-equal to torch); in
    Triton's CPU interpreter, which has no tanh, the same function as x * sigmoid(2 * inner)."""
    if not interpreted():
        return gelu(x)
    xf = x.float()
    inner = 0.7978845608028654 * (xf + 0.044715 * (xf * xf * xf))
    return (xf / (1.0 + torch.exp(-2.0 * inner))).to(x.dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's exp of far tails
@pytest.mark.parametrize("m,p,g", [(5, 48, 200), (3, 0, 300), (2, 100, 16500), (64, 64, 700)])
@pytest.mark.parametrize("fmt,dtype", [(reference.INT8, torch.int8), (reference.FP8_E4M3, torch.float8_e4m3fn)])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
def test_per_token_quant_gelu_equals_gelu_cat_then_quant(m, p, g, fmt, dtype, in_dtype):
    prefix = _t(m, p, seed=1, dtype=in_dtype) if p else None
    wide = _t(m, g + 40, dtype=in_dtype)
    x = wide[:, 40:]                                      # a strided slice, as Flux's split gives
    q, s = triton_quant.per_token_quant_gelu(prefix, x, dtype)
    act = _gelu_as_computed(x)
    rq, rs = reference.quantize_rowwise(act if prefix is None else torch.cat((prefix, act), 1), fmt)
    assert q.shape == (m, p + g) and q.dtype == dtype and s.shape == (m, 1)
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("fmt,dtype", [(reference.INT8, torch.int8), (reference.FP8_E4M3, torch.float8_e4m3fn)])
def test_per_token_quant_gelu_rows_whose_largest_input_does_not_decide(fmt, dtype):
    """The kernel takes a row's amax from its largest input's GELU unless that is below |GELU's
    minimum|; these rows take the other branch (and one mixes both)."""
    x = _t(6, 300).float()
    x[0] *= 0.05                          # every GELU output small
    x[1] = -x[1].abs() - 0.1              # only negative inputs: the extreme is GELU's minimum region
    x[2] = 0                              # all zero
    x[3, :] = -0.75                       # at GELU's minimum
    x[3, 7] = 0.3                         # ... and one small positive input
    x = x.to(torch.bfloat16)
    prefix = _t(6, 16, seed=4) * 0.01
    q, s = triton_quant.per_token_quant_gelu(prefix, x, dtype)
    rq, rs = reference.quantize_rowwise(torch.cat((prefix, _gelu_as_computed(x)), 1), fmt)
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())


def test_interpreter_gelu_is_torchs_gelu_where_it_matters():
    """The CPU check above uses the interpreter's GELU; it differs from torch's only in the far
    negative tail, where both are ~0 (torch's fp32 tanh saturates there)."""
    x = torch.linspace(-12, 12, 20001).to(torch.bfloat16)
    xf = x.float()
    inner = 0.7978845608028654 * (xf + 0.044715 * (xf * xf * xf))
    mine = (xf / (1.0 + torch.exp(-2.0 * inner))).to(torch.bfloat16)
    ref = gelu(x).float()
    # one bf16 rounding step of the value, or 1e-6 absolute in the tail
    assert bool(((mine.float() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-6).all())


def test_per_token_quant_gelu_rejects_mismatched_parts():
    with pytest.raises(ValueError, match="does not match"):
        triton_quant.per_token_quant_gelu(_t(3, 4), _t(2, 8), torch.int8)
    with pytest.raises(ValueError, match="does not match"):
        triton_quant.per_token_quant_gelu(_t(2, 4, dtype=torch.float16), _t(2, 8), torch.int8)
    q, s = triton_quant.per_token_quant_gelu(_t(0, 4), _t(0, 8), torch.int8)
    assert q.shape == (0, 12) and s.shape == (0, 1)


# ------------------------------------------------------------------ the linears that take it
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("scheme_name", ["int8-w8a8", "fp8-w8a8"])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_triton_linear_takes_the_deferred_activation(scheme_name, with_prefix):
    triton = get_backend("triton")
    assert scheme_name in triton.deferred_schemes
    scheme = get_scheme(scheme_name)
    m, p, g, n = 9, 32 if with_prefix else 0, 96, 48
    prefix = _t(m, p, seed=1) if p else None
    x = _t(m, g)
    w = _t(n, p + g, seed=2).float() / (p + g) ** 0.5
    qdata, scale = reference.quantize_weight(w, scheme)
    bias = _t(n, seed=3)
    deferred = DeferredActivation(x, prefix)
    y = triton.linear(deferred, qdata.to(DEV), scale.to(DEV), bias, scheme, p + g)
    act = _gelu_as_computed(x)
    plain = act if prefix is None else torch.cat((prefix, act), 1)
    ref = triton.linear(plain, qdata.to(DEV), scale.to(DEV), bias, scheme, p + g)
    assert type(y) is torch.Tensor and torch.equal(y, ref)


def recording_backend():
    """A backend that takes no deferred activation, and the types of the inputs its linear got."""
    seen = []

    def linear(x2d, qdata, scale, bias, scheme, k):
        seen.append(type(x2d))
        return reference.emulated_linear(x2d, qdata, scale, scheme, bias, k)

    return Backend("plain-test", 0, lambda: None, lambda s, d: None, linear), seen


def test_run_linear_computes_it_for_backends_that_do_not_take_it():
    plain_backend, seen = recording_backend()
    scheme = get_scheme("int8-w8a8")
    x = _t(4, 64).cpu()
    qdata, scale = reference.quantize_weight(_t(8, 64, seed=2).float().cpu() / 8, scheme)
    y = run_linear(DeferredActivation(x), qdata, scale, None, scheme, 64, plain_backend)
    assert seen == [torch.Tensor]
    assert torch.equal(y, reference.emulated_linear(gelu(x), qdata, scale, scheme, None, 64))
