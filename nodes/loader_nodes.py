"""Loader nodes: thin wrappers that turn widget values into nodes/dit_loader calls."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..quant.backends import list_backends
from .dit_loader import COMPUTE_DTYPES, SCALED_FP8_MODES, load_quantized_dit
from .report_output import with_report


def backend_options() -> list[str]:
    return ["auto"] + sorted(list_backends())


def backend_input():
    """The kernel-provider widget every QuantDiT node shares."""
    return io.Combo.Input("backend", options=backend_options(), default="auto",
                          tooltip="Kernel provider. 'auto' picks the fastest one that can run each layer's "
                                  "scheme on your device, per call where the fastest depends on the token "
                                  "count (the report names both); a named one runs every call, or, if it "
                                  "cannot run here, falls back and the report says so.")


class QuantDiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantDiTLoader",
            display_name="Load Quantized DiT (QuantDiT)",
            category="QuantDiT/loaders",
            has_intermediate_output=True,
            description="Loads a pre-quantized diffusion transformer (LightX2V int8/fp8, LLMC export, "
                        "ComfyUI scaled fp8, or ComfyUI's own fp8 / int8 / mxfp8 quantized files) from "
                        "models/diffusion_models. The MODEL output feeds KSampler like any other.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A quantized DiT file in models/diffusion_models."),
                backend_input(),
                io.Combo.Input("compute_dtype", options=list(COMPUTE_DTYPES), default="default",
                               tooltip="dtype for activations and the unquantized layers. 'default' lets "
                                       "ComfyUI choose for your device."),
                io.Combo.Input("scaled_fp8", options=list(SCALED_FP8_MODES), default="auto", optional=True,
                               tooltip="How layers stored as fp8 with one scale per tensor (ComfyUI's scaled "
                                       "fp8 files) run. fp8-w8a8: fp8 GEMM, activations quantized per token, "
                                       "fast on GPUs with fp8 tensor cores (RTX 40xx, H100 and newer). "
                                       "fp8-scaled: the weight is widened for a bf16/fp16 matmul, as stored, "
                                       "on any device. auto: fp8-w8a8 where a fused fp8 kernel runs here, "
                                       "else fp8-scaled. Layers the file marks for a full-precision matmul "
                                       "keep it."),
            ],
            outputs=[
                io.Model.Output(),
                io.String.Output(display_name="report", tooltip="What was found: scheme per layer group "
                                 "and bytes saved."),
            ],
        )

    @classmethod
    def execute(cls, unet_name, backend, compute_dtype, scaled_fp8="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        model, report = load_quantized_dit(path, backend, compute_dtype, scaled_fp8)
        return with_report(model, report=report.text())
