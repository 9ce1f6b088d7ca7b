"""Which Linear layers of a DiT are worth quantizing, with the reason for each skip.

Defaults follow what LightX2V quantizes: the attention and FFN linears inside transformer blocks.
Norms, embeddings (patch/time/text/image), modulation (adaLN) and the output head stay in high
precision: they are small and sensitive to quantization.

`quantize_modulation` (on in the runtime Quantize Model / FP8 Cast nodes, off for LightX2V files)
also quantizes the modulation linears inside the blocks (Flux `img_mod.lin` / `modulation.lin`,
Qwen-Image `img_mod.1`): about a quarter of Flux's block weights. They see one row per sample
(the time/guidance vector).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

_BLOCK = re.compile(r"(^|\.)(blocks|block|double_blocks|single_blocks|transformer_blocks|layers|vace_blocks)\.\d+\.")
_SENSITIVE = re.compile(r"(^|[._])([a-z_]*norm[a-z_0-9]*|[a-z_]*mod|modulation|adaLN_modulation|"
                        r"[a-z_]*emb[a-z_]*|relative_attention_bias|head|proj_out|final_layer)([._]|$)")
# A Linear that is a child of a modulation module (Flux / HunyuanVideo `img_mod.lin`, `txt_mod.lin`,
# `modulation.lin`; Qwen-Image `img_mod.1`, `txt_mod.1`; DiT-style `adaLN_modulation.1`).
_MODULATION = re.compile(r"(^|\.)(img_mod|txt_mod|modulation|adaLN_modulation)\.[^.]+$")


def split_patterns(text: str) -> tuple[str, ...]:
    """A widget's comma-separated name fragments ("blocks.0., ffn.2") as LayerFilter.extra_skip."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def is_modulation(name: str) -> bool:
    """A modulation (adaLN) Linear inside a transformer block."""
    return bool(_MODULATION.search(name)) and bool(_BLOCK.search(name + "."))


@dataclass(frozen=True)
class LayerFilter:
    min_dim_multiple: int = 16        # tensor-core GEMMs need K and N multiples of 16
    blocks_only: bool = True          # only layers inside transformer blocks
    extra_skip: tuple[str, ...] = ()  # substrings the user wants kept in high precision
    # Layers fed by the text/image context (<= 512 rows per sample): Wan cross-attention k/v;
    # Flux / HunyuanVideo text streams; Qwen-Image's added text projections.
    small_m_patterns: tuple[str, ...] = ("cross_attn.k", "cross_attn.v", "txt_attn", "txt_mlp", "add_q_proj",
                                         "add_k_proj", "add_v_proj", "to_add_out")
    # Quantize the modulation linears inside the blocks too (see above).
    # Off by default: LightX2V files keep them in bf16 and its loader expects that.
    quantize_modulation: bool = False
    # Run the few-row layers above (and quantized modulation) as 8-bit weight-only under W8A8: one
    # kernel launch instead of two. Off by default: in GPU time W8A8 is 1.1-1.3x bf16 at 512 rows and
    # 1.4-1.5x at 2, the weight-only kernels 0.4-0.6x and 1.0x (H100, bench/bench_gemm.py few-rows).
    # Worth turning on only where Python launch overhead, not the GPU, bounds the step.
    few_rows_weight_only: bool = False

    def skip_reason(self, name: str, shape: tuple[int, ...]) -> Optional[str]:
        """None if the layer should be quantized, else a short reason."""
        if len(shape) != 2:
            return "not a Linear weight"
        if self.blocks_only and not _BLOCK.search(name + "."):
            return "outside the transformer blocks (embedding, time/text projection or head)"
        if _SENSITIVE.search(name) and not (self.quantize_modulation and is_modulation(name)):
            return "norm / modulation / embedding / head layer (kept in high precision)"
        for s in self.extra_skip:
            if s and s in name:
                return f"matches the user skip pattern {s!r}"
        out_f, in_f = shape
        m = self.min_dim_multiple
        if m > 1 and (out_f % m or in_f % m):
            return f"shape {out_f}x{in_f} is not a multiple of {m}"
        return None

    def is_small_m(self, name: str) -> bool:
        return any(p in name for p in self.small_m_patterns)

    def runs_weight_only(self, name: str, scheme) -> bool:
        """With `few_rows_weight_only`, a W8A8 scheme on a few-row layer runs as 8-bit weight-only
        there (quant.schemes.weight_only_partner), saving the activation-quant launch."""
        few_rows = self.is_small_m(name) or (self.quantize_modulation and is_modulation(name))
        return scheme.quantizes_activation and self.few_rows_weight_only and few_rows


DEFAULT_FILTER = LayerFilter()
# Encoders (umT5 `encoder.block.N`, CLIP `encoder.layers.N`): the attention and MLP/FFN linears of
# every block, as LightX2V quantizes them. Prompts are one fixed length, so no few-row layers.
ENCODER_FILTER = LayerFilter(small_m_patterns=())
