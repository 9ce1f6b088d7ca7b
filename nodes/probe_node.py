"""Hardware Probe: what this machine's GPU and installed kernels can run, and which scheme to use."""
from __future__ import annotations

from comfy_api.latest import io

import comfy.model_management

from ..quant.hardware import describe, probe, suggest
from .encoder_nodes import ENCODER_SCHEMES
from .quantize_nodes import scheme_options
from .report_output import with_report


class QuantDiTHardwareProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantDiTHardwareProbe",
            display_name="Hardware Probe (QuantDiT)",
            category="QuantDiT",
            has_intermediate_output=True,
            description="Reads ComfyUI's GPU (name, compute capability, memory) and the kernel providers "
                        "installed, and suggests a scheme for the diffusion model and one for the encoders. "
                        "Wire dit_scheme into Quantize Model's scheme input and encoder_scheme into Quantize "
                        "Text Encoder / CLIP Vision; the report says why, and which kernel runs each scheme.",
            inputs=[],
            outputs=[
                io.Combo.Output("dit_scheme", options=scheme_options(),
                                tooltip="The scheme suggested for the diffusion model (Quantize Model)."),
                io.Combo.Output("encoder_scheme", options=ENCODER_SCHEMES,
                                tooltip="The scheme suggested for text and vision encoders."),
                io.String.Output("report", tooltip="The machine, the reasons, and the kernel per scheme."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        facts = probe(comfy.model_management.get_torch_device())
        dit, encoders = suggest(facts)
        return with_report(dit.scheme, encoders.scheme, report=describe(facts, [dit, encoders]))
