"""The attention hand-off (nodes/heads_handoff.py) in real ComfyUI Flux and Wan models: where the
attention hook is set, that Flux's double-block projections receive the attention output in its
head layout, and that sampling does not change by a single bit with it. On the CPU the reference
kernel gets ComfyUI's reshaped output; on the GPU (last test) the Triton quantizer reads the heads."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

import tiny_dits
from tiny_dits import load, quantize, sample

ON_CUDA = os.environ.get("QUANTDIT_COMFY_DEVICE", "cpu") == "cuda"
HOOK = "optimized_attention_override"


@pytest.fixture(scope="module")
def files(models_dir):
    return tiny_dits.write(models_dir, "attn", seed=5)


@pytest.fixture(autouse=True)
def pytorch_attention(monkeypatch):
    """ComfyUI's PyTorch (SDPA) attention in Flux, as ComfyUI picks on CUDA GPUs; on a CPU it picks
    the sub-quadratic one unless started with --use-pytorch-cross-attention."""
    monkeypatch.setattr(importlib.import_module("comfy.ldm.flux.math"), "optimized_attention",
                        importlib.import_module("comfy.ldm.modules.attention").attention_pytorch)


def hook(model):
    return model.model_options.get("transformer_options", {}).get(HOOK)


def is_pack_hook(fn):
    return getattr(fn, "__name__", "") == "attention_heads_handoff" and fn.__module__.endswith("nodes.heads_handoff")


def without_hook(model):
    plain = model.clone()
    plain.model_options["transformer_options"].pop(HOOK)
    return plain


def kind(x):
    prefix = getattr(x, "prefix", None)
    return type(x).__name__ + ("" if prefix is None else f"({type(prefix).__name__})")


def seen_inputs(model, names):
    """{layer name: [kind of each input]} for the quantized layers `names` (object patches of the
    Quantize node) while sampling."""
    return _watch({n: model.object_patches[f"diffusion_model.{n}"] for n in names})


def seen_inputs_of(model, names):
    """seen_inputs for a loaded model, whose quantized layers are its own modules."""
    return _watch({n: model.get_model_object(f"diffusion_model.{n}") for n in names})


def _watch(layers):
    seen, handles = {n: [] for n in layers}, []
    for n, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(lambda m, args, n=n: seen[n].append(kind(args[0]))))
    return seen, handles


@pytest.mark.parametrize("scheme", ["int8-w8a8", "fp8-w8a8"])
def test_flux_projections_that_quantize_per_token_get_the_hook(comfy, files, scheme):
    q, report = quantize(comfy, load(comfy, files, "flux"), scheme)
    assert is_pack_hook(hook(q))
    # The double block's two projections and the two single blocks' linear2.
    assert "4 layers quantize the attention output from the attention's own layout" in report, report
    q, report = quantize(comfy, load(comfy, files, "flux"), scheme, skip_patterns="img_attn.proj")
    assert is_pack_hook(hook(q)) and "3 layers quantize the attention output" in report
    q, report = quantize(comfy, load(comfy, files, "flux"), scheme, skip_patterns="linear2")
    assert is_pack_hook(hook(q)) and "2 layers quantize the attention output" in report


@pytest.mark.parametrize("arch,scheme,kw", [("flux", "fp8-block128", {}), ("flux", "int8-weight-only", {}),
                                            ("flux", "int8-w8a8", {"skip_patterns": "attn.proj, linear2"}),
                                            ("wan", "int8-w8a8", {})])
def test_no_hook_where_no_flux_projection_takes_it(comfy, files, arch, scheme, kw):
    model = load(comfy, files, arch)
    q, report = quantize(comfy, model, scheme, **kw)
    assert hook(q) is None and hook(model) is None and "attention output" not in report


def test_another_nodes_attention_override_stays(comfy, files):
    model = load(comfy, files, "flux")

    def theirs(func, *args, **kwargs):
        return func(*args, **kwargs)

    model.model_options.setdefault("transformer_options", {})[HOOK] = theirs
    q, report = quantize(comfy, model, "int8-w8a8")
    assert hook(q) is theirs
    assert "another node overrides ComfyUI's attention" in report, report


def test_the_input_model_keeps_no_hook_and_requantizing_keeps_one(comfy, files):
    model = load(comfy, files, "flux")
    once, _ = quantize(comfy, model, "int8-w8a8")
    twice, report = quantize(comfy, once, "fp8-w8a8")
    assert hook(model) is None and is_pack_hook(hook(twice))
    assert "another node" not in report


def test_double_block_projections_receive_the_head_layout(comfy, files):
    q, _ = quantize(comfy, load(comfy, files, "flux"), "int8-w8a8")
    names = ["double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj", "single_blocks.0.linear2"]
    seen, handles = seen_inputs(q, names)
    try:
        sample(comfy, files, "flux", q)
        with_hook = {n: set(v) for n, v in seen.items()}
        for v in seen.values():
            v.clear()
        sample(comfy, files, "flux", without_hook(q))
        without = {n: set(v) for n, v in seen.items()}
    finally:
        for h in handles:
            h.remove()
    # The single blocks' linear2 reads cat((attention, GELU)) from the heads and the GELU's input.
    assert with_hook == {names[0]: {"DeferredHeads"}, names[1]: {"DeferredHeads"},
                         names[2]: {"DeferredActivation(DeferredHeads)"}}
    assert without == {names[0]: {"Tensor"}, names[1]: {"Tensor"}, names[2]: {"DeferredActivation(Tensor)"}}


@pytest.mark.parametrize("patch", ["attn1_output_patch", "dit block replaced"])
def test_patched_blocks_get_comfys_output(comfy, files, patch):
    """Where another node patches the attention output or replaces a block, the code that uses the
    output is not ComfyUI's own: the hook leaves it copied."""
    q, _ = quantize(comfy, load(comfy, files, "flux"), "int8-w8a8")
    patched = q.clone()
    if patch == "attn1_output_patch":
        patched.set_model_attn1_output_patch(lambda attn, extra_options: attn)
    else:
        patched.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 0)
    seen, handles = seen_inputs(patched, ["double_blocks.0.img_attn.proj", "single_blocks.0.linear2"])
    try:
        out = sample(comfy, files, "flux", patched)
    finally:
        for h in handles:
            h.remove()
    assert set(seen["double_blocks.0.img_attn.proj"]) == {"Tensor"}
    assert set(seen["single_blocks.0.linear2"]) == {"DeferredActivation(Tensor)"}
    assert torch.equal(out, sample(comfy, files, "flux", without_hook(patched)))


def test_other_attention_functions_are_left_alone(comfy, files, monkeypatch):
    monkeypatch.setattr(importlib.import_module("comfy.ldm.flux.math"), "optimized_attention",
                        importlib.import_module("comfy.ldm.modules.attention").attention_sub_quad)
    q, _ = quantize(comfy, load(comfy, files, "flux"), "int8-w8a8")
    seen, handles = seen_inputs(q, ["double_blocks.0.img_attn.proj"])
    try:
        out = sample(comfy, files, "flux", q)
    finally:
        handles[0].remove()
    assert set(seen["double_blocks.0.img_attn.proj"]) == {"Tensor"}
    assert torch.equal(out, sample(comfy, files, "flux", without_hook(q)))


def test_sampling_is_bit_equal_with_and_without_the_hook(comfy, files):
    q, _ = quantize(comfy, load(comfy, files, "flux"), "int8-w8a8", backend="triton" if ON_CUDA else "auto")
    if ON_CUDA:
        sample(comfy, files, "flux", q)  # warm-up (see test_gelu_handoff)
    assert torch.equal(sample(comfy, files, "flux", q), sample(comfy, files, "flux", without_hook(q)))


# ------------------------------------------------------------------ on the GPU machine
@pytest.mark.gpu
@pytest.mark.skipif(not (ON_CUDA and torch.cuda.is_available()), reason="needs CUDA and QUANTDIT_COMFY_DEVICE=cuda")
@pytest.mark.parametrize("scheme,backend", [("int8-w8a8", "triton"), ("fp8-w8a8", "triton"), ("int8-w8a8", "vllm"),
                                            ("fp8-w8a8", "vllm")])
def test_on_gpu_the_quantizer_reads_the_heads(comfy, files, monkeypatch, scheme, backend):
    _, pack = comfy
    why = pack.quant.backends.why_not(backend, pack.quant.schemes.get_scheme(scheme), torch.device("cuda"))
    if why:
        pytest.skip(f"{backend}: {why}")
    triton_quant = importlib.import_module(f"{pack.__name__}.quant.kernels.triton_quant")
    calls = []
    heads_quant, gelu_quant = triton_quant.per_token_quant_heads, triton_quant.per_token_quant_gelu

    def counting_heads(heads, dtype):
        calls.append("proj")
        return heads_quant(heads, dtype)

    def counting_gelu(prefix, x, dtype):
        calls.append(f"gelu, prefix {type(prefix).__name__}")
        return gelu_quant(prefix, x, dtype)

    q, _ = quantize(comfy, load(comfy, files, "flux"), scheme, backend=backend)
    sample(comfy, files, "flux", q)
    monkeypatch.setattr(triton_quant, "per_token_quant_heads", counting_heads)
    monkeypatch.setattr(triton_quant, "per_token_quant_gelu", counting_gelu)
    out = sample(comfy, files, "flux", q)
    fused_calls = list(calls)
    plain = sample(comfy, files, "flux", without_hook(q))
    plain_calls = calls[len(fused_calls):]
    # Per model call: the double block's image and text projections read the heads, and the two
    # single blocks' linear2 read them as the prefix of their GELU; without the hook neither.
    steps = fused_calls.count("proj") // 2
    assert steps and fused_calls.count("gelu, prefix DeferredHeads") == 2 * steps
    assert "proj" not in plain_calls and plain_calls.count("gelu, prefix Tensor") == 2 * steps
    print(f"flux {scheme}:{backend}: {len(fused_calls)} quantizations, {fused_calls.count('proj')} of projections "
          f"from the heads; relative difference to ComfyUI's reshaped output "
          f"{float((out - plain).norm() / plain.norm()):.2e}")
    if backend == "triton":
        assert torch.equal(out, plain)
    else:  # vLLM's own quantizer on the plain path rounds some values differently (test_gelu_handoff)
        assert float((out - plain).norm() / plain.norm()) < {"int8-w8a8": 0.012, "fp8-w8a8": 0.04}[scheme]


def test_the_loader_sets_it_for_a_quantized_flux_file(comfy, files, models_dir):
    """A pre-quantized Flux checkpoint (this pack's converter, LightX2V layout) through the Loader."""
    from quant.convert import convert  # the converter's CLI code, no ComfyUI needed
    nodes, _ = comfy
    name = "attn_flux_int8.safetensors"
    convert(os.path.join(str(models_dir), files["flux"][0]), os.path.join(str(models_dir), name),
                               "int8-w8a8")
    # On CUDA vLLM's own quantizer (auto's pick there) would round the plain path differently.
    model, report = nodes.NODE_CLASS_MAPPINGS["QuantDiTLoader"].execute(
        unet_name=name, backend="triton" if ON_CUDA else "auto", compute_dtype="default").result
    assert is_pack_hook(hook(model))
    assert "4 layers quantize the attention output from the attention's own layout" in report, report
    seen, handles = seen_inputs_of(model, ["double_blocks.0.img_attn.proj"])
    try:
        if ON_CUDA:
            sample(comfy, {"flux": (name, files["flux"][1])}, "flux", model)  # warm-up (see test_gelu_handoff)
        out = sample(comfy, {"flux": (name, files["flux"][1])}, "flux", model)
    finally:
        handles[0].remove()
    assert set(seen["double_blocks.0.img_attn.proj"]) == {"DeferredHeads"}
    assert torch.equal(out, sample(comfy, {"flux": (name, files["flux"][1])}, "flux", without_hook(model)))
