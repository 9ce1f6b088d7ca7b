"""`auto`'s hand-over of large inputs (quant/backends/registry.pick_kernels) inside a real ComfyUI
model: each quantized linear picks its kernel per call, by the number of tokens it is given.

vLLM and Triton cannot run on this CPU, so two test backends registered for the test stand in for
them (mocked: the GPU providers); both compute the reference backend's exact linear, so sampling
must come out bit-equal whichever of them runs a call. On the GPU machine
tests/gpu/test_kernel_backends.py checks the real pair."""
from __future__ import annotations

import os

import pytest
import torch

import tiny_dits
from tiny_dits import load, quantize, sample

ON_CUDA = os.environ.get("QUANTDIT_COMFY_DEVICE", "cpu") == "cuda"
pytestmark = pytest.mark.skipif(ON_CUDA, reason="the stand-in backends run on the CPU")


@pytest.fixture(scope="module")
def files(models_dir):
    return tiny_dits.write(models_dir, "r", seed=5)


def recording_backend(backends, name, priority, calls, large_from=None):
    """A backend running the reference linear that logs (its name, rows) for every call."""
    def linear(x2d, *args):
        calls.append((name, x2d.shape[0]))
        return backends.get_backend("reference").linear(x2d, *args)
    claim = None if large_from is None else (lambda scheme, device: large_from)
    return backends.Backend(name=name, priority=priority, availability=lambda: None,
                   supports=lambda scheme, device: None, linear=linear, large_inputs_from=claim)


@pytest.mark.parametrize("scheme", ["int8-w8a8", "fp8-w8a8"])
def test_each_call_runs_on_the_backend_for_its_token_count(comfy, files, monkeypatch, scheme):
    backends = comfy[1].quant.backends     # the pack as ComfyUI loaded it
    calls = []
    monkeypatch.setitem(backends.registry._BACKENDS, "ranked", recording_backend(backends, "ranked", 95, calls))
    q, _ = quantize(comfy, load(comfy, files, "wan"), scheme)
    alone = sample(comfy, files, "wan", q)
    rows = sorted({r for _, r in calls})
    assert len(rows) >= 2 and {n for n, _ in calls} == {"ranked"}, rows   # video tokens, context, modulation
    print("rows per call:", rows)
    start = rows[-1]                    # the video tokens' linears go to the large-input backend

    calls.clear()
    monkeypatch.setitem(backends.registry._BACKENDS, "large",
                        recording_backend(backends, "large", 1, calls, large_from=start))
    q, report = quantize(comfy, load(comfy, files, "wan"), scheme)
    assert f"ranked, large from {start} tokens" in report, report
    shared = sample(comfy, files, "wan", q)
    assert calls and {(n, r >= start) for n, r in calls} == {("ranked", False), ("large", True)}
    assert torch.equal(alone, shared)

    calls.clear()
    q, report = quantize(comfy, load(comfy, files, "wan"), scheme, backend="triton")
    # A named backend that cannot run here falls back to `auto`, hand-over included.
    assert "falling back" in report and f"ranked, large from {start} tokens" in report, report
    sample(comfy, files, "wan", q)
    assert {(n, r >= start) for n, r in calls} == {("ranked", False), ("large", True)}
