"""Boots the real ComfyUI runtime (vendored 0.30.0 in .comfyui/) in-process on the CPU and loads
this pack through ComfyUI's own custom-node loader."""
from __future__ import annotations

import asyncio
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMFY_DIR = os.environ.get("QUANTDIT_COMFYUI", os.path.join(ROOT, ".comfyui"))


def _boot():
    if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
        raise RuntimeError(f"ComfyUI not found at {COMFY_DIR}: run `make setup` first")
    # ComfyUI's nodes.py must win over this repo's nodes/ package.
    sys.path.insert(0, COMFY_DIR)
    if "nodes" in sys.modules and not hasattr(sys.modules["nodes"], "NODE_CLASS_MAPPINGS"):
        del sys.modules["nodes"]
    from comfy.cli_args import args
    # CPU unless the GPU machine asks for CUDA (QUANTDIT_COMFY_DEVICE=cuda).
    args.cpu = os.environ.get("QUANTDIT_COMFY_DEVICE", "cpu") != "cuda"
    import nodes
    assert hasattr(nodes, "KSampler"), "imported the wrong nodes module"
    ok = asyncio.run(nodes.load_custom_node(ROOT))
    assert ok, "ComfyUI failed to load the pack; see the log above"
    return nodes, sys.modules[ROOT.replace(".", "_x_")]


_RUNTIME = None


@pytest.fixture(scope="session")
def comfy():
    """(ComfyUI's nodes module, this pack as ComfyUI imported it)."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = _boot()
    return _RUNTIME


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, comfy):
    import folder_paths
    d = tmp_path_factory.mktemp("diffusion_models")
    folder_paths.add_model_folder_path("diffusion_models", str(d), is_default=True)
    return d
