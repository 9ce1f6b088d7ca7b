"""Starts ComfyUI in this process as its main.py does on an NVIDIA GPU, DynamicVRAM (comfy-aimdo)
included, and loads a node pack. For the GPU-machine scripts that need ComfyUI's real model
management (bench/bench_dynamic_vram.py, tests/comfy/dynamic_vram_probe.py).

Call `start` before anything imports torch: comfy-aimdo sets itself up first, as in main.py."""
from __future__ import annotations

import asyncio
import sys

# comfy-aimdo's init protocols of 0.4.11, 0.4.10 and 0.4.9, newest first (main.py tries them so too)
_INIT_KWARGS = (dict(simple_vram_headroom=None, nvml_pressure=True), dict(simple_vram_headroom=None), {})


def start(comfy_root: str, pack_root: str, dynamic: bool = True) -> bool:
    """Puts ComfyUI and the pack first on sys.path, starts comfy-aimdo when `dynamic`, and loads the
    pack as a custom node. True when DynamicVRAM is on (the dynamic patcher is ComfyUI's default)."""
    sys.path[:0] = [comfy_root, pack_root]
    from comfy.cli_args import args

    args.cpu = False
    if dynamic:
        import comfy_aimdo.control

        for kwargs in _INIT_KWARGS:
            try:
                comfy_aimdo.control.init(**kwargs)
                break
            except TypeError:
                continue
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    import nodes

    on = False
    if dynamic:
        devices = comfy.model_management.get_all_torch_devices()
        try:
            on = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3)) for d in devices)
        except TypeError:  # before 0.4.11: device indices only
            on = comfy_aimdo.control.init_devices(d.index for d in devices)
        if on:
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
    if not asyncio.run(nodes.load_custom_node(pack_root)):
        raise RuntimeError(f"ComfyUI could not load the node pack at {pack_root}")
    return bool(on)
