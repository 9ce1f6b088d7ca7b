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
