"""Nodes that quantize an already loaded MODEL: Quantize Model and Layerwise FP8 Cast."""
from __future__ import annotations

from comfy_api.latest import io

from ..quant.filters import LayerFilter, split_patterns
from ..quant.schemes import all_names, resolve
from .loader_nodes import backend_input
from .model_quantizer import quantize_model
from .report_output import with_report

_RUNTIME_SCHEMES = ["fp8-w8a8", "int8-w8a8", "fp8-block128", "fp8-weight-only", "int8-weight-only", "int4-g128"]
_NOT_RUNTIME = {"none", "default", "fp8-scaled", "fp8-e5m2-weight-only", "fp8-e5m2-scaled"}


def scheme_options() -> list[str]:
    rest = [n for n in all_names() if n not in _RUNTIME_SCHEMES and n.lower() not in _NOT_RUNTIME]
    return _RUNTIME_SCHEMES + rest


def _filter_inputs():
    return [
        io.String.Input("skip_patterns", default="", multiline=False, advanced=True,
                        tooltip="Comma-separated name fragments of layers to keep in high precision, "
                                "e.g. 'blocks.0.,ffn.2'. Norms, embeddings and the head are always "
                                "kept, and the modulation linears unless quantize_modulation is on."),
        io.Boolean.Input("keep_small_m_layers", default=False, advanced=True,
                         tooltip="Under W8A8 schemes, run the few-row layers (cross-attention k/v and "
                                 "text streams, which only see the text context, and quantized modulation) "
                                 "as 8-bit weight-only: one kernel launch instead of two, the same memory, "
                                 "but about half of bf16's GPU speed at 512 rows. Off (default): W8A8 "
                                 "there too, faster than bf16 on the GPU. Try it on when a slow CPU, not "
                                 "the GPU, bounds the step."),
        io.Boolean.Input("quantize_modulation", default=True, advanced=True,
                         tooltip="Quantize the modulation (adaLN) linears inside the blocks, about 27% of "
                                 "Flux's weights. They see one row per sample. Off: keep them in bf16, as "
                                 "LightX2V does."),
    ]


def _layer_filter(skip_patterns: str, keep_small_m_layers: bool, quantize_modulation: bool) -> LayerFilter:
    return LayerFilter(extra_skip=split_patterns(skip_patterns), few_rows_weight_only=keep_small_m_layers,
                       quantize_modulation=quantize_modulation)


class QuantDiTQuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantDiTQuantizeModel",
            display_name="Quantize Model (QuantDiT)",
            category="QuantDiT",
            has_intermediate_output=True,
            description="Quantizes the transformer-block linears of a loaded MODEL, one layer at a time. "
                        "The input MODEL is left unchanged; LoRAs applied before or after still work.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("scheme", options=scheme_options(), default="fp8-w8a8",
                               tooltip="fp8-w8a8 / int8-w8a8: 8-bit weights and activations (fastest on "
                                       "fp8/int8 tensor cores). *-weight-only and int4-g128: smaller "
                                       "weights, bf16 compute. LightX2V and torchao names work too."),
                backend_input(),
                *_filter_inputs(),
            ],
            outputs=[io.Model.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, scheme, backend, skip_patterns="", keep_small_m_layers=False,
                quantize_modulation=True) -> io.NodeOutput:
        resolved = resolve(scheme)
        if not resolved.scheme.is_quantized:
            raise ValueError(f"scheme {scheme!r} does not quantize anything; choose one of {', '.join(_RUNTIME_SCHEMES)}")
        out, report = quantize_model(model, resolved, backend,
                                     _layer_filter(skip_patterns, keep_small_m_layers, quantize_modulation),
                                     f"Quantize Model: {scheme}")
        return with_report(out, report=report.text())


class QuantDiTLayerwiseFP8Cast(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantDiTLayerwiseFP8Cast",
            display_name="Layerwise FP8 Cast (QuantDiT)",
            category="QuantDiT",
            has_intermediate_output=True,
            description="Stores the transformer-block linears as fp8 (e4m3fn or e5m2) with a scale and casts each "
                        "layer back to the compute dtype in its forward: half the weight memory, bf16/fp16 "
                        "math, works on GPUs without fp8 tensor cores.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("scale", options=["per-channel", "per-tensor"], default="per-channel",
                               tooltip="per-channel: one scale per output row (more accurate). "
                                       "per-tensor: one scale per layer (ComfyUI's scaled fp8)."),
                io.Combo.Input("storage", options=["float8_e4m3fn", "float8_e5m2"], default="float8_e4m3fn",
                               tooltip="e4m3fn: 3 mantissa bits, the accurate choice. e5m2: 2 mantissa "
                                       "bits but a much wider range, for weights with extreme outliers."),
                *_filter_inputs(),
            ],
            outputs=[io.Model.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, scale, storage="float8_e4m3fn", skip_patterns="", keep_small_m_layers=False,
                quantize_modulation=True) -> io.NodeOutput:
        scheme = {("per-channel", "float8_e4m3fn"): "fp8-weight-only", ("per-tensor", "float8_e4m3fn"): "fp8-scaled",
                  ("per-channel", "float8_e5m2"): "fp8-e5m2-weight-only",
                  ("per-tensor", "float8_e5m2"): "fp8-e5m2-scaled"}[(scale, storage)]
        out, report = quantize_model(model, resolve(scheme), "auto",
                                     _layer_filter(skip_patterns, keep_small_m_layers, quantize_modulation),
                                     f"Layerwise FP8 Cast: {storage} {scale}")
        return with_report(out, report=report.text())
