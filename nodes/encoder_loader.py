"""Build ComfyUI's own CLIP (umT5 for Wan) and CLIP_VISION objects from encoder checkpoints whose
linears may be quantized; the layers run through this pack's quantized ops."""
from __future__ import annotations

import torch

import comfy.clip_vision
import comfy.model_management
import comfy.sd
import comfy.text_encoders.wan

from ..quant.encoders import clip_vision, umt5
from ..quant.encoders.checkpoint import CLIP_VISION, T5, EncoderCheckpoint, load_encoder, shape_lookup
from ..quant.errors import CheckpointError
from ..quant.report import describe_kernels
from ..quant.schemes import get_scheme
from .dit_loader import build_report
from .dynamic_vram import legacy_patcher
from .ops import QuantizedLinear, make_quant_ops
from .tokenizers import find_umt5_tokenizer


def _config(ckpt: EncoderCheckpoint, config_from_shapes) -> dict:
    try:
        return config_from_shapes(shape_lookup(ckpt))
    except KeyError as e:
        raise CheckpointError(ckpt.path, f"the encoder has no tensor {e.args[0]!r}, so its size cannot be read.",
                              "the file is incomplete or in an unknown key layout; re-download it.") from None
    except ValueError as e:
        raise CheckpointError(ckpt.path, f"{e}.", "pick a ViT-H/14 CLIP vision file.") from None


def _check_complete(ckpt: EncoderCheckpoint, missing: list[str], quantized: set[str], what: str):
    missing = [k for k in missing if k[: k.rfind(".")] not in quantized]
    if missing:
        raise CheckpointError(ckpt.path, f"{len(missing)} tensors of the {what} are missing (first: {missing[0]}).",
                              "the file is incomplete or was exported with another key layout; re-download it.")


def _report(ckpt: EncoderCheckpoint, device: torch.device, backend: str, extra_notes=()):
    report = build_report(ckpt.path, ckpt.layout, ckpt.layers)
    report.notes += list(ckpt.notes) + list(extra_notes)
    if not ckpt.layers:
        report.notes.append("no quantized layers in this file: loaded in its own precision "
                            "(quantize it with the 'Quantize Text Encoder / CLIP Vision' nodes)")
    describe_kernels(report, device, backend)
    return report


def t5_config(ckpt: EncoderCheckpoint) -> dict:
    return _config(ckpt, umt5.config_from_shapes)


def load_quantized_t5(path: str, backend: str = "auto"):
    """CLIP object for Wan (umT5) from a Wan-layout or ComfyUI-layout file; returns (clip, report)."""
    ckpt = load_encoder(path, T5)
    config = t5_config(ckpt)
    spiece, spiece_source = find_umt5_tokenizer(path, ckpt.extras.get("spiece_model"), config["vocab_size"])
    return build_t5_clip(ckpt, config, spiece, backend, [f"tokenizer: {spiece_source}"])


def build_t5_clip(ckpt: EncoderCheckpoint, config: dict, spiece, backend: str = "auto", notes=()):
    """ComfyUI's Wan text encoder holding `ckpt` (ComfyUI layout) built with `config` (see
    t5_config); `spiece` is the tokenizer model."""
    path = ckpt.path
    norm_dtype = ckpt.state_dict["encoder.final_layer_norm.weight"].dtype
    ops = make_quant_ops(ckpt.layers, path, None if backend == "auto" else backend)

    class Target:
        clip = comfy.text_encoders.wan.te(dtype_t5=norm_dtype if norm_dtype in (torch.bfloat16, torch.float16) else None)
        tokenizer = comfy.text_encoders.wan.WanT5Tokenizer
        params: dict = {}

    options = {"custom_operations": ops, "umt5xxl_model_config": config,
               # Build on the offload device: the quantized data replaces the placeholders before
               # anything reaches the GPU, so VRAM never holds a bf16-sized copy.
               "initial_device": comfy.model_management.text_encoder_offload_device()}
    clip = comfy.sd.CLIP(Target, tokenizer_data={"spiece_model": spiece},
                         parameters=sum(t.numel() for t in ckpt.state_dict.values()), model_options=options,
                         disable_dynamic=True)  # quantized layers stay out of DynamicVRAM (nodes/dynamic_vram.py)
    missing, _ = clip.load_sd(ckpt.state_dict)
    _check_complete(ckpt, missing, set(ckpt.layers), "umT5 encoder")
    unclaimed = sorted(set(ckpt.layers) - ops.loaded_layers)
    if unclaimed:
        raise CheckpointError(path, "is quantized but the umT5 encoder has no such Linear.",
                              "the file does not match ComfyUI's umT5; re-export it.", unclaimed[0])
    return clip, _report(ckpt, clip.patcher.load_device, backend, notes)


def load_quantized_clip_vision(path: str, backend: str = "auto"):
    """ComfyUI ClipVisionModel (ViT-H) from Wan's CLIP file or a ComfyUI-layout one; (model, report)."""
    ckpt = load_encoder(path, CLIP_VISION)
    config = _config(ckpt, clip_vision.config_from_shapes)
    model = comfy.clip_vision.ClipVisionModel(config)
    model.patcher = legacy_patcher(model.patcher)
    pref = None if backend == "auto" else backend
    sd = dict(ckpt.state_dict)
    for name, q in ckpt.layers.items():
        try:
            target = model.model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(path, "is quantized but ComfyUI's CLIP vision model has no such layer.",
                                  "the file does not match ViT-H; re-export it.", name) from None
        if (target.out_features, target.in_features) != q.shape:
            raise CheckpointError(path, f"weight is {list(q.shape)} but the model expects "
                                  f"{[target.out_features, target.in_features]}.", "re-export the file.", name)
        layer = QuantizedLinear.from_quantized(sd.pop(name + ".weight"), sd.pop(name + ".weight_scale"),
                                               get_scheme(q.scheme), q.shape, sd.pop(name + ".bias", None), pref)
        parent, _, child = name.rpartition(".")
        setattr(model.model.get_submodule(parent), child, layer)
    missing, _ = model.load_sd(sd)
    _check_complete(ckpt, missing, set(ckpt.layers), "CLIP vision tower")
    return model, _report(ckpt, model.load_device, backend)
