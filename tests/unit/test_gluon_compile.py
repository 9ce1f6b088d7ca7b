"""The Gluon int8 GEMM compiled for Hopper (sm_90a) here, without a GPU: Triton's compiler and the
ptxas it ships need only the target's name. Every config the autotuner may pick must build with the
Triton this project installs and fit in an H100's shared memory; otherwise int8 on Hopper would lose
its fast kernel at a user's first run (triton_gemm falls back, with a warning) and CI would not know.
The same configs ran and matched the reference on an H100 (tests/gpu/test_kernel_backends.py).

The configs compile in a process of their own (this file run as a script): once a kernel has run in
Triton's CPU interpreter, as the other CPU tests do, Triton 3.8 leaves `triton.language.core`'s
builtins patched for the interpreter, and a later compile in that process fails."""
from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from quant.kernels import gluon_gemm

SMEM_PER_BLOCK_SM90 = 232448  # bytes one block may use on sm_90 (227 KiB)


class _HopperTarget:
    """Just enough of a Triton driver to compile for sm_90 on a machine without one."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compiling_for_hopper(fn):
    saved_driver, saved_caches = driver._active, fn.device_caches
    driver.set_active(_HopperTarget())
    fn.device_caches = collections.defaultdict(fn.create_binder)  # keep sm_90 builds out of the real cache
    try:
        yield
    finally:
        driver._active = saved_driver
        fn.device_caches = saved_caches


def _compile(config, m=4096, k=3072, n=3072, bias=False):
    xq, wq = torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
    y = torch.zeros(m, n, dtype=torch.bfloat16)
    b = torch.zeros(n, dtype=torch.bfloat16) if bias else None
    args, meta = gluon_gemm._arguments(xq, torch.zeros(m), wq, torch.zeros(n), b, y, 4096, 132)
    config.pre_hook(dict(zip(gluon_gemm._gemm_kernel.arg_names, args), **config.kwargs))
    kernel = gluon_gemm._gemm_kernel
    with compiling_for_hopper(kernel):
        return kernel.warmup(*args, **meta, **config.kwargs, num_warps=config.num_warps, maxnreg=config.maxnreg,
                             grid=(1,))


def _config_id(config) -> str:
    return "-".join(f"{v}" for v in config.kwargs.values())


def _build_all(out_dir: str):
    """Compiles every config; writes each one's PTX and {config id: shared memory bytes}."""
    shared = {}
    for config in gluon_gemm.configs():
        kernel = _compile(config, bias=config.kwargs["PINGPONG"])
        name = _config_id(config)
        with open(os.path.join(out_dir, f"{name}.ptx"), "w") as f:
            f.write(kernel.asm["ptx"])
        shared[name] = kernel.metadata.shared
    with open(os.path.join(out_dir, "shared.json"), "w") as f:
        json.dump(shared, f)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("gluon_sm90")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out / "shared.json") as f:
        return out, json.load(f)


@pytest.mark.parametrize("config", gluon_gemm.configs(), ids=_config_id)
def test_every_gluon_config_builds_for_hopper_and_keeps_its_mmas_async(builds, config):
    assert gluon_gemm.available() is None, gluon_gemm.available()
    out, shared = builds
    name = _config_id(config)
    ptx = (out / f"{name}.ptx").read_text()
    assert shared[name] <= SMEM_PER_BLOCK_SM90, shared[name]
    assert re.search(r"wgmma\.mma_async\S*\.s32\.s8\.s8", ptx), "no int8 warpgroup MMA in the PTX"
    # Waiting with one MMA still outstanding is what makes the int8 MMAs overlap (the module's reason to be).
    assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx)
    if config.kwargs["PINGPONG"]:
        # The warp-specialized schedule moves registers from the loader to the MMA warpgroups.
        assert re.search(r"setmaxnreg\.inc\S*\s+232;", ptx)
        assert re.search(r"setmaxnreg\.dec\S*\s+40;", ptx)


if __name__ == "__main__":
    _build_all(sys.argv[1])
