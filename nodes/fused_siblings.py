"""Sibling linears that read one tensor, run as one GEMM over their stacked weights.

- Wan's cross-attention k and v (and image-to-video's k_img / v_img) read the context: 512 text
  tokens per prompt (1024 rows with ComfyUI's cond/uncond batch), 257 image tokens.
- Qwen-Image's joint attention projects its image stream with to_q / to_k / to_v and its text
  stream with add_q_proj / add_k_proj / add_v_proj, each trio on one tensor.
One 3072- or 5120-wide GEMM leaves much of a large GPU idle at these row counts (a few hundred text
rows; the last round of tiles at a few thousand image rows), and each linear pays its own launches;
one GEMM over the stacked weights fills it. Measured on an H100 at 1024 rows (graph timing,
activation quant included, bench/bench_gemm.py --models comfyui-text, README): Wan's k and v as
one 10240-wide W8A8 GEMM took 84-88 us against 153 us for ComfyUI's two bf16 GEMMs; two quantized
GEMMs sharing one quant took 96-101 us.

The first member called computes every member's output, returns its own and keeps the others',
which they take if handed that same tensor object (a weak reference, as in SharedQuant); any other
input runs the layer's own GEMM. The members' weights become consecutive slices of one buffer the
first time they run on a device (ComfyUI moves each parameter on its own, so after a load they are
apart again), which replaces the separate copies: no memory is added. Only per-token W8A8 layers
are fused (their per-channel weight scales stack like the weights), and only up to MAX_ROWS input
rows: the kept outputs live until their layers are called.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from ..quant.backends import run_linear
from ..quant.deferred import consumes_deferred
from ..quant.report import QuantReport
from ..quant.shared_quant import version_of
from ..quant.stacked_weights import into_one_buffer, stacked
from .ops import QuantLinearMixin

# (what a module's path ends with, or "" for any, a child it must have, the sibling groups).
# Only modules whose siblings always read one tensor: Wan's self-attention q/k/v do too, but at
# 32760 rows the kept outputs would cost hundreds of MB and the GEMMs already fill the GPU.
GROUPS = (
    ("cross_attn", "k", (("k", "v"), ("k_img", "v_img"))),                                # Wan
    ("", "add_q_proj", (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))),  # Qwen-Image
)
# Inputs with more rows run each layer's own GEMM: at 8192 rows of a 3072-wide trio the kept outputs
# take 100 MB, and the separate GEMMs fill the GPU well enough.
MAX_ROWS = 8192


class FusedSiblings:
    """Quantized linears of one width and scheme that read one tensor (see above)."""

    def __init__(self, members: tuple):
        self.members = tuple(members)
        self._source: Optional[weakref.ref] = None
        self._version = None
        self._kept: dict = {}                    # member -> its [rows, out] output, for `take`
        self._small: Optional[tuple] = None      # (key, stacked scale, stacked bias)
        self.fused_calls = 0                     # GEMMs run for all members (read by tests)

    def take(self, member: QuantLinearMixin, x: torch.Tensor) -> Optional[torch.Tensor]:
        """`member`'s output for `x` if a sibling computed it from this very tensor, else None."""
        if member not in self._kept or self._source() is not x:
            return None
        out = self._kept.pop(member)
        if self._version != version_of(x):  # written in place since: the kept outputs are stale
            self._forget()
            return None
        if not self._kept:
            self._forget()
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def run(self, member: QuantLinearMixin, x: torch.Tensor, x2d, backend) -> Optional[torch.Tensor]:
        """`member`'s [rows, out] output from one GEMM of all the members' weights, keeping the
        others' for `take`; None where they cannot run as one here (the caller runs its own GEMM)."""
        if type(x) is not torch.Tensor or x2d.shape[0] > MAX_ROWS or torch.compiler.is_compiling():
            return None
        if any(len(m.weight_function) or len(m.bias_function) for m in self.members):
            return None  # lowvram LoRA: each computes its own patched weight
        weight = self._stacked_weight(x.device)
        if weight is None:
            return None
        small = self._stacked_scale_bias(x.device, x.dtype)
        if small is None:
            return None
        first = self.members[0]
        y = run_linear(x2d, weight, *small, first.quant_scheme, first.in_features, backend)
        self._forget()
        mine, start = None, 0
        for m in self.members:
            part = y[:, start:start + m.out_features]
            start += m.out_features
            if m is member:
                mine = part
            else:
                self._kept[m] = part
        self._source = weakref.ref(x, self._dropped)
        self._version = version_of(x)
        self.fused_calls += 1
        return mine

    def _stacked_weight(self, device: torch.device) -> Optional[torch.Tensor]:
        weights = [m.weight for m in self.members]
        if any(w.device != device for w in weights):
            return None  # offloaded (lowvram): ComfyUI casts each weight per call
        view = stacked(*weights)
        if view is None:  # after a load, or a LoRA patch replaced one of them
            for m, piece in zip(self.members, into_one_buffer(*weights)):
                m.replace_weight(piece)
            view = stacked(*[m.weight for m in self.members])
        return view

    def _stacked_scale_bias(self, device: torch.device, dtype: torch.dtype):
        # Small ([out] each): stacked once per (scales, biases, device, dtype), not per call.
        scales = [m.current_scale() for m in self.members]
        biases = [m.bias for m in self.members]
        stamps = tuple(None if t is None else (id(t), t.data_ptr(), version_of(t), t.device) for t in scales + biases)
        key = (stamps, device, dtype)
        if self._small is None or self._small[0] != key:
            if any(s.numel() != m.out_features for m, s in zip(self.members, scales)):
                return None  # not one scale per output channel: nothing to stack
            shape = (-1, *scales[0].shape[1:])  # the layout the members' scales have ([out] or [out, 1])
            scale = torch.cat([s.to(device, torch.float32).reshape(shape) for s in scales])
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([torch.zeros(m.out_features, device=device, dtype=dtype) if b is None
                                  else b.to(device, dtype) for m, b in zip(self.members, biases)])
            self._small = (key, scale, bias)
        return self._small[1], self._small[2]

    def _forget(self) -> None:
        self._source, self._version, self._kept = None, None, {}

    def _dropped(self, ref: weakref.ref) -> None:
        if self._source is ref:  # the input is gone: its kept outputs can never be asked for
            self._forget()

    @property
    def holds(self) -> bool:
        return bool(self._kept)


def _fusable(members) -> bool:
    first = members[0]
    return all(isinstance(m, QuantLinearMixin) and m.quant_scheme is not None for m in members) \
        and consumes_deferred(first.quant_scheme) \
        and all(m.quant_scheme is first.quant_scheme and m.in_features == first.in_features
                and m.quant_backend_pref == first.quant_backend_pref for m in members)


def fuse_sibling_linears(patcher, report: QuantReport, root: str = "diffusion_model") -> int:
    """Gives each group of GROUPS' quantized siblings under `root` one FusedSiblings (the modules
    are this pack's: object patches of the caller's clone, or a model this pack loaded); notes it
    in `report`; returns how many groups were made."""
    made = 0
    for name, module in patcher.get_model_object(root).named_modules():
        for suffix, marker, groups in GROUPS:
            if not name.endswith(suffix) or marker not in module._modules:
                continue
            for names in groups:
                if not all(n in module._modules for n in names):
                    continue
                members = tuple(patcher.get_model_object(f"{root}.{name}.{n}") for n in names)
                if _fusable(members):
                    fused = FusedSiblings(members)
                    for m in members:
                        m.quant_fused = fused
                    made += 1
    if made:
        report.notes.append(f"{made} groups of sibling linears (k/v, q/k/v) on one input run as one GEMM")
    return made
