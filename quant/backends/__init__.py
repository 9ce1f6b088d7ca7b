"""Kernel backends. Importing this package registers every provider module."""
from . import reference_backend, torch_native  # noqa: F401  (registration side effects)
from .registry import (Backend, backend_reasons, BackendUnavailableError, NoCapableBackendError, get_backend,
                       list_backends, pick_backend, why_not)

__all__ = ["Backend", "backend_reasons", "BackendUnavailableError", "NoCapableBackendError", "get_backend",
           "list_backends", "pick_backend", "why_not"]
