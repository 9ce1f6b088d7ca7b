"""Errors that tell a ComfyUI user which file, which layer, and what to do."""
from __future__ import annotations


class QuantDiTError(Exception):
    """Base class of every error this pack raises on purpose."""


class CheckpointError(QuantDiTError, ValueError):
    def __init__(self, path: str, problem: str, fix: str, layer: str | None = None):
        self.path, self.layer, self.problem, self.fix = path, layer, problem, fix
        where = f"{path}" + (f", layer '{layer}'" if layer else "")
        super().__init__(f"{where}: {problem} Fix: {fix}")
