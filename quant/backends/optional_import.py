"""Import an optional kernel package once and remember why it failed (not installed, or the
import error text, which is what a user needs to fix a broken or mismatched build)."""
from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any, Optional


@functools.lru_cache(maxsize=None)
def try_import(module: str) -> tuple[Optional[Any], Optional[str]]:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None, f"{module.split('.')[0]} is not installed"
    try:
        return importlib.import_module(module), None
    except Exception as e:  # a wrong CUDA/torch build raises ImportError, OSError or RuntimeError
        return None, f"{module} is installed but does not import ({type(e).__name__}: {e})"
