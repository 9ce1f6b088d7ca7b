"""Small random encoders in the released files' key layouts, plus LightX2V-style quantized copies.

Pure torch (and sentencepiece for the tokenizer). Used by the tests, the demo and the GPU bench:
- `umt5_wan`: Wan's umT5 encoder layout (`models_t5_umt5-xxl-enc-bf16.pth`); the defaults of
  `umt5_xxl_shape` are the real XXL sizes.
- `clip_wan`: Wan's open-clip XLM-RoBERTa / ViT-H CLIP layout (vision tower + a token text tower).
- `lightx2v_quantize`: what LightX2V's converter writes: the attention/FFN (T5) or attention/MLP
  (CLIP) weights as int8 or fp8 with a per-output-channel `weight_scale` [out, 1] in the source
  dtype, every other tensor as it was; the CLIP text tower dropped.
- `train_spiece`: a tiny SentencePiece model with T5's special ids (pad 0, eos 1, unk 2).
"""
from __future__ import annotations

import io
import re

import torch

from quant import reference
from quant.schemes import get_scheme
from scripts.tiny_models import _Random

UMT5_XXL = dict(dim=4096, ffn_dim=10240, heads=64, layers=24, vocab=256384, buckets=32)


def umt5_wan(dim=64, ffn_dim=160, heads=4, layers=2, vocab=384, buckets=32, seed=0,
             dtype=torch.bfloat16, device="cpu") -> dict[str, torch.Tensor]:
    g = _Random(seed, device, dtype)
    sd = {"token_embedding.weight": g.randn(vocab, dim, scale=0.5)}
    for i in range(layers):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"] = g.full(1.0, dim) + g.randn(dim, scale=0.05)
        for p in "qkvo":
            # T5 does not scale q.k by 1/sqrt(head_dim): shrink q and k so random logits stay O(1).
            gain = (dim // heads) ** -0.25 if p in "qk" else 1.0
            sd[f"{b}attn.{p}.weight"] = g.randn(dim, dim, scale=gain * dim ** -0.5)
        sd[b + "norm2.weight"] = g.full(1.0, dim) + g.randn(dim, scale=0.05)
        sd[b + "ffn.gate.0.weight"] = g.randn(ffn_dim, dim, scale=dim ** -0.5)
        sd[b + "ffn.fc1.weight"] = g.randn(ffn_dim, dim, scale=dim ** -0.5)
        sd[b + "ffn.fc2.weight"] = g.randn(dim, ffn_dim, scale=ffn_dim ** -0.5)
        sd[b + "pos_embedding.embedding.weight"] = g.randn(buckets, heads, scale=0.5)
    sd["norm.weight"] = g.full(1.0, dim)
    return sd


def clip_wan(dim=160, mlp_dim=640, layers=3, patch=14, image=56, out_dim=96, text_dim=32, seed=0,
             dtype=torch.float16) -> dict[str, torch.Tensor]:
    """ViT-H-style vision tower (head width 80, so dim is a multiple of 80) and a token text tower."""
    g = _Random(seed, "cpu", dtype)
    tokens = (image // patch) ** 2 + 1
    v = "visual."
    sd = {v + "patch_embedding.weight": g.randn(dim, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
          v + "cls_embedding": g.randn(1, 1, dim, scale=0.5),
          v + "pos_embedding": g.randn(1, tokens, dim, scale=0.1),
          v + "pre_norm.weight": g.full(1.0, dim), v + "pre_norm.bias": g.randn(dim, scale=0.02)}
    for i in range(layers):
        b = f"{v}transformer.{i}."
        for n in ("norm1", "norm2"):
            sd[b + n + ".weight"] = g.full(1.0, dim) + g.randn(dim, scale=0.05)
            sd[b + n + ".bias"] = g.randn(dim, scale=0.02)
        for name, out_f, in_f in (("attn.to_qkv", 3 * dim, dim), ("attn.proj", dim, dim),
                                  ("mlp.0", mlp_dim, dim), ("mlp.2", dim, mlp_dim)):
            sd[b + name + ".weight"] = g.randn(out_f, in_f, scale=in_f ** -0.5)
            sd[b + name + ".bias"] = g.randn(out_f, scale=0.02)
    sd[v + "post_norm.weight"] = g.full(1.0, dim)
    sd[v + "post_norm.bias"] = g.full(0.0, dim)
    sd[v + "head"] = g.randn(dim, out_dim, scale=dim ** -0.5)
    sd["textual.token_embedding.weight"] = g.randn(50, text_dim)
    sd["textual.blocks.0.attn.q.weight"] = g.randn(text_dim, text_dim)
    sd["log_scale"] = torch.tensor(4.6, dtype=dtype)
    return sd


_LIGHTX2V_TARGETS = {"t5": re.compile(r"^blocks\.\d+\.(attn|ffn)\..*weight$"),
                     "clip": re.compile(r"^visual\.transformer\.\d+\.(attn|mlp)\..*weight$")}


def lightx2v_quantize(sd: dict[str, torch.Tensor], fmt: str, kind: str) -> dict[str, torch.Tensor]:
    """LightX2V's converter output for `fmt` in {"int8", "fp8"} and `kind` in {"t5", "clip"}."""
    scheme = get_scheme("int8-w8a8" if fmt == "int8" else "fp8-w8a8")
    target = _LIGHTX2V_TARGETS[kind]
    out = {}
    for k, t in sd.items():
        if kind == "clip" and k.startswith("textual."):
            continue
        if target.match(k) and t.dim() == 2:
            q, s = reference.quantize_weight(t.float(), scheme)
            out[k] = q
            out[k + "_scale"] = s.reshape(-1, 1).to(t.dtype)  # the converter keeps the source dtype
        else:
            out[k] = t
    return out


def train_spiece(vocab_size=300) -> bytes:
    """A SentencePiece model proto trained on a few sentences (ids: pad 0, eos 1, unk 2)."""
    import sentencepiece as spm
    words = ("a cat walks on the beach at sunset while waves roll in slowly under a purple sky "
             "the camera pans over a city of glass towers and a red train crosses a bridge in the rain "
             "two dogs play in fresh snow near a wooden cabin with smoke rising from the chimney").split()
    sentences = [" ".join(words[i:i + 9]) for i in range(0, len(words) - 9)] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   character_coverage=1.0, model_type="unigram", minloglevel=2)
    return buf.getvalue()
