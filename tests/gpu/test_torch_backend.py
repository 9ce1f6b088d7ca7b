"""The torch-native CUDA kernels against quant/reference.py (run on the GPU machine)."""
import pytest
import torch

from quant import reference
from quant.backends import get_backend
from quant.schemes import get_scheme

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), 0))


@pytest.mark.parametrize("m,k,n", [(256, 1536, 1536), (4096, 1536, 8960), (77, 5120, 13824), (33, 64, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_rowwise_scaled_mm_matches_reference(m, k, n, bias):
    torch.manual_seed(0)
    scheme = get_scheme("fp8-w8a8")
    w = torch.randn(n, k, device=DEV) / k ** 0.5
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, device=DEV, dtype=torch.bfloat16) if bias else None
    q, s = reference.quantize_weight(w, scheme)
    fast = get_backend("torch").linear(x, q, s, b, scheme, k)
    ref = reference.emulated_linear(x, q, s, scheme, b, k)
    assert fast.dtype == torch.bfloat16 and fast.shape == (m, n)
    # Same quantized operands; only fp32 accumulation order and the bf16 output rounding differ.
    assert cos(fast, ref) > 0.99999
    assert float((fast.float() - ref.float()).abs().max()) <= 0.02 * float(ref.float().abs().max())
    # And the quantized result is close to the unquantized one.
    exact = x.float() @ w.t() + (b.float() if bias else 0)
    assert cos(fast, exact) > 0.999


@pytest.mark.parametrize("name", ["fp8-weight-only", "int8-weight-only", "fp8-scaled",
                                  "fp8-e5m2-weight-only", "fp8-e5m2-scaled"])
def test_weight_only_upcast_matches_reference(name):
    torch.manual_seed(1)
    scheme = get_scheme(name)
    w = torch.randn(1024, 512, device=DEV) / 512 ** 0.5
    x = torch.randn(300, 512, device=DEV, dtype=torch.bfloat16)
    q, s = reference.quantize_weight(w, scheme)
    fast = get_backend("torch").linear(x, q, s, None, scheme, 512)
    ref = reference.emulated_linear(x, q, s, scheme, None, 512)
    assert cos(fast, ref) > 0.9999
