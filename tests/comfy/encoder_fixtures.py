"""Tiny umT5 and CLIP-vision files in the layouts the encoder loaders read, written once per session
into folders registered with ComfyUI's folder_paths."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from quant.encoders import umt5
from quant.convert import convert
from scripts.comfy_quantized import comfy_quantized
from scripts.tiny_encoders import clip_wan, lightx2v_quantize, train_spiece, umt5_wan

T5_DIM = 64  # the tiny Wan DiT of the text-to-video test is built with this text_dim


def write_t5_files(folder) -> dict[str, str]:
    """{variant: file name} in `folder`; Wan-layout files get spiece.model beside them."""
    folder = str(folder)
    sd = umt5_wan(dim=T5_DIM, ffn_dim=160, heads=4, layers=2, seed=5)
    spiece = train_spiece()
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(spiece)
    names = {"bf16": "models_t5_umt5-xxl-enc-bf16.pth"}
    torch.save(sd, os.path.join(folder, names["bf16"]))
    for fmt in ("int8", "fp8"):
        names[fmt] = f"models_t5_umt5-xxl-enc-{fmt}.pth"
        torch.save(lightx2v_quantize(sd, fmt, "t5"), os.path.join(folder, names[fmt]))
    names["int8-safetensors"] = "umt5-xxl-enc-int8.safetensors"
    save_file({k: v.contiguous() for k, v in lightx2v_quantize(sd, "int8", "t5").items()},
              os.path.join(folder, names["int8-safetensors"]))
    # ComfyUI's own layout with the tokenizer inside, bf16 and scaled fp8 (converted by quant.convert).
    comfy_sd = {umt5.comfy_key(k): v for k, v in sd.items()}
    comfy_sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    names["comfy-bf16"] = "umt5_tiny_bf16.safetensors"
    save_file(comfy_sd, os.path.join(folder, names["comfy-bf16"]))
    names["comfy-fp8-scaled"] = "umt5_tiny_fp8_e4m3fn_scaled.safetensors"
    convert(os.path.join(folder, names["comfy-bf16"]), os.path.join(folder, names["comfy-fp8-scaled"]),
            "fp8-scaled", "comfyui-scaled-fp8")
    # ComfyUI's own layout (comfy_quant entries), int8 as int8_tensorwise.
    names["comfy-int8"] = "umt5_tiny_int8_comfy.safetensors"
    convert(os.path.join(folder, names["comfy-bf16"]), os.path.join(folder, names["comfy-int8"]), "int8-w8a8", "comfyui")
    # ComfyUI's own quantizer: mxfp8 block linears (header layout).
    names["comfy-mxfp8"] = "umt5_tiny_mxfp8_comfy.safetensors"
    mx_sd, mx_meta = comfy_quantized(comfy_sd, "mxfp8", lambda k: k.endswith(_T5_LINEARS))
    save_file(mx_sd, os.path.join(folder, names["comfy-mxfp8"]), metadata=mx_meta)
    return names


_T5_LINEARS = tuple(f".{n}.weight" for n in ("q", "k", "v", "o", "wi_0", "wi_1", "wo"))


def write_clip_files(folder) -> dict[str, str]:
    folder = str(folder)
    sd = clip_wan(seed=6)
    names = {"fp16": "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"}
    torch.save(sd, os.path.join(folder, names["fp16"]))
    for fmt in ("int8", "fp8"):
        names[fmt] = f"models_clip_open-clip-xlm-roberta-large-vit-huge-14-{fmt}.pth"
        torch.save(lightx2v_quantize(sd, fmt, "clip"), os.path.join(folder, names[fmt]))
    return names


def image(seed=0, size=56):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, size, size, 3, generator=g)
