"""int4-g128 in Marlin's layout (quant/backends/marlin_layout.py) and the vllm backend's Marlin
bookkeeping, on the CPU. The kernel itself runs in tests/gpu/test_kernel_backends.py."""
from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from quant import reference
from quant.backends import marlin_layout as marlin
from quant.backends import registry, triton_backend, vllm_backend
from quant.schemes import get_scheme

INT4 = get_scheme("int4-g128")
CUDA = torch.device("cuda", 0)


def _int4_weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return reference.quantize_weight(torch.randn(n, k, generator=g), INT4)


def _unpack_gptq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [K/8, N], 8 unsigned nibbles per int32 along K, value = q + 8 -> int8 q [N, K]:
    written from the GPTQ definition with shifts, independently of the byte view the module uses."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=1)  # [K/8, 8, N]
    return (nibbles.reshape(-1, packed.shape[1]) - 8).t().to(torch.int8)


# ------------------------------------------------------------------ weight
@pytest.mark.parametrize("n,k", [(64, 128), (192, 384), (256, 3072), (13824 // 16, 5120)])
def test_gptq_packing_round_trips_to_our_int4_values(n, k):
    qdata, _ = _int4_weight(n, k)
    packed = marlin.gptq_weight(qdata)
    assert packed.dtype == torch.int32 and packed.shape == (k // 8, n) and packed.is_contiguous()
    assert torch.equal(_unpack_gptq(packed), reference.unpack_int4(qdata, k))


def test_gptq_packing_covers_every_int4_value_at_every_position():
    # Each row of 8 columns cycles through all 16 values, shifted per row: every nibble slot sees
    # -8..7, so a wrong bias or nibble order cannot hide.
    n, k = 16, 128
    q = ((torch.arange(k)[None, :] + torch.arange(n)[:, None]) % 16 - 8).to(torch.int8)
    packed = marlin.gptq_weight(reference.pack_int4(q))
    assert torch.equal(_unpack_gptq(packed), q)
    # q = -8 is stored as 0, q = 7 as 15: the first int32 of column 0 holds k = 0..7 = -8..-1 -> 0..7
    assert int(packed[0, 0]) == sum(i << (4 * i) for i in range(8))


def test_gptq_packing_refuses_what_it_cannot_view():
    with pytest.raises(ValueError, match="K % 8"):
        marlin.gptq_weight(torch.zeros(64, 6, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        marlin.gptq_weight(torch.zeros(64, 64, dtype=torch.int8))


# ------------------------------------------------------------------ scales and bias
def _vllm_scale_perms():
    """The two index lists as vLLM's marlin_utils.get_scale_perms defines them (grouped, one group)."""
    grouped = [i + 8 * j for i in range(8) for j in range(8)]
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return grouped, single


@pytest.mark.parametrize("n,k", [(64, 256), (256, 3072), (13824, 5120)])
def test_grouped_scale_shuffle_is_vllms_permutation(n, k):
    groups = k // 128
    scale = torch.arange(n * groups, dtype=torch.float32).reshape(n, groups)  # every value distinct
    out = marlin.marlin_scales(scale, torch.float32)
    assert out.shape == (groups, n) and out.is_contiguous()
    grouped, _ = _vllm_scale_perms()
    expect = scale.t().reshape(-1, 64)[:, grouped].reshape(groups, n)
    assert torch.equal(out, expect)
    # a permutation within each block of 64 columns of each group row: nothing lost or repeated
    blocks_in = scale.t().reshape(groups, -1, 64).sort(dim=-1).values
    assert torch.equal(out.reshape(groups, -1, 64).sort(dim=-1).values, blocks_in)


def test_one_group_uses_the_per_channel_order_and_bias_follows_it():
    n = 128
    scale = torch.arange(n, dtype=torch.float32).reshape(n, 1)   # K == 128: a single group
    _, single = _vllm_scale_perms()
    out = marlin.marlin_scales(scale, torch.float32)
    assert out.shape == (1, n)
    assert torch.equal(out[0], scale[:, 0].reshape(-1, 32)[:, single].reshape(-1))
    bias = torch.arange(n, dtype=torch.float32) * 3
    assert torch.equal(marlin.marlin_bias(bias), bias.reshape(-1, 32)[:, single].reshape(-1))
    assert sorted(marlin.marlin_bias(bias).tolist()) == bias.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scales_come_in_the_activation_dtype(dtype):
    _, scale = _int4_weight(128, 512)
    out = marlin.marlin_scales(scale, dtype)
    assert out.dtype == dtype
    assert torch.equal(out.float().flatten().sort().values, scale.to(dtype).float().flatten().sort().values)


# ------------------------------------------------------------------ scalar type, shapes, workspace
def test_uint4b8_scalar_type_id():
    # vllm/scalar_type.py: ScalarType.id packs, from bit 0, exponent:8 mantissa:8 signed:1 bias:32
    # finite_values_only:1 nan_repr:8; `scalar_types.uint4b8 = ScalarType.uint(4, 8)` is exponent 0,
    # mantissa 4, unsigned, bias 8, nan_repr IEEE_754 (= 1, the dataclass default). By hand:
    # 4 << 8 = 0x400, 8 << 17 = 0x100000, 1 << 50 = 0x4000000000000.
    assert marlin.UINT4B8_ID == (4 << 8) + (8 << 17) + (1 << 50) == 0x4000000100400 == 1125899907892224
    # The same rule gives the ids of the activation types that appear, with it, in the template
    # arguments of the Marlin kernels compiled into vLLM 0.33.0's library (read with `strings`).
    assert marlin.scalar_type_id(5, 10, True, 0) == 1125899906910725   # float16
    assert marlin.scalar_type_id(8, 7, True, 0) == 1125899906909960    # bfloat16


@pytest.mark.parametrize("n,k,ok", [(3072, 3072, True), (13824, 5120, True), (256, 384, True), (64, 128, True),
                                    (96, 3072, False), (3072, 3000, False), (3072, 64, False), (0, 128, False)])
def test_marlin_shape_rule(n, k, ok):
    assert marlin.shape_ok(n, k) is ok


def test_workspace_is_one_lock_per_multiprocessor():
    assert marlin.workspace_numel(132) == 132


# ------------------------------------------------------------------ registry reports (faked GPU)
def _fake_vllm(monkeypatch, capability, ops):
    monkeypatch.setattr(vllm_backend, "cuda_capability", lambda d: capability if d.type == "cuda" else None)
    b = registry._BACKENDS["vllm"]
    monkeypatch.setitem(registry._BACKENDS, "vllm", dataclasses.replace(b, availability=lambda: None))
    monkeypatch.setattr(torch.ops._C, "cutlass_scaled_mm_supports_block_fp8", lambda cap: cap >= 90, raising=False)
    for op in ops:
        monkeypatch.setattr(torch.ops._C, op, lambda *a: None, raising=False)


def test_int4_runs_on_vllm_when_marlin_ops_are_there(monkeypatch):
    _fake_vllm(monkeypatch, (8, 0), vllm_backend._CUTLASS_OPS + vllm_backend._MARLIN_OPS)
    assert registry.why_not("vllm", INT4, CUDA) is None


def test_a_library_without_marlin_ops_only_loses_int4(monkeypatch):
    _fake_vllm(monkeypatch, (9, 0), vllm_backend._CUTLASS_OPS)
    why = registry.why_not("vllm", INT4, CUDA)
    assert "marlin_gemm" in why and "gptq_marlin_repack" in why and "int4-g128" in why
    for name in ("int8-w8a8", "fp8-w8a8", "fp8-block128"):
        assert registry.why_not("vllm", get_scheme(name), CUDA) is None, name


def test_a_library_without_cutlass_ops_still_runs_int4(monkeypatch):
    _fake_vllm(monkeypatch, (9, 0), vllm_backend._MARLIN_OPS + ("dynamic_scaled_int8_quant",))
    assert registry.why_not("vllm", INT4, CUDA) is None
    why = registry.why_not("vllm", get_scheme("int8-w8a8"), CUDA)
    assert "cutlass_scaled_mm" in why and "dynamic_scaled_int8_quant" not in why
    assert vllm_backend._has_ops()


def test_auto_keeps_triton_for_int4_and_named_vllm_runs_marlin(monkeypatch):
    _fake_vllm(monkeypatch, (9, 0), vllm_backend._CUTLASS_OPS + vllm_backend._MARLIN_OPS)
    monkeypatch.setattr(triton_backend, "cuda_capability", lambda d: (9, 0))
    monkeypatch.setitem(registry._BACKENDS, "triton", dataclasses.replace(registry._BACKENDS["triton"],
                                                                          availability=lambda: None))
    assert registry.pick_backend(INT4, CUDA).name == "triton"
    assert registry.pick_backend(INT4, CUDA, preferred="vllm", strict=True).name == "vllm"
    assert registry.pick_backend(get_scheme("int8-w8a8"), CUDA).name == "vllm"   # only int4 ranks lower


def test_int4_on_vllm_needs_ampere(monkeypatch):
    _fake_vllm(monkeypatch, (7, 5), vllm_backend._MARLIN_OPS)
    why = registry.why_not("vllm", INT4, CUDA)
    assert "8.0" in why and "7.5" in why


def test_library_with_neither_family_is_reported_at_load(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("QUANTDIT_VLLM_LIB", str(tmp_path / "lib.so"))
    (tmp_path / "lib.so").write_bytes(b"")
    monkeypatch.setattr(vllm_backend.torch.ops, "load_library", lambda path: None)
    try:
        vllm_backend._load.cache_clear()
        why = vllm_backend._load()
        assert "has none of the ops" in why and "marlin_gemm" in why and "cutlass_scaled_mm" in why
    finally:
        vllm_backend._load.cache_clear()


def test_unsupported_shapes_fall_back_to_the_reference():
    qdata, scale = _int4_weight(96, 256)   # N = 96 is no multiple of 64: Marlin would refuse it
    x = torch.randn(5, 256).to(torch.bfloat16)
    y = vllm_backend._linear(x, qdata, scale, None, INT4, 256)
    assert torch.equal(y, reference.emulated_linear(x, qdata, scale, INT4, None, 256))


# ------------------------------------------------------------------ the repack cache (fake repack op)
@pytest.fixture
def fake_repack(monkeypatch):
    calls = []

    def repack(b_q_weight, size_k, size_n, num_bits, is_a_8bit):
        calls.append((tuple(b_q_weight.shape), size_k, size_n, num_bits, is_a_8bit))
        return b_q_weight.clone()

    monkeypatch.setattr(torch.ops._C, "gptq_marlin_repack", repack, raising=False)
    monkeypatch.setattr(vllm_backend, "_MARLIN_CACHE", vllm_backend.WeakIdKeyDictionary())
    return calls


def test_repack_happens_once_per_weight(fake_repack):
    qdata, scale = _int4_weight(128, 256)
    w1, s1, _ = vllm_backend._marlin_weights(qdata, scale, None, 256, torch.bfloat16)
    w2, s2, _ = vllm_backend._marlin_weights(qdata, scale, None, 256, torch.bfloat16)
    assert w1 is w2 and s1 is s2
    assert fake_repack == [((32, 128), 256, 128, 4, False)]
    assert len(vllm_backend._MARLIN_CACHE) == 1
    assert torch.equal(s1, marlin.marlin_scales(scale, torch.bfloat16))


def test_in_place_writes_and_other_dtypes_repack(fake_repack):
    qdata, scale = _int4_weight(128, 256)
    w1, _, _ = vllm_backend._marlin_weights(qdata, scale, None, 256, torch.bfloat16)
    other, _ = _int4_weight(128, 256, seed=1)
    qdata.copy_(other)                       # what an in-place LoRA patch does
    w2, _, _ = vllm_backend._marlin_weights(qdata, scale, None, 256, torch.bfloat16)
    assert w2 is not w1 and torch.equal(w2, marlin.gptq_weight(other))
    _, s16, _ = vllm_backend._marlin_weights(qdata, scale, None, 256, torch.float16)
    assert s16.dtype == torch.float16 and len(fake_repack) == 3
    assert len(vllm_backend._MARLIN_CACHE) == 1   # still one weight


def test_cache_entry_goes_with_the_weight_memory(fake_repack):
    layer = torch.nn.Module()
    qdata, scale = _int4_weight(128, 256)
    layer.weight = torch.nn.Parameter(qdata, requires_grad=False)
    del qdata
    vllm_backend._marlin_weights(layer.weight, scale, None, 256, torch.bfloat16)
    assert len(vllm_backend._MARLIN_CACHE) == 1
    layer.weight.data = layer.weight.data.clone()   # what Module.to(other device) does to a Parameter
    gc.collect()
    assert len(vllm_backend._MARLIN_CACHE) == 0     # the old memory, and its Marlin copy, are gone
    vllm_backend._marlin_weights(layer.weight, scale, None, 256, torch.bfloat16)
    del layer
    gc.collect()
    assert len(vllm_backend._MARLIN_CACHE) == 0 and len(fake_repack) == 2
