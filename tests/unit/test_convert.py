"""Unit tests for quant/convert.py: the streaming bf16 -> quantized converter and its CLI."""
from __future__ import annotations

import gc
import json
import hashlib
import os
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import quant.convert as convert_module
from quant.convert import LAYOUTS, convert, main
from quant.errors import CheckpointError
from quant.filters import LayerFilter
from quant.formats.detect import LIGHTX2V, plan_checkpoint
from quant.formats.load import load_checkpoint
from quant.formats.safetensors_file import SafetensorsFile
from quant.formats.writer import PlannedTensor
from scripts.tiny_models import wan21_dit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIM, FFN, LAYERS = 256, 512, 2
BLOCK_LINEARS = frozenset(
    [f"blocks.{i}.{a}.{p}" for i in range(LAYERS) for a in ("self_attn", "cross_attn") for p in "qkvo"]
    + [f"blocks.{i}.ffn.{j}" for i in range(LAYERS) for j in (0, 2)])
OUTSIDE_LINEARS = frozenset(["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                             "time_projection.1", "head.head"])
SRC_META = {"config": '{"transformer": {"text_dim": 4096}}', "modelspec.title": "tiny wan"}


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def partials(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".partial-")]


@pytest.fixture(scope="module")
def wan_sd():
    return wan21_dit(dim=DIM, ffn_dim=FFN, num_layers=LAYERS)


@pytest.fixture
def src(tmp_path, wan_sd):
    path = tmp_path / "wan_bf16.safetensors"
    save_file(wan_sd, str(path), metadata=SRC_META)
    return path


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("spelling", ["same", "dotted", "relative"])
def test_refuses_dst_equal_to_src(src, spelling, monkeypatch):
    before = sha(src)
    dst = {"same": str(src), "dotted": os.path.join(str(src.parent), ".", src.name)}.get(spelling)
    if spelling == "relative":
        monkeypatch.chdir(src.parent)
        dst = src.name
    with pytest.raises(CheckpointError, match="source") as ei:
        convert(str(src), dst, "int8-vllm")
    assert str(src) in str(ei.value) and "Fix:" in str(ei.value)
    assert sha(src) == before
    assert partials(src.parent) == []


def test_refuses_dst_that_is_the_source_through_a_symlink(src, tmp_path):
    """dst is the real file, src a link to it: the source checkpoint must not be replaced."""
    link = tmp_path / "link.safetensors"
    os.symlink(src, link)
    before = sha(src)
    with pytest.raises(CheckpointError):
        convert(str(link), str(src), "int8-vllm")
    assert sha(src) == before and not os.path.islink(src)
    with pytest.raises(CheckpointError):
        convert(str(src), str(link), "int8-vllm")
    assert sha(src) == before and os.path.islink(link)
    assert partials(tmp_path) == []


def test_refuses_already_quantized_source(src, tmp_path):
    q = tmp_path / "q.safetensors"
    convert(str(src), str(q), "int8-vllm")
    before = sha(q)
    for scheme, layout in (("int8-vllm", "lightx2v"), ("fp8-scaled", "comfyui-scaled-fp8")):
        dst = tmp_path / f"qq-{layout}.safetensors"
        with pytest.raises(CheckpointError, match="already quantized") as ei:
            convert(str(q), str(dst), scheme, layout)
        assert str(q) in str(ei.value) and "Fix:" in str(ei.value)
        assert not dst.exists()
    assert sha(q) == before
    assert partials(tmp_path) == []


@pytest.mark.parametrize("scheme,layout,valid", [
    ("int8-vllm", "comfyui-scaled-fp8", ["fp8-scaled"]),
    ("fp8-sgl", "comfyui-metadata", ["fp8-scaled"]),
    ("fp8-scaled", "lightx2v", ["int8-w8a8", "fp8-w8a8", "fp8-block128"]),
    ("int4-g128-marlin", "lightx2v", ["int8-w8a8", "fp8-w8a8", "fp8-block128"]),
    ("fp8-sgl", "comfyui", ["int8-w8a8", "fp8-scaled"]),
    ("int8-vllm", "gguf", list(LAYOUTS)),
])
def test_refuses_scheme_layout_mismatch(src, tmp_path, scheme, layout, valid):
    dst = tmp_path / "out.safetensors"
    with pytest.raises(ValueError) as ei:
        convert(str(src), str(dst), scheme, layout)
    assert not isinstance(ei.value, CheckpointError)
    for name in valid:
        assert name in str(ei.value), str(ei.value)
    assert layout in str(ei.value)
    assert not dst.exists() and partials(tmp_path) == []


def test_refuses_unknown_scheme(src, tmp_path):
    dst = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="int8-w8a8"):
        convert(str(src), str(dst), "int3-magic")
    assert not dst.exists()


def test_refuses_non_safetensors_source(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="Fix:"):
        convert(str(bad), str(tmp_path / "out.safetensors"), "int8-vllm")
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------ the report and the output
def test_report_and_output(src, tmp_path, wan_sd):
    dst = tmp_path / "int8.safetensors"
    report = convert(str(src), str(dst), "int8-vllm")
    assert len(report["quantized"]) == len(set(report["quantized"]))
    assert set(report["quantized"]) == BLOCK_LINEARS
    assert set(report["skipped"]) == OUTSIDE_LINEARS
    for layer, reason in report["skipped"].items():
        assert isinstance(reason, str) and "outside the transformer blocks" in reason, (layer, reason)

    out = load_file(str(dst))
    expected_keys = set(wan_sd) | {n + ".weight_scale" for n in BLOCK_LINEARS}
    assert set(out) == expected_keys
    for key, v in wan_sd.items():
        layer = key[: -len(".weight")]
        if layer in BLOCK_LINEARS:
            assert out[key].dtype == torch.int8 and out[key].shape == v.shape
            assert out[layer + ".weight_scale"].dtype == torch.float32
            assert out[layer + ".weight_scale"].shape == (v.shape[0], 1)
        else:
            assert out[key].dtype == v.dtype and torch.equal(out[key], v), key
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert meta == {**SRC_META, "quantdit_scheme": "int8-w8a8"}
    assert partials(tmp_path) == []


def test_report_lists_norm_and_user_skips(tmp_path):
    sd = wan21_dit(dim=128, ffn_dim=256, num_layers=1)
    sd["blocks.0.norm_extra.weight"] = torch.ones(128, 128, dtype=torch.bfloat16)  # a 2-D "norm" weight
    sd["blocks.0.odd.weight"] = torch.ones(100, 128, dtype=torch.bfloat16)         # not a multiple of 16
    src = tmp_path / "s.safetensors"
    save_file(sd, str(src))
    dst = tmp_path / "d.safetensors"
    report = convert(str(src), str(dst), "fp8-sgl", layer_filter=LayerFilter(extra_skip=("ffn.2",)))
    skipped = report["skipped"]
    assert "norm" in skipped["blocks.0.norm_extra"]
    assert "100x128" in skipped["blocks.0.odd"] and "16" in skipped["blocks.0.odd"]
    assert "'ffn.2'" in skipped["blocks.0.ffn.2"]
    assert "blocks.0.ffn.2" not in report["quantized"] and "blocks.0.ffn.0" in report["quantized"]
    plan = plan_checkpoint(SafetensorsFile(str(dst)))
    assert set(plan.layers) == set(report["quantized"])
    assert SafetensorsFile(str(dst)).dtype_name("blocks.0.ffn.2.weight") == "BF16"
    assert "patch_embedding" not in skipped  # not 2-D: not a Linear, not listed


def test_source_without_metadata_gets_scheme(tmp_path):
    src = tmp_path / "s.safetensors"
    save_file(wan21_dit(dim=128, ffn_dim=256, num_layers=1), str(src))
    dst = tmp_path / "d.safetensors"
    convert(str(src), str(dst), "fp8-scaled", "comfyui-metadata")
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert meta["quantdit_scheme"] == "fp8-scaled"
    assert set(meta) == {"quantdit_scheme", "_quantization_metadata"}


def test_convert_fp32_and_fp16_sources(tmp_path):
    for dt in (torch.float32, torch.float16):
        src = tmp_path / f"s-{dt}.safetensors"
        save_file(wan21_dit(dim=128, ffn_dim=256, num_layers=1, dtype=dt), str(src))
        dst = tmp_path / f"d-{dt}.safetensors"
        convert(str(src), str(dst), "int8-vllm")
        sd, plan, _ = load_checkpoint(str(dst))
        assert plan.scheme_counts() == {"int8-w8a8": 10}
        assert sd["head.head.weight"].dtype == dt


def test_progress_callback(src, tmp_path, wan_sd):
    calls = []
    convert(str(src), str(tmp_path / "d.safetensors"), "fp8-sgl", progress=lambda i, n: calls.append((i, n)))
    n = len(wan_sd) + len(BLOCK_LINEARS)
    assert calls == [(i, n) for i in range(1, n + 1)]


def test_failure_midway_leaves_no_output(src, tmp_path, monkeypatch):
    real_get = SafetensorsFile.get
    count = {"n": 0}

    def flaky(self, key):
        count["n"] += 1
        if count["n"] == 30:
            raise OSError("read error (simulated)")
        return real_get(self, key)

    monkeypatch.setattr(SafetensorsFile, "get", flaky)
    dst = tmp_path / "d.safetensors"
    with pytest.raises(OSError, match="simulated"):
        convert(str(src), str(dst), "int8-vllm")
    assert count["n"] == 30
    assert not dst.exists() and partials(tmp_path) == []


# ------------------------------------------------------------------ peak memory
def test_holds_one_layer_of_quantized_data_at_a_time(src, tmp_path, monkeypatch):
    """Spy on what convert hands to the writer: each quantized weight it produces is tracked by
    weak reference, and once the next one has been produced no earlier one may still be alive (so the
    converter keeps at most one layer's quantized data, whatever quantizer it calls). Each source
    tensor is read exactly once (a layer's weight and its scale come from one quantization)."""
    real_write = convert_module.write_safetensors
    refs: list[weakref.ref] = []
    alive_when_producing: list[int] = []
    reads: dict[str, int] = {}

    def spy_write(path, tensors, metadata=None, progress=None):
        wrapped = []
        for t in tensors:
            def produce(t=t, quantized=t.dtype in (torch.int8, torch.float8_e4m3fn)):
                out = t.produce()
                if quantized:  # earlier layers' quantized weights still alive now that this one exists
                    alive_when_producing.append(sum(r() is not None for r in refs))
                    refs.append(weakref.ref(out))
                return out
            wrapped.append(PlannedTensor(t.name, t.dtype, t.shape, produce))
        return real_write(path, wrapped, metadata, progress)

    real_get = SafetensorsFile.get

    def counting_get(self, key):
        reads[key] = reads.get(key, 0) + 1
        return real_get(self, key)

    monkeypatch.setattr(convert_module, "write_safetensors", spy_write)
    monkeypatch.setattr(SafetensorsFile, "get", counting_get)
    dst = tmp_path / "d.safetensors"
    report = convert(str(src), str(dst), "fp8-sgl")
    assert len(alive_when_producing) == len(report["quantized"]) == len(BLOCK_LINEARS)
    assert max(alive_when_producing) == 0, alive_when_producing
    gc.collect()
    assert all(r() is None for r in refs)
    assert reads == {k: 1 for k in load_file(str(src))}
    assert plan_checkpoint(SafetensorsFile(str(dst))).scheme_counts() == {"fp8-w8a8": len(BLOCK_LINEARS)}


# ------------------------------------------------------------------ CLI
def test_cli_writes_a_loadable_file(src, tmp_path, wan_sd):
    dst = tmp_path / "cli.safetensors"
    r = subprocess.run([sys.executable, "-m", "quant.convert", str(src), str(dst), "--scheme", "int8-vllm"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{len(BLOCK_LINEARS)} layers quantized" in r.stderr
    sd, plan, meta = load_checkpoint(str(dst))
    assert set(plan.layers) == BLOCK_LINEARS
    assert plan.layouts() == {LIGHTX2V} and plan.scheme_counts() == {"int8-w8a8": len(BLOCK_LINEARS)}
    assert meta["quantdit_scheme"] == "int8-w8a8" and meta["config"] == SRC_META["config"]
    assert torch.equal(sd["head.head.weight"], wan_sd["head.head.weight"])


def test_cli_main_rejects_bad_layout_without_writing(src, tmp_path, capsys):
    """In-process (a second subprocess would cost seconds of torch import)."""
    dst = tmp_path / "cli.safetensors"
    with pytest.raises(ValueError, match="fp8-scaled"):
        main([str(src), str(dst), "--scheme", "int8-vllm", "--layout", "comfyui-scaled-fp8"])
    with pytest.raises(SystemExit) as ei:
        main([str(src), str(dst), "--scheme", "int8-vllm", "--layout", "gguf"])
    assert ei.value.code == 2 and "gguf" in capsys.readouterr().err
    assert not dst.exists() and partials(tmp_path) == []
    assert main([str(src), str(dst), "--scheme", "fp8-sgl"]) == 0
    assert plan_checkpoint(SafetensorsFile(str(dst))).scheme_counts() == {"fp8-w8a8": len(BLOCK_LINEARS)}


@pytest.mark.parametrize("scheme", ["int8-weight-only", "fp8-weight-only", "int8-w8a8"])
def test_weight_only_files_load_back_as_weight_only(tmp_path, scheme):
    """LightX2V's layout stores 8-bit weight-only and W8A8 layers alike; the metadata tells them apart."""
    src, dst = tmp_path / "s.safetensors", tmp_path / "d.safetensors"
    save_file(wan21_dit(dim=128, ffn_dim=256, num_layers=1), str(src))
    report = convert(str(src), str(dst), scheme, "lightx2v")
    plan = plan_checkpoint(SafetensorsFile(str(dst)))
    assert plan.scheme_counts() == {scheme: len(report["quantized"])}


def test_a_broken_weight_only_list_is_refused_with_the_file_named(tmp_path):
    src, dst = tmp_path / "s.safetensors", tmp_path / "d.safetensors"
    save_file(wan21_dit(dim=128, ffn_dim=256, num_layers=1), str(src))
    convert(str(src), str(dst), "int8-w8a8", "lightx2v")
    broken = tmp_path / "broken.safetensors"
    save_file(load_file(str(dst)), str(broken), metadata={"quantdit_weight_only": "blocks.0.ffn.0"})
    with pytest.raises(CheckpointError) as caught:
        plan_checkpoint(SafetensorsFile(str(broken)))
    assert "broken.safetensors" in str(caught.value) and "quantdit_weight_only" in str(caught.value)


@pytest.mark.parametrize("layout", ["comfyui-scaled-fp8", "comfyui-metadata"])
def test_comfyui_layouts_ask_for_a_float_matmul(src, tmp_path, layout):
    # fp8-scaled is a bf16 matmul on the widened weight: the file says so to ComfyUI and to the loader.
    from quant.formats.detect import plan_checkpoint
    from quant.formats.load import scaled_fp8_as_w8a8
    from quant.formats.safetensors_file import SafetensorsFile
    dst = tmp_path / "out.safetensors"
    convert(str(src), str(dst), "fp8-scaled", layout)
    plan = plan_checkpoint(SafetensorsFile(str(dst)))
    assert plan.layers and all(q.float_matmul for q in plan.layers.values())
    assert {q.scheme for q in scaled_fp8_as_w8a8(plan).layers.values()} == {"fp8-scaled"}


@pytest.mark.parametrize("scheme,entry", [
    ("int8-w8a8", {"format": "int8_tensorwise"}),
    ("fp8-scaled", {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}),
])
def test_comfyui_layout_writes_comfy_quant_entries(src, tmp_path, scheme, entry):
    # ComfyUI's own layout, as its ModelSave writes it: a uint8 JSON entry per quantized layer.
    from quant.formats.detect import COMFY_QUANT_METADATA, plan_checkpoint
    from quant.formats.safetensors_file import SafetensorsFile
    dst = tmp_path / "out.safetensors"
    report = convert(str(src), str(dst), scheme, "comfyui")
    with safe_open(str(dst), "pt") as f:
        entries = {k[:-len(".comfy_quant")]: json.loads(bytes(f.get_tensor(k).tolist()))
                   for k in f.keys() if k.endswith(".comfy_quant")}
        assert "_quantization_metadata" not in (f.metadata() or {})
    assert sorted(entries) == sorted(report["quantized"]) and all(e == entry for e in entries.values())
    plan = plan_checkpoint(SafetensorsFile(str(dst)))
    assert plan.layouts() == {COMFY_QUANT_METADATA} and {q.scheme for q in plan.layers.values()} == {scheme}
    assert all(q.float_matmul == (scheme == "fp8-scaled") for q in plan.layers.values())
