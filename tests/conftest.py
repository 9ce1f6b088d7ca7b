import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter, so CI checks the same kernel
# code against quant/reference.py. It must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
