"""Reading PyTorch `.pth` checkpoints (LightX2V's T5/CLIP files) without running any code from them.

`torch.load(weights_only=True)` only rebuilds tensors and plain containers; a file whose pickle
asks for anything else (a class, a function) is refused with the name of what it asked for.
The result offers the same read interface as `SafetensorsFile`, so layout detection is shared.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import torch

from ..errors import CheckpointError
from .safetensors_file import SafetensorsFile

# torch dtype -> the safetensors dtype names the layout detection speaks.
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
# Wrappers some trainers put around the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "module", "params_ema")


def _refuse(path: str, err: Exception) -> CheckpointError:
    return CheckpointError(
        path, f"it asks to run code while loading, which QuantDiT refuses for safety ({err}).",
        "only load .pth files from sources you trust. A file holding plain tensors loads as is; "
        "otherwise convert it to .safetensors in a trusted environment.")


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise _refuse(path, e) from None
    except RuntimeError as e:
        if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped; others are broken
            raise CheckpointError(path, f"PyTorch cannot read it ({e}).", "re-download the file.") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse(path, e) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(path, f"PyTorch cannot read it ({e}).", "re-download the file.") from None


def _state_dict(path: str, obj) -> dict[str, torch.Tensor]:
    for _ in range(2):  # {"state_dict": {...}} or {"model": {"module": ...}}
        if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in _WRAPPER_KEYS:
            obj = next(iter(obj.values()))
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"it holds a {type(obj).__name__}, not a state dict of tensors.",
                              "pass a checkpoint saved with torch.save(model.state_dict(), ...).")
    sd = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(path, f"entry {k!r} is a {type(v).__name__}, not a tensor.",
                                  "pass a checkpoint saved with torch.save(model.state_dict(), ...).")
        if v.dtype not in _DTYPE_NAMES:
            raise CheckpointError(path, f"tensor '{k}' has dtype {v.dtype}, which QuantDiT cannot read.",
                                  "re-export the checkpoint with int8, float8_e4m3fn or float tensors.")
        sd[k] = v
    return sd


class PthFile:
    """A `.pth` state dict behind SafetensorsFile's interface (keys, dtype_name, shape, get)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise CheckpointError(path, "the file does not exist.", "check the path.")
        self.path = path
        self.metadata: dict[str, str] = {}
        self._sd = _state_dict(path, _torch_load(path))

    def keys(self) -> list[str]:
        return list(self._sd)

    def dtype_name(self, key: str) -> str:
        return _DTYPE_NAMES[self._sd[key].dtype]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key]

    def __contains__(self, key: str) -> bool:
        return key in self._sd


def open_tensor_file(path: str):
    """SafetensorsFile or PthFile, chosen by the file's first bytes (extensions lie)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(path, f"cannot open it ({e.strerror}).", "check the path and permissions.") from None
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return PthFile(path)
    return SafetensorsFile(path)
