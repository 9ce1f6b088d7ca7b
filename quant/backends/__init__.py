"""Kernel backends. Importing this package registers every provider module; each one reports
why it cannot run (not installed, wrong GPU, import error) instead of failing at import."""
from . import (comfy_kitchen_backend, deep_gemm_backend, reference_backend, sgl_kernel_backend,  # noqa: F401
               torch_native, torchao_backend, triton_backend, vllm_backend)
from .registry import (Backend, backend_reasons, BackendUnavailableError, NoCapableBackendError, get_backend,
                       KernelChoice, list_backends, pick_backend, pick_kernels, quantized_linear, run_linear, why_not)

__all__ = ["Backend", "backend_reasons", "BackendUnavailableError", "NoCapableBackendError", "get_backend",
           "KernelChoice", "list_backends", "pick_backend", "pick_kernels", "quantized_linear", "run_linear", "why_not"]
