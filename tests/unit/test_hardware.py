"""The hardware probe's advice for made-up machines, and the probe of this one (no GPU here)."""
import pytest
import torch

from quant.hardware import PROBED_SCHEMES, MachineFacts, describe, probe, suggest
from quant.schemes import get_scheme


def machine(cap, kernels, name="GPU", unavailable=None):
    return MachineFacts("cuda:0", name, cap, 80.0, dict(kernels), dict(unavailable or {}))


def schemes(facts):
    return [s.scheme for s in suggest(facts)]


def test_a_hopper_with_triton_gets_int8_w8a8_for_both():
    facts = machine((9, 0), {"int8-w8a8": "triton", "fp8-w8a8": "triton"})
    dit, enc = suggest(facts)
    assert (dit.scheme, enc.scheme) == ("int8-w8a8", "int8")
    assert "triton's fused kernel" in dit.why and "1.14x" in dit.why


def test_the_named_provider_is_the_one_auto_picks():
    dit, enc = suggest(machine((9, 0), {"int8-w8a8": "vllm", "fp8-w8a8": "vllm"}))
    assert "vllm's fused kernel" in dit.why and "vllm's" in enc.why


def test_fp8_w8a8_when_only_fp8_has_a_fused_kernel():
    assert schemes(machine((8, 9), {"int8-w8a8": "torch", "fp8-w8a8": "sgl-kernel"})) == ["fp8-w8a8", "int8-weight-only"]


@pytest.mark.parametrize("cap,dit", [((8, 9), "fp8-weight-only"), ((9, 0), "fp8-weight-only"),
                                     ((8, 6), "int8-weight-only"), ((7, 5), "int8-weight-only")])
def test_without_a_fused_kernel_weight_only_and_how_to_get_one(cap, dit):
    # Windows without triton: torch's own paths are slower than bf16, the reference one emulates.
    dit_s, enc = suggest(machine(cap, {"int8-w8a8": "torch", "fp8-w8a8": "reference"}))
    assert (dit_s.scheme, enc.scheme) == (dit, "int8-weight-only")
    assert "install triton" in dit_s.why


def test_no_gpu_keeps_to_weight_only():
    facts = MachineFacts("cpu", "CPU", None, None, {"int8-w8a8": "reference"}, {"triton": "CUDA is not available"})
    assert schemes(facts) == ["int8-weight-only", "int8-weight-only"]
    assert "no CUDA GPU" in suggest(facts)[0].why


def test_every_suggestion_is_a_scheme_the_nodes_take():
    for facts in (machine((9, 0), {"int8-w8a8": "triton"}), machine((8, 0), {}),
                  MachineFacts("cpu", "CPU", None, None, {}, {})):
        for s in suggest(facts):
            get_scheme(s.scheme if s.scheme != "int8" else "int8-w8a8")


def test_describe_names_the_machine_the_kernels_and_the_missing_providers():
    facts = machine((8, 6), {"int8-w8a8": "triton", "int4-g128": ""}, name="RTX 3090",
                    unavailable={"vllm": "vllm is not installed"})
    text = describe(facts, suggest(facts))
    assert "RTX 3090 (cuda:0)" in text and "compute capability 8.6" in text and "no fp8 tensor cores" in text
    assert "int8-w8a8: triton" in text and "int4-g128: none can run it here" in text
    assert "vllm: vllm is not installed" in text


def test_probe_of_this_machine():
    facts = probe(torch.device("cpu"))
    assert facts.capability is None and facts.name == "CPU"
    assert set(facts.kernels) == set(PROBED_SCHEMES)
    assert all(k == "reference" for k in facts.kernels.values())  # the only provider without CUDA
    if not torch.cuda.is_available():  # CI; on the GPU machine Triton loads (and cannot run on the CPU)
        assert "triton" in facts.unavailable and "CUDA" in facts.unavailable["triton"]
    assert "emulated in plain torch" in describe(facts, suggest(facts))


def test_the_report_gives_the_provider_auto_hands_large_inputs_to(monkeypatch):
    # A GPU with vLLM (which cannot exist here): auto runs vLLM and hands large inputs to Triton.
    from quant import hardware
    from quant.backends import KernelChoice, get_backend

    def choice(scheme, device):
        if scheme.name == "int8-w8a8":
            return KernelChoice(get_backend("vllm"), get_backend("triton"), 8192)
        return KernelChoice(get_backend("reference"))

    monkeypatch.setattr(hardware, "pick_kernels", choice)
    facts = probe(torch.device("cpu"))
    assert facts.kernels["int8-w8a8"] == "vllm"  # what the scheme advice is based on
    assert facts.routes == {"int8-w8a8": "vllm, triton from 8192 tokens"}
    text = describe(facts, suggest(facts))
    assert "  int8-w8a8: vllm, triton from 8192 tokens\n" in text and "  fp8-w8a8: reference" in text
