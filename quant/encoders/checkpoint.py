"""Read a umT5 or CLIP-vision checkpoint (.pth or .safetensors, quantized or not) into ComfyUI's
key layout, keeping quantized linears as `X.weight` + `X.weight_scale` with their plan."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from .. import reference
from ..errors import CheckpointError
from ..formats.detect import LayerQuant, plan_checkpoint
from ..formats.identify import describe
from ..formats.load import layout_of, normalized_state_dict
from ..formats.pth_file import open_tensor_file
from ..schemes import get_scheme
from . import clip_vision, umt5

T5 = "umt5"
CLIP_VISION = "clip-vision"
# Which module names are Linears ComfyUI builds (anything else quantized in a file, such as an
# fp8 token embedding, is dequantized at load).
_LINEARS = {
    T5: re.compile(r"\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wo))$"),
    CLIP_VISION: re.compile(r"\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])$"),
}


@dataclass
class EncoderCheckpoint:
    path: str
    kind: str
    state_dict: dict[str, torch.Tensor]
    layers: dict[str, LayerQuant]      # ComfyUI module name -> how it is quantized
    layout: str                        # e.g. "wan-original / lightx2v"
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. the tokenizer blob
    notes: list[str] = field(default_factory=list)


def _wrong_kind(path: str, keys, wanted: str, fix: str) -> CheckpointError:
    return CheckpointError(path, f"this is not {wanted}: it looks like {describe(keys)}.", fix)


def load_encoder(path: str, kind: str) -> EncoderCheckpoint:
    f = open_tensor_file(path)
    keys = f.keys()
    if kind == T5:
        source_layout = umt5.layout(keys)
        if source_layout is None:
            raise _wrong_kind(path, keys, "a umT5 text encoder",
                              "pick Wan's umT5 (models_t5_umt5-xxl-enc-*.pth or umt5_xxl_*.safetensors) in "
                              "models/text_encoders.")
    else:
        source_layout = clip_vision.layout(keys)
        if source_layout is None:
            raise _wrong_kind(path, keys, "a CLIP vision encoder",
                              "pick Wan's CLIP (models_clip_open-clip-xlm-roberta-large-vit-huge-14*.pth) or "
                              "a clip_vision_h .safetensors in models/clip_vision.")
    plan = plan_checkpoint(f)
    sd = normalized_state_dict(f, plan)
    ckpt = EncoderCheckpoint(path, kind, sd, {q.layer: q for q in plan.layers.values()},
                             f"{source_layout} / {layout_of(plan)}")
    if "spiece_model" in sd:
        ckpt.extras["spiece_model"] = sd.pop("spiece_model")
    if kind == T5 and source_layout == umt5.WAN:
        _rename(ckpt, umt5.comfy_key)
    elif kind == CLIP_VISION and source_layout == clip_vision.WAN:
        _wan_clip_to_comfy(ckpt)
    _dequantize_non_linears(ckpt)
    return ckpt


def _rename(ckpt: EncoderCheckpoint, new_key: Callable[[str], Optional[str]]):
    sd, dropped = {}, []
    for key, t in ckpt.state_dict.items():
        k = new_key(key)
        if k is None:
            dropped.append(key)
        else:
            sd[k] = t
    layers = {}
    for name, q in ckpt.layers.items():
        k = new_key(name + ".weight")
        if k is None:
            raise CheckpointError(ckpt.path, "is quantized but has no place in the encoder.",
                                  "re-export the file from the original encoder.", name)
        layers[k[: -len(".weight")]] = replace(q, layer=k[: -len(".weight")])
    ckpt.state_dict, ckpt.layers = sd, layers
    if dropped:
        ckpt.notes.append(f"{len(dropped)} tensors outside the encoder were not loaded (first: {dropped[0]})")


def _wan_clip_to_comfy(ckpt: EncoderCheckpoint):
    sd = ckpt.state_dict
    for key in [k for k in sd if clip_vision.is_qkv(k)]:
        for target, part in zip(clip_vision.qkv_targets(key), clip_vision.split_qkv(sd.pop(key))):
            sd[target] = part
    layers = {}
    for name, q in ckpt.layers.items():
        if clip_vision.is_qkv(name + ".weight"):
            out_f, in_f = q.shape
            for target in clip_vision.qkv_targets(name + ".weight"):
                layer = target[: -len(".weight")]
                layers[layer] = replace(q, layer=layer, shape=(out_f // 3, in_f))
        else:
            layers[name] = q
    ckpt.layers = layers
    try:
        extra = clip_vision.embeddings(sd.pop("visual.cls_embedding"), sd.pop("visual.pos_embedding"),
                                       sd.pop("visual.head", None))
    except KeyError as e:
        raise CheckpointError(ckpt.path, f"the vision tower has no {e.args[0]} tensor.",
                              "the file is incomplete; re-download it.") from None
    text_tower = [k for k in sd if not k.startswith(("visual.", "vision_model."))]
    for k in text_tower:
        del sd[k]
    ckpt.layers = {n: q for n, q in ckpt.layers.items() if n.startswith(("visual.", "vision_model."))}
    if text_tower:
        ckpt.notes.append(f"the text tower and logit scale ({len(text_tower)} tensors) were not loaded: "
                          "CLIP_VISION uses only the vision tower")
    _rename(ckpt, lambda k: k if k.startswith("vision_model.") else clip_vision.comfy_key(k))
    ckpt.state_dict.update(extra)


def _dequantize_non_linears(ckpt: EncoderCheckpoint):
    linear = _LINEARS[ckpt.kind]
    for name in [n for n in ckpt.layers if not linear.search(n)]:
        q = ckpt.layers.pop(name)
        qdata = ckpt.state_dict[name + ".weight"]
        scale = ckpt.state_dict.pop(name + ".weight_scale")
        w = reference.dequantize_weight(qdata, scale, get_scheme(q.scheme), q.shape[1])
        ckpt.state_dict[name + ".weight"] = w.to(torch.bfloat16)
        ckpt.notes.append(f"{name} is stored quantized but is not a Linear here: dequantized to bf16")


def shape_lookup(ckpt: EncoderCheckpoint):
    def shape_of(key: str) -> tuple[int, ...]:
        return tuple(ckpt.state_dict[key].shape)
    return shape_of
