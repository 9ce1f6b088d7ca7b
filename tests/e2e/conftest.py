"""One real ComfyUI server (subprocess, --cpu) for every e2e test: 16 s to start on 2 cores; it is
stopped even when a test fails. Models are the demo's (scripts/demo.py): a tiny Wan 2.1 DiT with
text_dim=64 (bf16 and LightX2V int8) and a tiny int8 umT5 (.pth)."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from scripts import demo  # noqa: E402
from scripts.comfy_server import ComfyServer  # noqa: E402

BF16 = demo.VARIANT["bf16"]
INT8 = demo.VARIANT["int8-lightx2v"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e_models")
    paths = demo.make_models(str(folder), variants=(BF16, INT8), log=lambda _: None)
    return str(folder), paths


@pytest.fixture(scope="session")
def server(tmp_path_factory, models):
    srv = ComfyServer(models_dir=models[0], work_dir=str(tmp_path_factory.mktemp("e2e_run")))
    srv.start(timeout=180)
    try:
        yield srv
    finally:
        srv.stop()
