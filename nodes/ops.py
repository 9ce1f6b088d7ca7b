"""ComfyUI custom operations whose Linear layers hold quantized weights.

Made per load by `make_quant_ops` (no configuration lives on shared classes) and handed to
ComfyUI through `model_options["custom_operations"]`. The math and the kernels are in quant/.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.ops

from ..quant import reference
from ..quant.backends import KernelChoice, pick_kernels, run_linear
from ..quant.deferred import Deferred
from ..quant.errors import CheckpointError
from ..quant.formats.detect import LayerQuant
from ..quant.schemes import Scheme, get_scheme
from ..quant.shared_quant import SharedQuant


class QuantLinearMixin:
    """Behaviour shared by every quantized Linear, whatever the ComfyUI base op class is."""
    quant_scheme: Scheme | None = None
    quant_backend_pref: str | None = None
    quant_share: SharedQuant | None = None     # set on q/k/v siblings (nodes/shared_quant.py)
    quant_fused = None                         # a FusedSiblings on k/v or q/k/v siblings (nodes/fused_siblings.py)

    def quant_setup(self, scheme: Scheme, qdata: torch.Tensor, scale: torch.Tensor):
        self.quant_scheme = scheme
        self.weight = torch.nn.Parameter(qdata, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.to(torch.float32), requires_grad=False)
        self._kernels: dict[torch.device, KernelChoice] = {}

    def _kernel(self, device: torch.device, rows: int):
        choice = self._kernels.get(device)
        if choice is None:
            choice = self._kernels[device] = pick_kernels(self.quant_scheme, device, self.quant_backend_pref)
        return choice.for_rows(rows)

    def forward(self, *args, **kwargs):
        if self.quant_scheme is None:
            return super().forward(*args, **kwargs)
        comfy.ops.run_every_op()
        return self.quant_forward(args[0])

    def quant_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs hundreds of times per step: the host time of each line counts (bench_step --profile).
        dev = x.device
        qdata, scale, bias = self.weight, self.current_scale(), self.bias
        if qdata.device != dev:  # offloaded (lowvram): ComfyUI's cast moves it for this call
            qdata = comfy.model_management.cast_to_device(qdata, dev, None)
            scale = comfy.model_management.cast_to_device(scale, dev, None)
        if bias is not None and (bias.device != dev or bias.dtype != x.dtype):
            bias = comfy.model_management.cast_to_device(bias, dev, x.dtype)
        if len(self.weight_function) or len(self.bias_function):
            return self._patched_forward(x, qdata, scale, bias)
        fused = self.quant_fused
        if fused is not None:
            kept = fused.take(self, x)  # a sibling already computed this layer's output for x
            if kept is not None:
                return kept
        k = self.in_features
        xc = x
        if x.dtype == torch.float32 and x.is_cuda and self.quant_scheme.quantizes_activation:
            # Text encoders run fp32 activations; the 8-bit GEMMs take and give bf16/fp16. The
            # bf16 rounding (2^-9) is far below the 8-bit activation quantization step.
            xc = x.to(torch.bfloat16)
        x2d = xc.rows() if isinstance(xc, Deferred) else xc.reshape(-1, k)
        backend = self._kernel(dev, x2d.shape[0])
        if self.quant_share is not None:
            x2d = self._shared_rows(x, x2d, backend)
        y = None if fused is None else fused.run(self, x, x2d, backend)
        if y is None:
            y = run_linear(x2d, qdata, scale, bias, self.quant_scheme, k, backend)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _shared_rows(self, x, x2d, backend):
        # The quantized rows a sibling made from this same tensor `x`, or fresh ones it can reuse
        # (only per-token W8A8 layers get a slot, see nodes/shared_quant.py).
        scheme = self.quant_scheme
        if type(x2d) is not torch.Tensor or backend.row_quantizer is None or torch.compiler.is_compiling():
            return x2d
        return self.quant_share.rows(x, x2d, (backend.name, scheme.name), lambda t: backend.row_quantizer(t, scheme))

    def _patched_forward(self, x, qdata, scale, bias):
        # lowvram LoRA path: ComfyUI hands us functions of the float weight.
        w = reference.dequantize_weight(qdata, scale, self.quant_scheme, self.in_features).to(x.dtype)
        for f in self.weight_function:
            w = f(w)
        for f in self.bias_function:
            bias = f(bias)
        return torch.nn.functional.linear(x, w, bias)

    # ModelPatcher.patch_weight_to_device calls these: dequantize -> add the LoRA -> requantize.
    # A patched weight gets its own freshly computed scale, remembered together with the
    # Parameter it belongs to: when ComfyUI restores its backup of `weight` (a different
    # Parameter), the original scale applies again without ComfyUI knowing about scales.
    _patched: tuple | None = None

    def replace_weight(self, data: torch.Tensor) -> None:
        """The same quantized values held in `data` (a slice of a FusedSiblings buffer); a LoRA-patched
        weight keeps its patched scale."""
        patched = self._patched is not None and self._patched[0] is self.weight
        self.weight = torch.nn.Parameter(data, requires_grad=False)
        if patched:
            self._patched = (self.weight, self._patched[1])

    def current_scale(self) -> torch.Tensor:
        patched = self._patched
        if patched is not None and patched[0] is self.weight:
            if patched[1].device != self.weight.device:
                # ComfyUI patches before it moves the module, and Module.to() leaves plain attributes
                # behind: a CPU scale handed to a GPU kernel is an illegal memory access.
                self._patched = patched = (self.weight, patched[1].to(self.weight.device))
            return patched[1]
        return self.weight_scale

    def convert_weight(self, weight, inplace=False, **kwargs):
        if self.quant_scheme is None:
            return weight
        q = weight.to(self.weight.dtype)
        return reference.dequantize_weight(q, self.current_scale().to(weight.device), self.quant_scheme,
                                           self.in_features)

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        if self.quant_scheme is None:
            weight = weight.to(self.weight.dtype)
            if return_weight:
                return weight
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            return
        if return_weight:  # caller keeps only the data: reuse the current scale
            return reference.requantize_with_scale(weight, self.current_scale().to(weight.device), self.quant_scheme)
        qdata, scale = reference.quantize_weight(weight.float(), self.quant_scheme)
        self.weight = torch.nn.Parameter(qdata.to(self.weight.device), requires_grad=False)
        self._patched = (self.weight, scale.to(self.weight.device))


def make_quant_ops(layers: dict[str, LayerQuant], path: str, backend: str | None = None):
    """Operations for one load: `layers` maps module names (as ComfyUI prefixes them) to plans."""
    claimed: set[str] = set()

    class QuantDiTOps(comfy.ops.manual_cast):
        quantized_layers = layers
        loaded_layers = claimed

        class Linear(QuantLinearMixin, comfy.ops.manual_cast.Linear):
            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs):
                layer = prefix[:-1]
                plan = layers.get(layer)
                if plan is None:
                    return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                         missing_keys, unexpected_keys, error_msgs)
                qdata = state_dict.get(prefix + "weight")
                scale = state_dict.get(prefix + "weight_scale")
                expected = (self.out_features, self.in_features)
                if qdata is None or scale is None:
                    raise CheckpointError(path, "quantized weight or its scale is missing from the state dict.",
                                          "re-export the checkpoint.", layer)
                if tuple(qdata.shape) != expected:
                    raise CheckpointError(path, f"weight is {list(qdata.shape)} but the detected model "
                                          f"architecture expects {list(expected)} here.",
                                          "check that the file matches the model family (e.g. Wan 1.3B vs 14B) "
                                          "and was not cut or re-shaped.", layer)
                self.quant_setup(get_scheme(plan.scheme), qdata, scale)
                self.quant_backend_pref = backend
                bias = state_dict.get(prefix + "bias")
                if bias is not None:
                    self.bias = torch.nn.Parameter(bias, requires_grad=False)
                elif self.bias is not None:
                    missing_keys.append(prefix + "bias")
                claimed.add(layer)

    return QuantDiTOps


class QuantizedLinear(QuantLinearMixin, comfy.ops.manual_cast.Linear):
    """A quantized replacement for a loaded Linear (what the Quantize / FP8 Cast nodes patch in)."""

    @classmethod
    def from_quantized(cls, qdata: torch.Tensor, scale: torch.Tensor, scheme: Scheme, shape: tuple[int, int],
                       bias: torch.Tensor | None, backend: str | None) -> "QuantizedLinear":
        """A layer around already quantized data; `shape` is the float weight's [out, in]."""
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        m.out_features, m.in_features = shape
        m.quant_setup(scheme, qdata, scale)
        m.quant_backend_pref = backend
        m.bias = bias if bias is None or isinstance(bias, torch.nn.Parameter) else \
            torch.nn.Parameter(bias, requires_grad=False)
        return m

    @classmethod
    def from_linear(cls, linear: torch.nn.Module, scheme: Scheme, backend: str | None,
                    work_device: torch.device) -> "QuantizedLinear":
        """Quantize one layer on `work_device`; the result lives where the source weight lives."""
        home = linear.weight.device
        w = linear.weight.detach().to(work_device)
        qdata, scale = reference.quantize_weight_streaming(w, scheme)
        del w
        # The bias is shared with the source model: never modified in place.
        return cls.from_quantized(qdata.to(home), scale.to(home), scheme, (linear.out_features, linear.in_features),
                                  linear.bias, backend)
