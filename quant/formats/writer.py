"""Streaming, atomic safetensors writer: the header is computed from planned shapes, then
tensors are produced and written one at a time, so peak memory is one tensor, not the model."""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Callable, Iterable

import torch

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class PlannedTensor:
    """A tensor to write: its name, dtype and shape up front, its data from `produce()` later."""

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], produce: Callable[[], torch.Tensor]):
        self.name, self.dtype, self.shape, self.produce = name, dtype, tuple(shape), produce

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: str, tensors: Iterable[PlannedTensor], metadata: dict[str, str] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> None:
    """Write atomically: a temp file in the same folder, renamed over `path` only when complete."""
    planned = list(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in planned:
        header[t.name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # keep tensor data 8-byte aligned
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".safetensors", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            for i, t in enumerate(planned):
                data = t.produce().detach().to("cpu").contiguous()
                if data.dtype != t.dtype or tuple(data.shape) != t.shape:
                    raise ValueError(f"{t.name}: produced {data.dtype} {tuple(data.shape)}, "
                                     f"planned {t.dtype} {t.shape}")
                out.write(data.reshape(-1).view(torch.uint8).numpy().tobytes())
                if progress:
                    progress(i + 1, len(planned))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
