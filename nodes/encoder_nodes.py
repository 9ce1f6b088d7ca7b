"""Nodes for text and image encoders: load quantized umT5 / CLIP vision files, quantize loaded ones."""
from __future__ import annotations

import copy
import dataclasses

import folder_paths
from comfy_api.latest import io

from ..quant.filters import ENCODER_FILTER, split_patterns
from ..quant.schemes import resolve
from .encoder_loader import load_quantized_clip_vision, load_quantized_t5
from .loader_nodes import backend_input
from .model_quantizer import quantize_model
from .report_output import with_report

# The seeds' t5_quant_scheme / clip_quant_scheme names first, then the canonical schemes. The
# weight-only fp8 entries are the layerwise fp8 cast (fp8 storage, compute in the model dtype).
ENCODER_SCHEMES = ["int8", "fp8", "int8-vllm", "fp8-sgl", "int8-q8f", "fp8-q8f", "int8-torchao",
                   "int8-w8a8", "fp8-w8a8", "int8-weight-only", "fp8-weight-only", "fp8-scaled",
                   "fp8-e5m2-weight-only", "int4-g128"]
_SCHEME_TOOLTIP = ("int8 / fp8 (LightX2V's names, also int8-vllm, fp8-sgl, *-q8f, int8-torchao): 8-bit "
                   "weights and activations. *-weight-only and fp8-scaled: layerwise fp8/int8 cast, 8-bit "
                   "storage with compute in the encoder's precision (any GPU). int4-g128: smallest weights.")


def _skip_input():
    return io.String.Input("skip_patterns", default="", advanced=True,
                           tooltip="Comma-separated name fragments of layers to keep in high precision, e.g. "
                                   "'block.0.,wo'. Embeddings, norms, relative position tables and the final "
                                   "projection are always kept.")


class QuantDiTT5Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantDiTT5Loader",
            display_name="Load Quantized T5 Encoder (QuantDiT)",
            category="QuantDiT/loaders",
            has_intermediate_output=True,
            description="Loads Wan's umT5-XXL text encoder from models/text_encoders: LightX2V's "
                        "models_t5_umt5-xxl-enc-{int8,fp8}.pth, Wan's original bf16 .pth, or ComfyUI's "
                        "umt5_xxl_*.safetensors (fp8_scaled included). The CLIP output feeds CLIPTextEncode.",
            inputs=[
                io.Combo.Input("clip_name", options=folder_paths.get_filename_list("text_encoders"),
                               tooltip="The umT5 file. The tokenizer is read from the file, from "
                                       "google/umt5-xxl/spiece.model next to it, or from a ComfyUI umt5 "
                                       "file in the same folder."),
                backend_input(),
            ],
            outputs=[io.Clip.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, clip_name, backend="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        clip, report = load_quantized_t5(path, backend)
        return with_report(clip, report=report.text())


class QuantDiTCLIPVisionLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantDiTCLIPVisionLoader",
            display_name="Load Quantized CLIP Vision (QuantDiT)",
            category="QuantDiT/loaders",
            has_intermediate_output=True,
            description="Loads the ViT-H/14 image encoder Wan I2V uses from models/clip_vision: LightX2V's "
                        "models_clip_open-clip-xlm-roberta-large-vit-huge-14-{int8,fp8}.pth, Wan's original "
                        ".pth, or a ComfyUI clip_vision_h file. The output feeds CLIPVisionEncode.",
            inputs=[
                io.Combo.Input("clip_name", options=folder_paths.get_filename_list("clip_vision"),
                               tooltip="The CLIP vision file."),
                backend_input(),
            ],
            outputs=[io.ClipVision.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, clip_name, backend="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("clip_vision", clip_name)
        model, report = load_quantized_clip_vision(path, backend)
        return with_report(model, report=report.text())


def _quantize_encoder(patcher, scheme: str, backend: str, skip_patterns: str, title: str):
    resolved = resolve(scheme, namespace="encoder")
    if not resolved.scheme.is_quantized:
        raise ValueError(f"scheme {scheme!r} does not quantize anything; choose one of {', '.join(ENCODER_SCHEMES)}")
    layer_filter = dataclasses.replace(ENCODER_FILTER, extra_skip=split_patterns(skip_patterns))
    return quantize_model(patcher, resolved, backend, layer_filter, f"{title}: {scheme}", root="")


class QuantDiTQuantizeTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantDiTQuantizeTextEncoder",
            display_name="Quantize Text Encoder (QuantDiT)",
            category="QuantDiT",
            has_intermediate_output=True,
            description="Quantizes the attention and feed-forward linears of a loaded text encoder (umT5, T5, "
                        "CLIP text) one layer at a time; the input CLIP is left unchanged.",
            inputs=[io.Clip.Input("clip"),
                    io.Combo.Input("scheme", options=ENCODER_SCHEMES, default="int8", tooltip=_SCHEME_TOOLTIP),
                    backend_input(), _skip_input()],
            outputs=[io.Clip.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, clip, scheme, backend="auto", skip_patterns="") -> io.NodeOutput:
        patcher, report = _quantize_encoder(clip.patcher, scheme, backend, skip_patterns, "Quantize Text Encoder")
        out = clip.clone()
        out.patcher = patcher
        out.cond_stage_model = patcher.model  # a fresh load when the input was under DynamicVRAM
        return with_report(out, report=report.text())


class QuantDiTQuantizeCLIPVision(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantDiTQuantizeCLIPVision",
            display_name="Quantize CLIP Vision (QuantDiT)",
            category="QuantDiT",
            has_intermediate_output=True,
            description="Quantizes the attention and MLP linears of a loaded CLIP vision encoder one layer at "
                        "a time; the input CLIP_VISION is left unchanged.",
            inputs=[io.ClipVision.Input("clip_vision"),
                    io.Combo.Input("scheme", options=ENCODER_SCHEMES, default="int8", tooltip=_SCHEME_TOOLTIP),
                    backend_input(), _skip_input()],
            outputs=[io.ClipVision.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, clip_vision, scheme, backend="auto", skip_patterns="") -> io.NodeOutput:
        patcher, report = _quantize_encoder(clip_vision.patcher, scheme, backend, skip_patterns,
                                            "Quantize CLIP Vision")
        out = copy.copy(clip_vision)  # shares the model; the clone patcher swaps layers in at load
        out.patcher = patcher
        out.model = patcher.model
        return with_report(out, report=report.text())
