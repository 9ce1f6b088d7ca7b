"""Wan's cross-attention k and v (and image-to-video's k_img / v_img) as one GEMM.

Both linears of a pair read the same context tensor, back to back: 512 text tokens per prompt
(1024 rows with ComfyUI's cond/uncond batch), 257 image tokens. At so few rows one 5120-wide GEMM
leaves much of a large GPU idle in its last round of tiles, and each linear pays its own launches;
one GEMM over the stacked [k; v] weight fills it. Measured on an H100 at 1024 rows (graph timing,
activation quant included, bench/bench_gemm.py --models comfyui-text, README): one 10240-wide W8A8
GEMM took 84-88 us against 153 us for ComfyUI's two bf16 GEMMs; two quantized GEMMs sharing one
quant took 96-101 us.

The first member called computes both outputs, returns its own and keeps its sibling's, which the
sibling takes if it is handed that same tensor object (a weak reference, as in SharedQuant); any
other input, or a call in the other order, runs the layer's own GEMM. The pair's weights become
the two halves of one buffer the first time they run on a device (ComfyUI moves each parameter on
its own, so after a load they are apart again), which replaces the separate copies: no memory is
added. Only per-token W8A8 pairs are fused: the per-channel weight scales stack like the weights.
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

CROSS_ATTENTION = "cross_attn"           # Wan's cross-attention modules (t2v and i2v)
PAIRS = (("k", "v"), ("k_img", "v_img"))  # siblings that read one context tensor


class FusedPair:
    """Two quantized linears of the same shape and scheme that read one tensor (see above)."""

    def __init__(self, first: QuantLinearMixin, second: QuantLinearMixin):
        self.members = (first, second)
        self._source: Optional[weakref.ref] = None
        self._kept: Optional[tuple] = None       # (member, its [rows, out] output, input version)
        self._small: Optional[tuple] = None      # (key, stacked scale, stacked bias)
        self.fused_calls = 0                     # GEMMs run for both (reports and tests)

    def take(self, member: QuantLinearMixin, x: torch.Tensor) -> Optional[torch.Tensor]:
        """`member`'s output for `x` if its sibling computed it from this very tensor, else None."""
        if self._kept is None or self._kept[0] is not member or self._source() is not x:
            return None
        _, out, version = self._kept
        self._forget()
        if version != version_of(x):  # written in place since: the kept output is stale
            return None
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def run(self, member: QuantLinearMixin, x: torch.Tensor, x2d, backend) -> Optional[torch.Tensor]:
        """`member`'s [rows, out] output from one GEMM of both weights, keeping the sibling's for
        `take`; None where the pair cannot run as one here (the caller runs its own GEMM)."""
        first, second = self.members
        if type(x) is not torch.Tensor or torch.compiler.is_compiling():
            return None
        if len(first.weight_function) or len(first.bias_function) or len(second.weight_function) \
                or len(second.bias_function):
            return None  # lowvram LoRA: each computes its own patched weight
        weight = self._stacked_weight(x.device)
        if weight is None:
            return None
        small = self._stacked_scale_bias(x.device, x.dtype)
        if small is None:
            return None
        scale, bias = small
        y = run_linear(x2d, weight, scale, bias, first.quant_scheme, first.in_features, backend)
        n = first.out_features
        mine, other = (y[:, :n], y[:, n:]) if member is first else (y[:, n:], y[:, :n])
        self._forget()
        self._kept = (second if member is first else first, other, version_of(x))
        self._source = weakref.ref(x, self._dropped)
        self.fused_calls += 1
        return mine

    def _stacked_weight(self, device: torch.device) -> Optional[torch.Tensor]:
        first, second = self.members
        a, b = first.weight, second.weight
        if a.device != device or b.device != device:
            return None  # offloaded (lowvram): ComfyUI casts each weight per call
        view = stacked(a, b)
        if view is None:  # after a load, or a LoRA patch replaced one of them
            half_a, half_b = into_one_buffer(a, b)
            first.replace_weight(half_a)
            second.replace_weight(half_b)
            view = stacked(first.weight, second.weight)
        return view

    def _stacked_scale_bias(self, device: torch.device, dtype: torch.dtype):
        # Small ([out] each): stacked once per (scales, biases, device, dtype), not per call.
        first, second = self.members
        parts = (first.current_scale(), second.current_scale(), first.bias, second.bias)
        stamps = tuple(None if t is None else (id(t), t.data_ptr(), version_of(t), t.device) for t in parts)
        key = (stamps, device, dtype)
        if self._small is None or self._small[0] != key:
            if any(s.numel() != m.out_features for m, s in zip(self.members, parts[:2])):
                return None  # not one scale per output channel: nothing to stack
            shape = (-1, *parts[0].shape[1:])  # the layout the members' scales have ([out] or [out, 1])
            scale = torch.cat([s.to(device, torch.float32).reshape(shape) for s in parts[:2]])
            bias = None
            if parts[2] is not None or parts[3] is not None:
                bias = torch.cat([torch.zeros(m.out_features, device=device, dtype=dtype) if b is None
                                  else b.to(device, dtype) for m, b in zip(self.members, parts[2:])])
            self._small = (key, scale, bias)
        return self._small[1], self._small[2]

    def _forget(self) -> None:
        self._source, self._kept = None, None

    def _dropped(self, ref: weakref.ref) -> None:
        if self._source is ref:  # the input is gone: its kept output can never be asked for
            self._forget()

    @property
    def holds(self) -> bool:
        return self._kept is not None


def _fusable(a, b) -> bool:
    return (isinstance(a, QuantLinearMixin) and isinstance(b, QuantLinearMixin)
            and a.quant_scheme is not None and a.quant_scheme is b.quant_scheme and consumes_deferred(a.quant_scheme)
            and (a.in_features, a.out_features) == (b.in_features, b.out_features)
            and a.quant_backend_pref == b.quant_backend_pref)


def fuse_context_pairs(patcher, report: QuantReport, root: str = "diffusion_model") -> int:
    """Gives the quantized k/v (and k_img/v_img) siblings of each cross-attention module under `root`
    one FusedPair (the modules are this pack's: object patches of the caller's clone, or a model this
    pack loaded); notes it in `report`; returns how many pairs were made."""
    pairs = 0
    for name, module in patcher.get_model_object(root).named_modules():
        if not name.endswith(CROSS_ATTENTION):
            continue
        path = f"{root}.{name}"
        for left, right in PAIRS:
            if left not in module._modules or right not in module._modules:
                continue
            a = patcher.get_model_object(f"{path}.{left}")
            b = patcher.get_model_object(f"{path}.{right}")
            if _fusable(a, b):
                a.quant_pair = b.quant_pair = FusedPair(a, b)
                pairs += 1
    if pairs:
        report.notes.append(f"{pairs} cross-attention k/v pairs run as one GEMM on the context they share")
    return pairs
