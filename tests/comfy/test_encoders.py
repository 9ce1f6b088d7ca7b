"""Encoder loaders and quantize nodes on the real ComfyUI runtime (CPU), with tiny umT5 and
ViT-H-architecture encoders written in Wan's / LightX2V's / ComfyUI's key layouts.

The Wan-layout mapping is checked against an independent forward pass written here from Wan's
module definitions (fp32, tolerance 1e-4 relative). Quantized encodings are compared with the bf16
(fp16 for CLIP) encoding of the same weights by relative L2 error. Measured on these tiny random
encoders (deterministic, CPU): umT5 files int8 2.6%, fp8 9.2%, ComfyUI scaled fp8 6.6%; runtime
int8 2.7%, fp8 9.5%, int8-weight-only 1.7%, fp8-weight-only 7.0%, e5m2 14.8%, int4 31.6%; CLIP
vision int8 1.3%, fp8 4.7%, fp8-weight-only 3.6%. Tolerances are 1.35-2.3x those.
Random tiny encoders amplify noise far more than trained ones, so these bound correctness
(a wrong scale or a swapped layer gives errors near 100%), not the quality of real files.
"""
from __future__ import annotations

import math
import os
import pickle

import pytest
import torch

import encoder_fixtures as ef
import wan_fixtures
from scripts.tiny_models import save, wan21_dit, wan21_metadata

PROMPT = "a cat walks on the beach at sunset"
T5_TOL = {"int8": 0.06, "fp8": 0.2, "int8-safetensors": 0.06, "comfy-fp8-scaled": 0.15, "comfy-int8": 0.06,
          "comfy-mxfp8": 0.15}


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def t5_files(comfy, tmp_path_factory):
    import folder_paths
    d = tmp_path_factory.mktemp("text_encoders")
    folder_paths.add_model_folder_path("text_encoders", str(d), is_default=True)
    return d, ef.write_t5_files(d)


@pytest.fixture(scope="module")
def clip_files(comfy, tmp_path_factory):
    import folder_paths
    d = tmp_path_factory.mktemp("clip_vision")
    folder_paths.add_model_folder_path("clip_vision", str(d), is_default=True)
    return d, ef.write_clip_files(d)


def node(comfy, name):
    return comfy[0].NODE_CLASS_MAPPINGS[name]


def load_t5(comfy, name):
    return tuple(node(comfy, "QuantDiTT5Loader").execute(clip_name=name, backend="auto").result)


def load_clip_vision(comfy, name):
    return tuple(node(comfy, "QuantDiTCLIPVisionLoader").execute(clip_name=name, backend="auto").result)


def encode(comfy, clip, text=PROMPT):
    return comfy[0].CLIPTextEncode().encode(clip, text)[0][0][0]


def encode_image(comfy, clip_vision, img):
    return comfy[0].CLIPVisionEncode().encode(clip_vision, img, "center")[0]["penultimate_hidden_states"]


# --- independent references written from Wan's modules (wan/modules/t5.py, clip.py) -------------

def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def _t5_buckets(length):
    pos = torch.arange(length)
    rel = pos[None, :] - pos[:, None]              # key - query
    bucket = (rel > 0).long() * 16
    rel = rel.abs()
    large = 8 + (torch.log(rel.clamp(min=1).float() / 8) / math.log(128 / 8) * 8).long()
    return bucket + torch.where(rel < 8, rel, large.clamp(max=15))


def wan_t5_reference(sd, ids, heads):
    w = {k: v.float() for k, v in sd.items()}
    x = w["token_embedding.weight"][ids][None]
    n, length = len([k for k in w if k.endswith("attn.q.weight")]), len(ids)
    buckets = _t5_buckets(length)
    for i in range(n):
        b = f"blocks.{i}."
        h = _rms(x, w[b + "norm1.weight"])
        q, k, v = (
            (h @ w[f"{b}attn.{p}.weight"].t()).view(1, length, heads, -1).transpose(1, 2) for p in "qkv")
        bias = w[b + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]
        attn = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)  # T5: no 1/sqrt(d)
        x = x + (attn @ v).transpose(1, 2).reshape(1, length, -1) @ w[b + "attn.o.weight"].t()
        h = _rms(x, w[b + "norm2.weight"])
        gate = torch.nn.functional.gelu(h @ w[b + "ffn.gate.0.weight"].t(), approximate="tanh")
        x = x + ((h @ w[b + "ffn.fc1.weight"].t()) * gate) @ w[b + "ffn.fc2.weight"].t()
    return _rms(x, w["norm.weight"])[0]


def wan_clip_reference(sd, pixels, heads):
    w = {k: v.float() for k, v in sd.items()}
    ln = torch.nn.functional.layer_norm
    x = torch.nn.functional.conv2d(pixels, w["visual.patch_embedding.weight"], stride=w["visual.patch_embedding.weight"].shape[-1])
    x = torch.cat([w["visual.cls_embedding"], x.flatten(2).transpose(1, 2)], dim=1) + w["visual.pos_embedding"]
    dim = x.shape[-1]
    x = ln(x, (dim,), w["visual.pre_norm.weight"], w["visual.pre_norm.bias"], 1e-5)
    n = len([k for k in w if k.endswith("attn.to_qkv.weight")])
    for i in range(n - 1):  # Wan I2V: use_31_block, the output of all but the last block
        b = f"visual.transformer.{i}."
        h = ln(x, (dim,), w[b + "norm1.weight"], w[b + "norm1.bias"], 1e-5)
        qkv = (h @ w[b + "attn.to_qkv.weight"].t() + w[b + "attn.to_qkv.bias"]).view(1, -1, 3, heads, dim // heads)
        q, k, v = qkv.unbind(2)
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + o.transpose(1, 2).reshape(1, -1, dim) @ w[b + "attn.proj.weight"].t() + w[b + "attn.proj.bias"]
        h = ln(x, (dim,), w[b + "norm2.weight"], w[b + "norm2.bias"], 1e-5)
        h = torch.nn.functional.gelu(h @ w[b + "mlp.0.weight"].t() + w[b + "mlp.0.bias"])
        x = x + h @ w[b + "mlp.2.weight"].t() + w[b + "mlp.2.bias"]
    return x[0]


# --- umT5 -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_baseline(comfy, t5_files):
    _, names = t5_files
    clip, _ = load_t5(comfy, names["bf16"])
    return encode(comfy, clip)


def test_t5_wan_layout_matches_wan_reference(comfy, t5_files, t5_baseline):
    d, names = t5_files
    clip, report = load_t5(comfy, names["bf16"])
    assert "wan-original / unquantized" in report and "no quantized layers" in report
    ids = [t for t, _ in clip.tokenize(PROMPT)["umt5xxl"][0]]
    valid = ids.index(1) + 1  # through the end token; the rest is padding ComfyUI masks and zeroes
    sd = torch.load(os.path.join(d, names["bf16"]), weights_only=True)
    ref = wan_t5_reference(sd, torch.tensor(ids[:valid]), heads=4)
    got = t5_baseline[0, :valid]
    assert rel_err(got, ref) < 1e-4, rel_err(got, ref)
    assert torch.all(t5_baseline[0, valid:] == 0)


def test_t5_comfy_layout_with_embedded_tokenizer_equals_wan_layout(comfy, t5_files, t5_baseline):
    clip, report = load_t5(comfy, t5_files[1]["comfy-bf16"])
    assert "tokenizer: inside the checkpoint" in report
    assert torch.equal(encode(comfy, clip), t5_baseline)


@pytest.mark.parametrize("variant,scheme", [("int8", "int8-w8a8"), ("fp8", "fp8-w8a8"),
                                            ("int8-safetensors", "int8-w8a8"),
                                            ("comfy-fp8-scaled", "fp8-scaled"), ("comfy-int8", "int8-w8a8"),
                                            ("comfy-mxfp8", "fp8-w8a8")])
def test_t5_quantized_files_encode_close_to_bf16(comfy, t5_files, t5_baseline, variant, scheme):
    clip, report = load_t5(comfy, t5_files[1][variant])
    assert f"{scheme}: 14 layers" in report, report  # 2 blocks x (q, k, v, o, wi_0, wi_1, wo)
    q = clip.cond_stage_model.umt5xxl.transformer.encoder.block[0].layer[1].DenseReluDense.wo
    assert q.weight.dtype == (torch.int8 if scheme.startswith("int8") else torch.float8_e4m3fn)
    err = rel_err(encode(comfy, clip), t5_baseline)
    assert 0 < err < T5_TOL[variant], f"{variant}: {err:.4f}"


def test_t5_lightx2v_pth_and_safetensors_load_identically(comfy, t5_files):
    a, _ = load_t5(comfy, t5_files[1]["int8"])
    b, _ = load_t5(comfy, t5_files[1]["int8-safetensors"])
    assert torch.equal(encode(comfy, a), encode(comfy, b))


ENCODER_RUNTIME = {"int8": ("int8-w8a8", 0.06), "fp8-sgl": ("fp8-w8a8", 0.2), "int8-torchao": ("int8-w8a8", 0.06),
                   "int8-weight-only": ("int8-weight-only", 0.03), "fp8-weight-only": ("fp8-weight-only", 0.12),
                   "fp8-scaled": ("fp8-scaled", 0.15), "fp8-e5m2-weight-only": ("fp8-e5m2-weight-only", 0.2),
                   "int4-g128": ("int4-g128", 0.5)}


@pytest.mark.parametrize("scheme", list(ENCODER_RUNTIME))
def test_quantize_text_encoder_node(comfy, t5_files, t5_baseline, scheme):
    clip, _ = load_t5(comfy, t5_files[1]["bf16"])
    canonical, tol = ENCODER_RUNTIME[scheme]
    qclip, report = node(comfy, "QuantDiTQuantizeTextEncoder").execute(clip=clip, scheme=scheme).result
    assert f"{canonical}: 14 layers" in report, report
    err = rel_err(encode(comfy, qclip), t5_baseline)
    assert 0 < err < tol, f"{scheme}: {err:.4f}"
    assert torch.equal(encode(comfy, clip), t5_baseline)  # the input CLIP is unchanged


def test_quantize_text_encoder_twice_reports_already_quantized(comfy, t5_files):
    clip, _ = load_t5(comfy, t5_files[1]["int8"])
    _, report = node(comfy, "QuantDiTQuantizeTextEncoder").execute(clip=clip, scheme="fp8").result
    assert "already quantized (int8-w8a8)" in report and "nothing new to quantize" in report


def test_quantize_text_encoder_on_comfy_clip_l(comfy, tmp_path):
    """The runtime node also works on encoders ComfyUI loads itself (a CLIP-L text encoder)."""
    import folder_paths
    from scripts.tiny_models import clip_l_text
    folder_paths.add_model_folder_path("text_encoders", str(tmp_path))
    save(clip_l_text(), str(tmp_path / "clip_l_tiny.safetensors"))  # ComfyUI only builds the full CLIP-L
    (clip,) = comfy[0].CLIPLoader().load_clip("clip_l_tiny.safetensors", "stable_diffusion")
    base = encode(comfy, clip)
    qclip, report = node(comfy, "QuantDiTQuantizeTextEncoder").execute(clip=clip, scheme="int8").result
    assert "int8-w8a8: 72 layers" in report, report  # 12 layers x (q, k, v, out, fc1, fc2)
    assert 0 < rel_err(encode(comfy, qclip), base) < 0.05


# --- CLIP vision ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_baseline(comfy, clip_files):
    cv, _ = load_clip_vision(comfy, clip_files[1]["fp16"])
    return encode_image(comfy, cv, ef.image())


def test_clip_vision_wan_layout_matches_wan_reference(comfy, clip_files, clip_baseline):
    from comfy.clip_model import clip_preprocess
    d, names = clip_files
    cv, report = load_clip_vision(comfy, names["fp16"])
    assert "text tower and logit scale (3 tensors) were not loaded" in report
    sd = torch.load(os.path.join(d, names["fp16"]), weights_only=True)
    pixels = clip_preprocess(ef.image(), size=56).float()
    ref = wan_clip_reference(sd, pixels, heads=2)
    assert clip_baseline.shape == (1, 17, 160)
    assert rel_err(clip_baseline[0], ref) < 1e-3, rel_err(clip_baseline[0], ref)


@pytest.mark.parametrize("fmt,scheme,tol", [("int8", "int8-w8a8", 0.03), ("fp8", "fp8-w8a8", 0.1)])
def test_clip_vision_quantized_files_close_to_fp16(comfy, clip_files, clip_baseline, fmt, scheme, tol):
    cv, report = load_clip_vision(comfy, clip_files[1][fmt])
    assert f"{scheme}: 18 layers" in report, report  # 3 blocks x (q, k, v, out, fc1, fc2); qkv split
    assert "logit scale (1 tensors)" in report  # LightX2V's converter dropped the text tower already
    err = rel_err(encode_image(comfy, cv, ef.image()), clip_baseline)
    assert 0 < err < tol, f"{fmt}: {err:.4f}"


@pytest.mark.parametrize("scheme,canonical,tol", [("int8", "int8-w8a8", 0.03), ("fp8-weight-only", "fp8-weight-only", 0.06)])
def test_quantize_clip_vision_node(comfy, clip_files, clip_baseline, scheme, canonical, tol):
    cv, _ = load_clip_vision(comfy, clip_files[1]["fp16"])
    qcv, report = node(comfy, "QuantDiTQuantizeCLIPVision").execute(clip_vision=cv, scheme=scheme).result
    assert f"{canonical}: 18 layers" in report, report
    err = rel_err(encode_image(comfy, qcv, ef.image()), clip_baseline)
    assert 0 < err < tol
    assert torch.equal(encode_image(comfy, cv, ef.image()), clip_baseline)


# --- a whole text-to-video graph ------------------------------------------------------------------

def test_text_to_video_graph_from_quantized_t5(comfy, t5_files, models_dir):
    """Load Quantized T5 -> CLIPTextEncode (positive, negative) -> KSampler on a tiny Wan DiT."""
    nodes, _ = comfy
    save(wan21_dit(dim=128, ffn_dim=256, num_layers=2, text_dim=ef.T5_DIM, seed=9),
         os.path.join(models_dir, "wan_t2v_tiny.safetensors"), wan21_metadata(ef.T5_DIM))
    (model,) = nodes.UNETLoader().load_unet("wan_t2v_tiny.safetensors", "default")

    def run(clip, text):
        pos = nodes.CLIPTextEncode().encode(clip, text)[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        (out,) = nodes.KSampler().sample(model, 7, 3, 3.0, "euler", "simple", pos, neg, wan_fixtures.latent(),
                                         denoise=1.0)
        return out["samples"]

    bf16, _ = load_t5(comfy, t5_files[1]["bf16"])
    int8, _ = load_t5(comfy, t5_files[1]["int8"])
    a, b = run(int8, PROMPT), run(bf16, PROMPT)
    assert a.shape == (1, 16, 2, 16, 16) and torch.isfinite(a).all()
    assert 0 < rel_err(a, b) < 0.05  # quantizing the encoder barely moves the sample
    assert rel_err(run(int8, "two dogs play in fresh snow"), a) > 10 * rel_err(a, b)  # the prompt matters


# --- bad input ------------------------------------------------------------------------------------

def test_t5_file_given_to_clip_vision_loader(comfy, t5_files, clip_files, tmp_path):
    import shutil
    shutil.copy(os.path.join(t5_files[0], t5_files[1]["int8"]), os.path.join(clip_files[0], "wrong_t5.pth"))
    with pytest.raises(ValueError) as e:
        load_clip_vision(comfy, "wrong_t5.pth")
    assert "wrong_t5.pth" in str(e.value) and "not a CLIP vision encoder" in str(e.value)
    assert "umT5 text encoder in Wan's layout" in str(e.value)


def test_clip_file_given_to_t5_loader(comfy, t5_files, clip_files):
    import shutil
    shutil.copy(os.path.join(clip_files[0], clip_files[1]["int8"]), os.path.join(t5_files[0], "wrong_clip.pth"))
    with pytest.raises(ValueError) as e:
        load_t5(comfy, "wrong_clip.pth")
    assert "wrong_clip.pth" in str(e.value) and "not a umT5 text encoder" in str(e.value)
    assert "Wan's CLIP image encoder" in str(e.value)


def _write_variant(t5_files, name, edit):
    d, names = t5_files
    sd = torch.load(os.path.join(d, names["int8"]), weights_only=True)
    edit(sd)
    torch.save(sd, os.path.join(d, name))


def test_t5_missing_scale(comfy, t5_files):
    _write_variant(t5_files, "no_scale.pth", lambda sd: sd.pop("blocks.1.ffn.fc2.weight_scale"))
    with pytest.raises(ValueError) as e:
        load_t5(comfy, "no_scale.pth")
    msg = str(e.value)
    assert "no_scale.pth" in msg and "blocks.1.ffn.fc2" in msg and "weight_scale" in msg


def test_t5_missing_block_tensor(comfy, t5_files):
    _write_variant(t5_files, "cut.pth", lambda sd: sd.pop("blocks.1.norm2.weight"))
    with pytest.raises(ValueError) as e:
        load_t5(comfy, "cut.pth")
    assert "cut.pth" in str(e.value) and "encoder.block.1.layer.1.layer_norm.weight" in str(e.value)


def test_t5_wrong_key_layout(comfy, t5_files):
    def rename(sd):
        for k in list(sd):
            sd["model." + k] = sd.pop(k)
    _write_variant(t5_files, "prefixed.pth", rename)
    with pytest.raises(ValueError) as e:
        load_t5(comfy, "prefixed.pth")
    assert "prefixed.pth" in str(e.value) and "not a umT5 text encoder" in str(e.value)
    assert "unrecognized checkpoint (first keys: model.blocks.0" in str(e.value)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pth_that_needs_code_is_refused(comfy, t5_files, capsys):
    d, _ = t5_files
    with open(os.path.join(d, "evil.pth"), "wb") as f:
        pickle.dump({"blocks.0.attn.q.weight": _Payload()}, f)
    with pytest.raises(ValueError) as e:
        load_t5(comfy, "evil.pth")
    assert "evil.pth" in str(e.value) and "refuses" in str(e.value)
    assert "this must never run" not in capsys.readouterr().out


def test_t5_without_any_tokenizer(comfy, t5_files, tmp_path, monkeypatch):
    import folder_paths
    import shutil
    shutil.copy(os.path.join(t5_files[0], t5_files[1]["int8"]), tmp_path / "lonely.pth")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders",
                        ([str(tmp_path)], folder_paths.supported_pt_extensions))
    with pytest.raises(ValueError) as e:
        load_t5(comfy, "lonely.pth")
    assert "lonely.pth" in str(e.value) and "no umT5 tokenizer" in str(e.value)


def test_t5_tokenizer_borrowed_from_a_comfy_umt5_file(comfy, t5_files, tmp_path, monkeypatch):
    import folder_paths
    import shutil
    d, names = t5_files
    shutil.copy(os.path.join(d, names["int8"]), tmp_path / "alone.pth")
    shutil.copy(os.path.join(d, names["comfy-bf16"]), tmp_path / names["comfy-bf16"])
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders",
                        ([str(tmp_path)], folder_paths.supported_pt_extensions))
    clip, report = load_t5(comfy, "alone.pth")
    assert f"borrowed from {names['comfy-bf16']}" in report
    assert encode(comfy, clip).shape == (1, 512, ef.T5_DIM)


def test_clip_vision_output_feeds_wan_image_to_video(comfy, clip_files, t5_files):
    """CLIPVisionEncode on the quantized CLIP_VISION -> WanImageToVideo, as in Wan I2V workflows."""
    from comfy_extras.nodes_wan import WanImageToVideo
    cv, _ = load_clip_vision(comfy, clip_files[1]["int8"])
    (vision_out,) = comfy[0].CLIPVisionEncode().encode(cv, ef.image(), "center")
    clip, _ = load_t5(comfy, t5_files[1]["int8"])
    pos = comfy[0].CLIPTextEncode().encode(clip, PROMPT)[0]
    neg = comfy[0].CLIPTextEncode().encode(clip, "")[0]
    out = WanImageToVideo.execute(pos, neg, None, 64, 64, 5, 1, clip_vision_output=vision_out).result
    carried = out[0][0][1]["clip_vision_output"]
    assert torch.equal(carried["penultimate_hidden_states"], vision_out["penultimate_hidden_states"])
    assert out[2]["samples"].shape == (1, 16, 2, 8, 8)


def test_every_encoder_scheme_option_resolves(comfy):
    from quant.schemes import resolve
    options = comfy[1].nodes.encoder_nodes.ENCODER_SCHEMES
    for name in options:
        assert resolve(name, namespace="encoder").scheme.is_quantized, name
    # LightX2V's bare names mean W8A8 for encoders (torchao's bare int8 would be weight-only).
    assert resolve("int8", namespace="encoder").scheme.name == "int8-w8a8"
    assert resolve("fp8", namespace="encoder").scheme.name == "fp8-w8a8"
    assert resolve("int8-q8f", namespace="encoder").backend == "q8f"
