"""Unit tests for quant/formats: the streaming writer, header validation, layout detection and
the normalizing loader. Files are written to tmp_path; the checkpoints are tiny random Wan 2.1
DiTs with the real key layout (scripts/tiny_models.py) converted by quant.convert.

Dequantization bounds are the number-format ones (see test_reference.py): int8 round to nearest
gives |w - q*s| <= s/2; fp8 e4m3 gives half an ulp (2^-4 |w|) in the normal range and s*2^-10
below it; each gets a float32 slack of 1e-5 relative to the value.
"""
from __future__ import annotations

import io
import json
import math
import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quant import reference as R
from quant.convert import convert
from quant.errors import CheckpointError
from quant.formats import detect
from quant.formats.detect import plan_checkpoint
from quant.formats.load import layout_of, load_checkpoint
from quant.formats.safetensors_file import SafetensorsFile, read_header
from quant.formats.writer import PlannedTensor, write_safetensors
from quant.schemes import get_scheme
from scripts.tiny_models import wan21_dit

DIM, FFN, LAYERS = 256, 512, 2
BLOCK_LINEARS = frozenset(
    [f"blocks.{i}.{a}.{p}" for i in range(LAYERS) for a in ("self_attn", "cross_attn") for p in "qkvo"]
    + [f"blocks.{i}.ffn.{j}" for i in range(LAYERS) for j in (0, 2)])
UNQUANTIZED_LINEARS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                       "time_projection.1", "head.head")

FP8_REL = 2.0 ** -4
FP8_SUB_ABS = 2.0 ** -10
F32_SLACK = 1e-5


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def partials(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".partial-")]


def assert_names(err: CheckpointError, path, layer: str | None = None):
    msg = str(err)
    assert str(path) in msg, msg
    assert "Fix:" in msg, msg
    assert err.fix and err.problem
    if layer is not None:
        assert err.layer == layer, msg
        assert f"layer '{layer}'" in msg, msg


# ============================================================== fixtures
@pytest.fixture(scope="module")
def wan_sd():
    return wan21_dit(dim=DIM, ffn_dim=FFN, num_layers=LAYERS)


@pytest.fixture(scope="module")
def wan_src(tmp_path_factory, wan_sd):
    path = tmp_path_factory.mktemp("src") / "wan_bf16.safetensors"
    save_file(wan_sd, str(path), metadata={"config": "{}", "origin": "tiny"})
    return path


CASES = {
    # (scheme asked, layout) -> (canonical scheme in the plan, layout the plan reports)
    ("int8-vllm", "lightx2v"): ("int8-w8a8", detect.LIGHTX2V),
    ("fp8-sgl", "lightx2v"): ("fp8-w8a8", detect.LIGHTX2V),
    ("fp8-b128-deepgemm", "lightx2v"): ("fp8-block128", detect.LIGHTX2V),
    ("fp8-scaled", "comfyui-scaled-fp8"): ("fp8-scaled", detect.COMFY_SCALED_FP8),
    ("fp8-scaled", "comfyui-metadata"): ("fp8-scaled", detect.COMFY_QUANT_METADATA),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, wan_src):
    out_dir = tmp_path_factory.mktemp("converted")
    done = {}

    def get(scheme: str, layout: str):
        if (scheme, layout) not in done:
            dst = out_dir / f"{scheme}-{layout}.safetensors"
            convert(str(wan_src), str(dst), scheme, layout)
            done[scheme, layout] = dst
        return done[scheme, layout]
    return get


# ============================================================== writer
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.float8_e4m3fn, torch.float8_e5m2, torch.bool]


def sample(dtype: torch.dtype, shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 10).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def test_writer_round_trip_matches_safetensors_load_file(tmp_path):
    tensors = {}
    for i, dt in enumerate(DTYPES):
        name = str(dt).replace("torch.", "")
        tensors[name] = sample(dt, (3, 5), seed=i)
        tensors[name + ".scalar"] = sample(dt, (), seed=100 + i)
        tensors[name + ".empty"] = sample(dt, (0, 4), seed=200 + i)
    tensors["odd.length"] = sample(torch.int8, (7,))            # forces unaligned offsets after it
    tensors["after.odd"] = sample(torch.float32, (2, 3))
    meta = {"config": json.dumps({"a": 1}), "quantdit_scheme": "int8-w8a8", "empty": ""}
    path = tmp_path / "rt.safetensors"
    calls = []
    write_safetensors(str(path), [PlannedTensor(k, v.dtype, v.shape, lambda v=v: v.clone())
                                  for k, v in tensors.items()], meta, progress=lambda i, n: calls.append((i, n)))

    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype, k
        assert tuple(loaded[k].shape) == tuple(v.shape), k
        assert raw_bytes(loaded[k]) == raw_bytes(v), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
    n = len(tensors)
    assert calls == [(i, n) for i in range(1, n + 1)]
    # tensor data starts 8-byte aligned; our own reader agrees with the file
    (hlen,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert hlen % 8 == 0
    infos, metadata = read_header(str(path))
    assert metadata == meta and set(infos) == set(tensors)


def test_writer_without_metadata_and_non_contiguous_input(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    path = tmp_path / "nc.safetensors"
    write_safetensors(str(path), [PlannedTensor("t", torch.float32, (6, 4), lambda: base.t())])
    assert torch.equal(load_file(str(path))["t"], base.t().contiguous())
    with safe_open(str(path), framework="pt") as f:
        assert not f.metadata()


@settings(max_examples=25, deadline=None)
@given(specs=st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)),
                      min_size=0, max_size=5))
def test_writer_round_trip_property(tmp_path_factory, specs):
    folder = tmp_path_factory.mktemp("prop")
    tensors = {f"t{i}": sample(dt, tuple(shape), seed=i) for i, (dt, shape) in enumerate(specs)}
    path = folder / "p.safetensors"
    write_safetensors(str(path), [PlannedTensor(k, v.dtype, v.shape, lambda v=v: v) for k, v in tensors.items()],
                      {"k": "v"})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        assert raw_bytes(loaded[k]) == raw_bytes(v)
    assert partials(folder) == []


def _planned_failing_at(index: int, exc: BaseException, n: int = 5):
    def make(i):
        def produce():
            if i == index:
                raise exc
            return torch.full((64, 64), float(i))
        return PlannedTensor(f"t{i}", torch.float32, (64, 64), produce)
    return [make(i) for i in range(n)]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_writer_failure_midway_leaves_no_destination_and_no_temp(tmp_path, exc):
    dst = tmp_path / "out.safetensors"
    with pytest.raises(type(exc)):
        write_safetensors(str(dst), _planned_failing_at(3, exc))
    assert not dst.exists()
    assert partials(tmp_path) == []
    assert os.listdir(tmp_path) == []


def test_writer_failure_keeps_existing_destination_byte_identical(tmp_path):
    dst = tmp_path / "out.safetensors"
    save_file({"old": torch.arange(10, dtype=torch.float32)}, str(dst), metadata={"v": "1"})
    before = dst.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        write_safetensors(str(dst), _planned_failing_at(2, RuntimeError("boom")))
    assert dst.read_bytes() == before
    assert partials(tmp_path) == []
    # and a successful write does replace it
    write_safetensors(str(dst), _planned_failing_at(99, RuntimeError("never")))
    assert set(load_file(str(dst))) == {f"t{i}" for i in range(5)}
    assert partials(tmp_path) == []


@pytest.mark.parametrize("produced", [
    torch.zeros(4, 5, dtype=torch.float32),      # wrong shape
    torch.zeros(4, 4, dtype=torch.bfloat16),     # wrong dtype
    torch.zeros(16, dtype=torch.float32),        # same numel, wrong shape
], ids=["shape", "dtype", "flat"])
def test_writer_rejects_produced_tensor_not_matching_plan(tmp_path, produced):
    dst = tmp_path / "out.safetensors"
    planned = [PlannedTensor("ok", torch.float32, (2,), lambda: torch.ones(2)),
               PlannedTensor("bad", torch.float32, (4, 4), lambda: produced)]
    with pytest.raises(ValueError, match="bad"):
        write_safetensors(str(dst), planned)
    assert not dst.exists()
    assert partials(tmp_path) == []


def test_planned_tensor_nbytes():
    assert PlannedTensor("a", torch.bfloat16, (3, 5), lambda: None).nbytes == 30
    assert PlannedTensor("a", torch.float32, (), lambda: None).nbytes == 4
    assert PlannedTensor("a", torch.float8_e4m3fn, (0, 7), lambda: None).nbytes == 0


# ============================================================== header / open errors
def _write_raw_header(path, header_bytes: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


def _good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(3, 3)}, str(path))
    return path


def _bad_files(tmp_path):
    good = _good_file(tmp_path).read_bytes()
    files = {}

    def add(name, data: bytes):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        files[name] = p

    add("empty", b"")
    add("short", b"\x01\x02\x03")
    add("truncated_data", good[:-10])
    (hlen,) = struct.unpack("<Q", good[:8])
    add("truncated_header", good[: 8 + hlen // 2])
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    add("torch_zip_pickle", buf.getvalue())
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf, _use_new_zipfile_serialization=False)
    add("torch_legacy_pickle", buf.getvalue())
    add("random", bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                      dtype=torch.uint8).tolist()))
    add("zero_length_header", struct.pack("<Q", 0) + b"{}")
    broken = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'   # missing braces
    add("broken_json", struct.pack("<Q", len(broken)) + broken + b"\0" * 8)
    not_utf8 = b'{"\xff\xfe": 1}'
    add("not_utf8", struct.pack("<Q", len(not_utf8)) + not_utf8 + b"\0" * 8)
    as_list = b"[1, 2, 3]"
    add("json_list", struct.pack("<Q", len(as_list)) + as_list + b"\0" * 8)
    no_offsets = json.dumps({"a": {"dtype": "F32", "shape": [2]}}).encode()
    add("no_offsets", struct.pack("<Q", len(no_offsets)) + no_offsets + b"\0" * 8)
    bad_dtype = json.dumps({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}).encode()
    add("unknown_dtype", struct.pack("<Q", len(bad_dtype)) + bad_dtype + b"\0" * 8)
    add("trailing_garbage", good + b"garbage!")
    return files


HEADER_ERRORS = ["empty", "short", "truncated_data", "truncated_header", "torch_zip_pickle",
                 "torch_legacy_pickle", "random", "zero_length_header", "broken_json", "not_utf8",
                 "json_list", "no_offsets"]
OPEN_ERRORS = HEADER_ERRORS + ["unknown_dtype", "trailing_garbage"]


@pytest.mark.parametrize("name", HEADER_ERRORS)
def test_read_header_errors_name_the_file(tmp_path, name):
    path = _bad_files(tmp_path)[name]
    with pytest.raises(CheckpointError) as ei:
        read_header(str(path))
    assert_names(ei.value, path)


@pytest.mark.parametrize("name", OPEN_ERRORS)
def test_safetensors_file_errors_name_the_file(tmp_path, name):
    path = _bad_files(tmp_path)[name]
    with pytest.raises(CheckpointError) as ei:
        SafetensorsFile(str(path))
    assert_names(ei.value, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(path))


def test_error_messages_say_what_is_wrong(tmp_path):
    files = _bad_files(tmp_path)
    for name, word in [("truncated_data", "truncated"), ("torch_zip_pickle", "not a safetensors"),
                       ("broken_json", "not JSON"), ("empty", "shorter")]:
        with pytest.raises(CheckpointError, match=word):
            read_header(str(files[name]))


def test_safetensors_file_reads_good_file(tmp_path):
    path = _good_file(tmp_path)
    f = SafetensorsFile(str(path))
    assert sorted(f.keys()) == ["a", "b"]
    assert f.dtype_name("a") == "F32" and f.shape("b") == (3, 3)
    assert "a" in f and "c" not in f
    assert torch.equal(f.get("a"), torch.arange(64, dtype=torch.float32))


# ============================================================== detection on converted files
@pytest.mark.parametrize("case", list(CASES), ids=[f"{s}-{l}" for s, l in CASES])
def test_plan_of_converted_file(converted, case):
    path = converted(*case)
    scheme, layout = CASES[case]
    f = SafetensorsFile(str(path))
    plan = plan_checkpoint(f)
    assert plan.is_quantized
    assert set(plan.layers) == BLOCK_LINEARS
    assert plan.layouts() == {layout}
    assert plan.scheme_counts() == {scheme: len(BLOCK_LINEARS)}
    for name, q in plan.layers.items():
        assert q.layer == name and q.scheme == scheme and q.layout == layout
        assert q.weight_key == name + ".weight"
        assert q.scale_key in f
        assert q.shape == f.shape(q.weight_key)
        expected_dt = "I8" if scheme.startswith("int8") else "F8_E4M3"
        assert f.dtype_name(q.weight_key) == expected_dt
    # embeddings, time projection, head, norms, modulation stay in bf16
    for name in UNQUANTIZED_LINEARS:
        assert name not in plan.layers
        assert f.dtype_name(name + ".weight") == "BF16"
    for key in ("patch_embedding.weight", "blocks.0.modulation", "blocks.1.norm3.weight",
                "blocks.0.self_attn.norm_q.weight", "head.modulation"):
        assert f.dtype_name(key) == "BF16", key
    assert layout_of(plan) == layout
    if layout == detect.COMFY_SCALED_FP8:
        assert plan.ignored_keys == ["scaled_fp8"]
    else:
        assert plan.ignored_keys == []


def test_plan_of_unquantized_file(wan_src):
    plan = plan_checkpoint(SafetensorsFile(str(wan_src)))
    assert not plan.is_quantized and plan.layers == {}
    assert layout_of(plan) == "unquantized"


def _fp8_cast_sd(wan_sd):
    return {k: (v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.dim() == 2 else v)
            for k, v in wan_sd.items()}


def test_plain_fp8_cast_file(tmp_path, wan_sd):
    sd = _fp8_cast_sd(wan_sd)
    cast_keys = {k for k, v in sd.items() if v.dtype == torch.float8_e4m3fn}
    assert {k[: -len(".weight")] for k in cast_keys} == BLOCK_LINEARS
    path = tmp_path / "cast.safetensors"
    save_file(sd, str(path))
    plan = plan_checkpoint(SafetensorsFile(str(path)))
    assert set(plan.layers) == BLOCK_LINEARS
    assert plan.layouts() == {detect.FP8_CAST}
    assert all(q.scheme == "fp8-scaled" and q.scale_key is None for q in plan.layers.values())
    loaded, plan2, _ = load_checkpoint(str(path))
    for name in BLOCK_LINEARS:
        s = loaded[name + ".weight_scale"]
        assert s.dtype == torch.float32 and s.shape == () and s.item() == 1.0
        assert loaded[name + ".weight"].dtype == torch.float8_e4m3fn
        w = R.dequantize_weight(loaded[name + ".weight"], s, get_scheme("fp8-scaled"), plan2.layers[name].shape[1])
        assert torch.equal(w, sd[name + ".weight"].float())


# -------------------------------------------------------------- detection errors
def _q_layer(out_f=32, in_f=64, dtype=torch.int8):
    return torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8).to(dtype) if dtype == torch.int8 else \
        torch.randn(out_f, in_f).to(dtype)


def _error_files(tmp_path):
    L = "blocks.0.self_attn.q"
    ok_scale = torch.rand(32, 1) + 0.01
    cases = {
        "int8_no_scale": ({L + ".weight": _q_layer()}, None),
        "int8_no_scale_other_scaled": ({L + ".weight": _q_layer(), "blocks.0.ffn.0.weight": _q_layer(),
                                        "blocks.0.ffn.0.weight_scale": ok_scale}, None),
        "fp8_no_scale_other_scaled": ({L + ".weight": _q_layer(dtype=torch.float8_e4m3fn),
                                       "blocks.0.ffn.0.weight": _q_layer(dtype=torch.float8_e4m3fn),
                                       "blocks.0.ffn.0.weight_scale": ok_scale}, None),
        "bf16_with_scale": ({L + ".weight": torch.randn(32, 64, dtype=torch.bfloat16),
                             L + ".weight_scale": ok_scale}, None),
        "scale_out_by_2": ({L + ".weight": _q_layer(), L + ".weight_scale": torch.rand(32, 2)}, None),
        "fp8_scale_out_by_2": ({L + ".weight": _q_layer(dtype=torch.float8_e4m3fn),
                                L + ".weight_scale": torch.rand(32, 2)}, None),
        "int8_scalar_scale": ({L + ".weight": _q_layer(), L + ".weight_scale": torch.rand(())}, None),
        "int16_weight": ({L + ".weight": torch.zeros(32, 64, dtype=torch.int16)}, None),
        "int8_4d": ({L + ".weight": torch.zeros(32, 16, 1, 2, dtype=torch.int8),
                     L + ".weight_scale": ok_scale}, None),
        "int8_4d_no_scale": ({L + ".weight": torch.zeros(32, 16, 1, 2, dtype=torch.int8)}, None),
        "scaled_fp8_no_scale_weight": ({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
                                        "blocks.0.ffn.0.weight": _q_layer(dtype=torch.float8_e4m3fn),
                                        "blocks.0.ffn.0.scale_weight": torch.tensor(0.5),
                                        L + ".weight": _q_layer(dtype=torch.float8_e4m3fn)}, None),
        "scaled_fp8_vector_scale": ({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
                                     L + ".weight": _q_layer(dtype=torch.float8_e4m3fn),
                                     L + ".scale_weight": torch.rand(32)}, None),
        "scaled_fp8_stray_int8": ({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
                                   L + ".weight": _q_layer()}, None),
        "metadata_unknown_format": ({L + ".weight": _q_layer(dtype=torch.float8_e4m3fn),
                                     L + ".weight_scale": torch.tensor(1.0)},
                                    {"_quantization_metadata": json.dumps({"layers": {L: {"format": "nvfp4"}}})}),
        "metadata_missing_weight": ({"x.weight": torch.zeros(2, 2)},
                                    {"_quantization_metadata": json.dumps(
                                        {"layers": {L: {"format": "float8_e4m3fn"}}})}),
        "metadata_weight_not_fp8": ({L + ".weight": torch.zeros(32, 64, dtype=torch.bfloat16),
                                     L + ".weight_scale": torch.tensor(1.0)},
                                    {"_quantization_metadata": json.dumps(
                                        {"layers": {L: {"format": "float8_e4m3fn"}}})}),
        "metadata_no_scale": ({L + ".weight": _q_layer(dtype=torch.float8_e4m3fn)},
                              {"_quantization_metadata": json.dumps({"layers": {L: {"format": "float8_e4m3fn"}}})}),
        "metadata_unlisted_fp8": ({L + ".weight": _q_layer(dtype=torch.float8_e4m3fn),
                                   L + ".weight_scale": torch.tensor(1.0)},
                                  {"_quantization_metadata": json.dumps({"layers": {}})}),
    }
    out = {}
    for name, (sd, meta) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_file(sd, str(p), metadata=meta)
        out[name] = p
    return out


LAYER_ERRORS = {
    "int8_no_scale": ("blocks.0.self_attn.q", "weight_scale"),
    "int8_no_scale_other_scaled": ("blocks.0.self_attn.q", "weight_scale"),
    "fp8_no_scale_other_scaled": ("blocks.0.self_attn.q", "weight_scale"),
    "bf16_with_scale": ("blocks.0.self_attn.q", "half-converted"),
    "scale_out_by_2": ("blocks.0.self_attn.q", r"\[32, 2\]"),
    "fp8_scale_out_by_2": ("blocks.0.self_attn.q", r"\[32, 2\]"),
    "int8_scalar_scale": ("blocks.0.self_attn.q", "per channel"),
    "int16_weight": ("blocks.0.self_attn.q", "I16"),
    "int8_4d": ("blocks.0.self_attn.q", r"\[32, 16, 1, 2\]"),
    "int8_4d_no_scale": ("blocks.0.self_attn.q", "2-D"),
    "scaled_fp8_no_scale_weight": ("blocks.0.self_attn.q", "scale_weight"),
    "scaled_fp8_vector_scale": ("blocks.0.self_attn.q", "scalar"),
    "scaled_fp8_stray_int8": ("blocks.0.self_attn.q", "I8"),
    "metadata_unknown_format": ("blocks.0.self_attn.q", "nvfp4"),
    "metadata_missing_weight": ("blocks.0.self_attn.q", "no weight"),
    "metadata_weight_not_fp8": ("blocks.0.self_attn.q", "BF16"),
    "metadata_no_scale": ("blocks.0.self_attn.q", "weight_scale"),
    "metadata_unlisted_fp8": ("blocks.0.self_attn.q", "F8_E4M3"),
}


@pytest.mark.parametrize("name", list(LAYER_ERRORS))
def test_plan_errors_name_the_layer(tmp_path, name):
    path = _error_files(tmp_path)[name]
    layer, word = LAYER_ERRORS[name]
    with pytest.raises(CheckpointError, match=word) as ei:
        plan_checkpoint(SafetensorsFile(str(path)))
    assert_names(ei.value, path, layer)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(path))


@pytest.mark.parametrize("meta", ["{not json", json.dumps({"format_version": "1.0"}), json.dumps([1, 2]),
                                  json.dumps({"layers": ["blocks.0.self_attn.q"]})],
                         ids=["broken", "no_layers", "list", "layers_list"])
def test_invalid_quantization_metadata(tmp_path, meta):
    path = tmp_path / "m.safetensors"
    save_file({"blocks.0.self_attn.q.weight": _q_layer(dtype=torch.float8_e4m3fn),
               "blocks.0.self_attn.q.weight_scale": torch.tensor(1.0)}, str(path),
              metadata={"_quantization_metadata": meta})
    with pytest.raises(CheckpointError, match="_quantization_metadata") as ei:
        plan_checkpoint(SafetensorsFile(str(path)))
    assert_names(ei.value, path)


# ============================================================== load_checkpoint
def test_load_per_channel_scale_shapes_normalized(tmp_path):
    torch.manual_seed(0)
    w1, w2 = _q_layer(), _q_layer(dtype=torch.float8_e4m3fn)
    s1 = torch.rand(32) + 0.01                                   # [out] float32
    s2 = (torch.rand(32, 1) + 0.01).to(torch.bfloat16)           # [out, 1] bf16
    path = tmp_path / "pc.safetensors"
    save_file({"blocks.0.ffn.0.weight": w1, "blocks.0.ffn.0.weight_scale": s1,
               "blocks.0.ffn.2.weight": w2, "blocks.0.ffn.2.weight_scale": s2,
               "blocks.0.ffn.2.bias": torch.ones(32, dtype=torch.bfloat16)}, str(path))
    sd, plan, meta = load_checkpoint(str(path))
    assert plan.layers["blocks.0.ffn.0"].scheme == "int8-w8a8"
    assert plan.layers["blocks.0.ffn.2"].scheme == "fp8-w8a8"
    for layer, s in (("blocks.0.ffn.0", s1), ("blocks.0.ffn.2", s2)):
        got = sd[layer + ".weight_scale"]
        assert got.dtype == torch.float32 and tuple(got.shape) == (32, 1)
        assert torch.equal(got, s.float().reshape(32, 1))
    assert torch.equal(sd["blocks.0.ffn.0.weight"], w1)
    assert sd["blocks.0.ffn.2.bias"].dtype == torch.bfloat16
    assert set(sd) == {"blocks.0.ffn.0.weight", "blocks.0.ffn.0.weight_scale", "blocks.0.ffn.2.weight",
                       "blocks.0.ffn.2.weight_scale", "blocks.0.ffn.2.bias"}
    assert meta == {}


@pytest.mark.parametrize("scale_shape", [(), (1,), (1, 1)])
def test_load_per_tensor_scale_is_scalar(tmp_path, scale_shape):
    path = tmp_path / "pt.safetensors"
    save_file({"blocks.0.ffn.0.weight": _q_layer(out_f=256, in_f=256, dtype=torch.float8_e4m3fn),
               "blocks.0.ffn.0.weight_scale": torch.full(scale_shape, 0.25, dtype=torch.bfloat16)}, str(path))
    sd, plan, _ = load_checkpoint(str(path))
    assert plan.layers["blocks.0.ffn.0"].scheme == "fp8-scaled"
    s = sd["blocks.0.ffn.0.weight_scale"]
    assert s.dtype == torch.float32 and s.shape == () and s.item() == 0.25


def test_load_comfy_scaled_fp8_renames_and_drops(tmp_path):
    L = "blocks.0.self_attn.q"
    w = _q_layer(dtype=torch.float8_e4m3fn)
    path = tmp_path / "comfy.safetensors"
    save_file({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
               L + ".weight": w, L + ".scale_weight": torch.tensor([0.5]), L + ".scale_input": torch.tensor(2.0),
               L + ".bias": torch.zeros(32, dtype=torch.bfloat16),
               "head.head.weight": torch.zeros(4, 32, dtype=torch.bfloat16),
               "head.head.scale_input": torch.tensor(3.0)},   # layer not quantized: kept as it is
              str(path))
    sd, plan, _ = load_checkpoint(str(path))
    assert set(plan.layers) == {L} and plan.layouts() == {detect.COMFY_SCALED_FP8}
    assert set(sd) == {L + ".weight", L + ".weight_scale", L + ".bias", "head.head.weight",
                       "head.head.scale_input"}
    s = sd[L + ".weight_scale"]
    assert s.dtype == torch.float32 and s.shape == () and s.item() == 0.5
    assert raw_bytes(sd[L + ".weight"]) == raw_bytes(w)


def test_load_converted_comfy_files(converted):
    for layout in ("comfyui-scaled-fp8", "comfyui-metadata"):
        sd, plan, meta = load_checkpoint(str(converted("fp8-scaled", layout)))
        assert not any(k.endswith(".scale_weight") or k.endswith("scaled_fp8") for k in sd)
        for name in BLOCK_LINEARS:
            assert sd[name + ".weight_scale"].shape == ()
            assert sd[name + ".weight_scale"].dtype == torch.float32
        assert meta["quantdit_scheme"] == "fp8-scaled"
        assert ("_quantization_metadata" in meta) == (layout == "comfyui-metadata")


def _bound(scheme_name: str, w: torch.Tensor, s_full: torch.Tensor) -> torch.Tensor:
    if scheme_name.startswith("int8"):
        return s_full / 2 + F32_SLACK * w.abs()
    return FP8_REL * w.abs() + FP8_SUB_ABS * s_full + F32_SLACK * w.abs() + 1e-30


def _full_scale(scale, scheme, n, k):
    if scheme == "fp8-block128":
        rows, cols = torch.arange(n) // 128, torch.arange(k) // 128
        return scale.float()[rows][:, cols]
    return scale.float().reshape(-1, 1).expand(n, k) if scale.dim() else scale.float().expand(n, k)


@pytest.mark.parametrize("case", list(CASES), ids=[f"{s}-{l}" for s, l in CASES])
def test_load_dequantizes_close_to_original(converted, wan_sd, case):
    scheme_name, _ = CASES[case]
    sd, plan, meta = load_checkpoint(str(converted(*case)))
    scheme = get_scheme(scheme_name)
    for name in BLOCK_LINEARS:
        n, k = plan.layers[name].shape
        scale = sd[name + ".weight_scale"]
        assert scale.dtype == torch.float32
        expected_shape = {"int8-w8a8": (n, 1), "fp8-w8a8": (n, 1), "fp8-scaled": (),
                          "fp8-block128": (math.ceil(n / 128), math.ceil(k / 128))}[scheme_name]
        assert tuple(scale.shape) == expected_shape
        w = wan_sd[name + ".weight"].float()
        deq = R.dequantize_weight(sd[name + ".weight"], scale, scheme, k)
        err = (deq - w).abs()
        bound = _bound(scheme_name, w, _full_scale(scale, scheme_name, n, k))
        assert (err <= bound).all(), f"{name}: max excess {(err - bound).max().item()}"
        assert err.max() > 0  # it really was quantized
    for key in ("text_embedding.0.weight", "head.head.weight", "blocks.0.modulation", "patch_embedding.weight",
                "blocks.0.ffn.0.bias", "blocks.1.cross_attn.norm_k.weight"):
        assert sd[key].dtype == torch.bfloat16
        assert torch.equal(sd[key], wan_sd[key])
    assert meta["config"] == "{}" and meta["origin"] == "tiny"
