"""ComfyUI's own quantized files, stock ComfyUI against Load Quantized DiT, one sampling step each,
side by side in one process (random weights, Flux architecture at 1024x1024).

    python bench/bench_comfy_files.py                        # 19 double + 38 single blocks (Flux-dev size)
    python bench/bench_comfy_files.py --double 6 --single 12 # fewer blocks: smaller files, same per-block mix
    python bench/bench_comfy_files.py --formats mxfp8        # one format

ComfyUI's quantizer (comfy.quant_ops, comfy-kitchen) writes the block linears of a bf16 Flux as
`float8_e4m3fn` (one scale per tensor), as `int8_tensorwise` and as `mxfp8` into
`_quantization_metadata` files in a temporary models folder. Each file then runs through stock
UNETLoader (ComfyUI's own fp8 / int8 math; mxfp8 emulated before Blackwell) and through the pack's
loader node (fp8: `scaled_fp8` = fp8-w8a8 and fp8-scaled; mxfp8 as fp8 W8A8). Prints the
step time, the GPU kernel time, the ratios to bf16 and to stock ComfyUI on the same file, and the
cosine similarity of the denoiser output to bf16. Needs CUDA and ComfyUI (QUANTDIT_COMFYUI).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step as bs  # noqa: E402  (puts ComfyUI and the pack on sys.path)

import torch  # noqa: E402

FORMATS = ("float8_e4m3fn", "int8_tensorwise", "mxfp8")


def write_comfy_file(sd: dict, fmt: str, path: str):
    """`sd`'s block linears quantized by ComfyUI's own quantizer, in its `_quantization_metadata` layout."""
    from safetensors.torch import save_file
    from scripts.comfy_quantized import comfy_quantized
    out, metadata = comfy_quantized(sd, fmt, lambda k: k.startswith(("double_blocks.", "single_blocks.")), "cuda")
    save_file(out, path, metadata=metadata)


def measure(model, inputs, reps, ref_out):
    t, out = bs.step_time(model, inputs, reps)
    return t, bs.gpu_kernels(model, inputs)[1], bs._cos(out, ref_out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--double", type=int, default=19)
    p.add_argument("--single", type=int, default=38)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    a = p.parse_args()
    a.height = a.width = 1024
    nodes = bs.boot()
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    dev = mm.get_torch_device()
    sd, inputs, title = bs.flux_inputs(dev, a, depth=a.double, single=a.single)
    sd = {k: v.cpu() for k, v in sd.items()}
    print(f"{title}, {a.double} double + {a.single} single blocks, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}", flush=True)
    bf16 = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.bfloat16})
    ref_t, ref_out = bs.step_time(bf16, inputs, a.reps)
    ref_gpu = bs.gpu_kernels(bf16, inputs)[1]
    mm.unload_all_models()
    del bf16
    folder = tempfile.mkdtemp(prefix="quantdit_bench_")
    folder_paths.add_model_folder_path("diffusion_models", folder)
    rows = [("bf16", "-", ref_t, ref_gpu, 1.0, None)]
    loader = nodes.NODE_CLASS_MAPPINGS["QuantDiTLoader"]
    for fmt in a.formats:
        name = f"flux_{fmt}.safetensors"
        write_comfy_file(sd, fmt, os.path.join(folder, name))
        (stock,) = nodes.UNETLoader().load_unet(name, "default")
        stock_t, stock_gpu, stock_cos = measure(stock, inputs, a.reps, ref_out)
        rows.append((f"{fmt} file", "stock ComfyUI", stock_t, stock_gpu, stock_cos, (stock_t, stock_gpu)))
        mm.unload_all_models()
        del stock
        for mode in (["fp8-w8a8", "fp8-scaled"] if fmt.startswith("float8") else ["auto"]):
            model, report = loader.execute(unet_name=name, backend="auto", compute_dtype="default",
                                           scaled_fp8=mode).result
            kernel = [ln.split("kernel: ")[1].rstrip(")") for ln in report.splitlines() if "kernel: " in ln]
            t, gpu, cos = measure(model, inputs, a.reps, ref_out)
            scheme = sorted({m.quant_scheme.name for m in bs.quant_linears(model)})
            rows.append((f"{fmt} file", f"QuantDiT {'+'.join(scheme)} ({kernel[0] if kernel else '?'})", t, gpu,
                         cos, (stock_t, stock_gpu)))
            mm.unload_all_models()
            del model
        os.remove(os.path.join(folder, name))
    print(f"\n{'file':22} {'run by':40} {'step ms':>8} {'vs bf16':>8} {'vs stock':>9} {'GPU ms':>8} {'vs bf16':>8} "
          f"{'vs stock':>9} {'cos vs bf16':>12}")
    for file, by, t, gpu, cos, stock in rows:
        vs_stock = f"{stock[0] / t:8.2f}x" if stock else f"{'-':>9}"
        gpu_vs_stock = f"{stock[1] / gpu:8.2f}x" if stock else f"{'-':>9}"
        print(f"{file:22} {by:40} {t * 1000:8.1f} {ref_t / t:7.2f}x {vs_stock} {gpu / 1000:8.1f} "
              f"{ref_gpu / gpu:7.2f}x {gpu_vs_stock} {cos:12.5f}")


if __name__ == "__main__":
    main()
