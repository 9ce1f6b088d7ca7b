"""quant/kernels/launch.py: the key that decides when a cached compiled kernel may be reused.

The cached launch itself needs compiled kernels (a GPU): tests/gpu/test_kernel_backends.py
checks it bit for bit against Triton's own launch."""
from __future__ import annotations

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from quant.kernels import gluon_gemm, launch, triton_gemm, triton_quant


def test_key_holds_integers_by_value():
    # Triton specializes integers on == 1 and on divisibility by 16; the key is stricter.
    assert launch.call_key([4096]) != launch.call_key([4097])
    assert launch.call_key([1]) != launch.call_key([2])
    assert launch.call_key([16, True]) == launch.call_key([16, True])
    assert launch.call_key([True]) != launch.call_key([False])


def test_key_holds_tensor_dtype_and_alignment_not_values():
    a = torch.zeros(64, dtype=torch.bfloat16)
    assert launch.call_key([a]) == launch.call_key([torch.ones(64, dtype=torch.bfloat16)])
    assert launch.call_key([a]) != launch.call_key([a.to(torch.float16)])
    shifted = a[1:]  # 2 bytes past a 16-byte boundary: Triton compiles another kernel for it
    assert shifted.data_ptr() % 16 != 0
    assert launch.call_key([a]) != launch.call_key([shifted])


def test_key_holds_descriptor_shape_and_strides():
    base = torch.zeros(64, 256, dtype=torch.int8)
    d1 = TensorDescriptor(base, [64, 256], [256, 1], [32, 128])
    d2 = TensorDescriptor(base[:32], [32, 256], [256, 1], [32, 128])
    assert launch.call_key([d1]) == launch.call_key([TensorDescriptor(base, [64, 256], [256, 1], [32, 128])])
    assert launch.call_key([d1]) != launch.call_key([d2])


def test_gluon_kernel_builds_with_this_triton_and_its_descriptors_key_like_tritons():
    """The int8 Hopper kernel (gluon_gemm.py) needs Triton's experimental Gluon; with the Triton
    this project installs it must import (else int8 silently loses its fast kernel), and its
    descriptors must key a cached launch by shape and strides, as Triton's own do."""
    assert gluon_gemm.available() is None, gluon_gemm.available()
    assert triton_gemm.gluon_failure is None
    base = torch.zeros(256, 640, dtype=torch.int8)
    d1 = gluon_gemm._descriptor(base, (128, 128))
    same = gluon_gemm._descriptor(torch.zeros(256, 640, dtype=torch.int8), (128, 128))
    assert launch.call_key([d1]) == launch.call_key([same])
    assert launch.call_key([d1]) != launch.call_key([gluon_gemm._descriptor(base[:128], (128, 128))])
    hash(launch.call_key([d1]))


def test_interpreter_launches_are_never_cached():
    # The CPU interpreter has no compiled kernel to keep; every call goes through Triton.
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    q1, s1 = triton_quant.per_token_quant(x, torch.int8)
    q2, s2 = triton_quant.per_token_quant(x, torch.int8)
    assert torch.equal(q1, q2) and torch.equal(s1, s2)
    assert triton_quant._per_token_launch.cache == {}
    assert triton_quant._per_token_launch.by_key == {}


def test_next_power_of_2_is_tritons():
    import triton
    for n in list(range(1, 4200)) + [65535, 65536, 65537, 3 << 20]:
        assert launch.next_power_of_2(n) == triton.next_power_of_2(n), n


def _fields(d):
    return {k: v for k, v in vars(d).items() if k != "base"}


def test_descriptor_copies_a_checked_template_onto_the_tensor():
    """launch.descriptor skips the constructor's checks on every call; what it returns must be
    what the constructor gives for the same tensor and block, for both descriptor classes."""
    for make in (launch.tma_descriptor, gluon_gemm._descriptor):
        for t, block in ((torch.zeros(300, 640, dtype=torch.int8), (128, 128)),
                         (torch.zeros(7, 3072, dtype=torch.bfloat16)[:, :2048], (64, 128))):
            built, copied = make(t, block), launch.descriptor(make, t, block)
            assert type(copied) is type(built)
            assert copied.base is t
            assert _fields(copied) == _fields(built), make
            assert launch.call_key([copied]) == launch.call_key([built])
        # the template is shared, its lists are not: a config pre-hook may set a copy's block shape
        a = launch.descriptor(make, torch.zeros(256, 256, dtype=torch.int8), (128, 128))
        b = launch.descriptor(make, torch.zeros(512, 256, dtype=torch.int8), (128, 128))
        a.shape[0] = 1
        a.block_shape[0] = 64
        assert b.shape == [512, 256] and b.block_shape == [128, 128]


def test_launch_hooks_are_seen_as_set_only_when_something_listens():
    from triton import knobs
    chain = knobs.runtime.launch_enter_hook
    assert not launch._hooked(None)
    assert launch._hooked(lambda *args: None)  # Triton <= 3.5 keeps a plain function
    if hasattr(chain, "calls"):  # Triton >= 3.6: a chain of hooks, never None
        assert not launch._hooked(chain)

        def hook(*args):
            pass
        chain.add(hook)
        try:
            assert launch._hooked(chain)
        finally:
            chain.remove(hook)
