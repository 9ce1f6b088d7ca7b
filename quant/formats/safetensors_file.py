"""Opening a safetensors file with errors that name it (truncated, not safetensors, ...)."""
from __future__ import annotations

import json
import os
import struct

from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str) -> tuple[dict, dict]:
    """(tensor infos, metadata) from the header alone; validates that the file is complete."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(path, "the file is shorter than a safetensors header.",
                                      "re-download or re-export the file.")
            (n,) = struct.unpack("<Q", raw_len)
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(path, "this is not a safetensors file (its header length is invalid).",
                                      "pass a .safetensors file; convert .pth/.ckpt files first.")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(path, "this is not a safetensors file (its header is not JSON).",
                              "pass a .safetensors file; convert .pth/.ckpt files first.") from None
    try:
        metadata = header.pop("__metadata__", None) or {}
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise CheckpointError(path, "this is not a safetensors file (its header is not a map of tensor "
                              "names to dtype, shape and data_offsets).",
                              "pass a .safetensors file; convert .pth/.ckpt files first.") from None
    if 8 + n + end > size:
        raise CheckpointError(path, f"the file is truncated ({size} bytes, the header promises {8 + n + end}).",
                              "the download or copy did not finish; fetch the file again.")
    return header, metadata


class SafetensorsFile:
    """Lazy reader: header checked up front, tensors loaded one at a time."""

    def __init__(self, path: str):
        self.path = path
        self.infos, self.metadata = read_header(path)
        try:
            self._handle = safe_open(path, framework="pt", device="cpu")
        except SafetensorError as e:  # e.g. trailing bytes, unknown dtype, overlapping offsets
            raise CheckpointError(path, f"safetensors cannot read it ({e}).",
                                  "re-download or re-export the file.") from None

    def keys(self) -> list[str]:
        return list(self.infos)

    def dtype_name(self, key: str) -> str:
        return self.infos[key]["dtype"]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.infos[key]["shape"])

    def get(self, key: str):
        return self._handle.get_tensor(key)

    def __contains__(self, key: str) -> bool:
        return key in self.infos
