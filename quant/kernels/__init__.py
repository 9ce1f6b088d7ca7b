"""This pack's own GPU kernels (Triton). Each module imports triton at import time, so import
them only after `triton_missing()` returned None. Under TRITON_INTERPRET=1 the same kernels run
on the CPU (slowly), which is how CI tests them against quant/reference.py."""
from __future__ import annotations

import functools
import os
from typing import Optional


def triton_missing() -> Optional[str]:
    """None when Triton imports, else why not (the import error text)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401  (a broken install fails here, not at kernel time)
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


@functools.lru_cache(maxsize=1)
def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests without a GPU). Read once: Triton
    itself decides at import, when it decorates the kernels, and this is asked on every launch."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
