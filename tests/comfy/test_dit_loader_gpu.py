"""The loader node on CUDA: the fp8 W8A8 layers must run torch._scaled_mm (GPU machine only).

Run there with QUANTDIT_COMFY_DEVICE=cuda so the conftest boots ComfyUI on the GPU."""
import pytest
import torch

from test_dit_loader import TOLERANCE, load_quantized, rel_err, sample
from wan_fixtures import write_all

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def files(models_dir):
    return write_all(models_dir)


def test_fp8_file_runs_scaled_mm_on_cuda_and_matches_bf16(comfy, files):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    nodes, _ = comfy
    (ref_model,) = nodes.UNETLoader().load_unet(files["bf16"], "default")
    ref = sample(comfy, ref_model)
    model, report = load_quantized(comfy, files["lightx2v-fp8"], dtype="bf16")
    out = sample(comfy, model)
    linears = [m for m in model.model.diffusion_model.modules() if getattr(m, "quant_scheme", None)]
    used = {str(k.name) for m in linears for k in m._kernels.values()}
    print("kernels used:", used, "relative error vs bf16:", rel_err(out, ref))
    print(report)
    assert used == {"torch"}
    assert rel_err(out, ref) < TOLERANCE["lightx2v-fp8"]
