"""Save Quantized DiT: writes a quantized MODEL once, for Load Quantized DiT to load next time."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..quant.convert import COMFY_NATIVE, COMFY_SCALED, LIGHTX2V
from .quantized_saver import SaveRefused, plan, write
from .report_output import with_report

_LAYOUT_NAMES = {LIGHTX2V: "LightX2V layout", COMFY_SCALED: "ComfyUI scaled fp8 (stock ComfyUI loads it too)",
                 COMFY_NATIVE: "ComfyUI's own (comfy_quant entries; stock ComfyUI loads it too)"}
LAYOUT_CHOICES = ("auto", LIGHTX2V, COMFY_NATIVE)


def output_path(filename_prefix: str, base: str) -> str:
    """A new file under `base`: `<prefix>_00001_.safetensors`, the counter past every existing file
    of that prefix, so nothing is ever overwritten."""
    folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, base)
    os.makedirs(folder, exist_ok=True)
    while True:
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
        if not os.path.exists(path):
            return path
        counter += 1


class QuantDiTSaveQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantDiTSaveQuantized",
            display_name="Save Quantized DiT (QuantDiT)",
            category="QuantDiT",
            has_intermediate_output=True,
            is_output_node=True,
            description="Writes the quantized diffusion model of a MODEL (from Quantize Model, Layerwise FP8 Cast "
                        "per-tensor or Load Quantized DiT) to models/diffusion_models, so the next run loads it "
                        "with Load Quantized DiT instead of quantizing again. W8A8, block-128 and 8-bit "
                        "weight-only layers are written in LightX2V's layout, per-tensor fp8 in ComfyUI's scaled "
                        "fp8, or (layout: comfyui) int8 W8A8 and per-tensor fp8 in ComfyUI's own layout. A new "
                        "file every run; the source checkpoint is never touched.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("filename_prefix", default="quantdit/dit",
                                tooltip="File name (and subfolder) under models/diffusion_models; a counter "
                                        "is appended, so an existing file is never overwritten."),
                io.Combo.Input("layout", options=list(LAYOUT_CHOICES), default="auto", optional=True,
                               tooltip="auto: LightX2V's layout for W8A8, block-128 and 8-bit weight-only "
                                       "layers, ComfyUI's scaled fp8 for per-tensor fp8. comfyui: ComfyUI's "
                                       "own layout, which stock ComfyUI's Load Diffusion Model also reads; it "
                                       "holds int8 W8A8 (as int8_tensorwise) and per-tensor fp8. lightx2v: "
                                       "LightX2V's layout, also read by LightX2V."),
            ],
            outputs=[io.String.Output(display_name="report",
                                      tooltip="Where the file went, its layout, layers and size.")],
        )

    @classmethod
    def execute(cls, model, filename_prefix="quantdit/dit", layout="auto") -> io.NodeOutput:
        try:
            planned, metadata, layout, counts = plan(model, layout)  # refuses before any folder or file is made
        except SaveRefused as e:
            raise ValueError(f"Save Quantized DiT: {e}") from None
        base = folder_paths.get_folder_paths("diffusion_models")[0]
        path = output_path(filename_prefix, base)
        size = write(planned, metadata, path)
        layers = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        report = (f"QuantDiT: saved {os.path.relpath(path, base)} in models/diffusion_models\n"
                  f"layout: {_LAYOUT_NAMES[layout]}\n"
                  f"quantized layers: {layers}\n"
                  f"size: {size / 2 ** 20:.1f} MiB\n"
                  "load it with Load Quantized DiT (refresh the page to see it in the list)")
        return with_report(report=report)
