"""The GELU hand-off (quant/deferred.py) at DiT shapes: a block's MLP tail, GELU (+ Flux's concat)
+ the next linear, in bf16, quantized as before (GELU written, then quantized), and quantized with
the GELU applied by the quantizer. Side by side in one run, GPU time (CUDA graphs, inputs and
weights cycled past the L2, as bench_gemm.py times them).

    python bench/bench_gelu_handoff.py [--schemes int8-w8a8 fp8-w8a8] [--backends triton vllm]

Also checks that the hand-off gives the same output, bit for bit, as the unfused path.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_gemm import copies_needed, graph_ms  # noqa: E402
from quant import reference  # noqa: E402
from handoff_compare import compare, options, usable_linears  # noqa: E402
from quant.deferred import DeferredActivation  # noqa: E402
from quant.schemes import get_scheme  # noqa: E402

# (label, tokens, attention-output width (the concatenated prefix, 0: none), GELU width, the producer's
# row width (the GELU input is a slice of it), N out)
TAILS = [
    ("flux single: gelu+cat+linear2", 4608, 3072, 12288, 21504, 3072),
    ("flux double: img mlp.1+mlp.2", 4096, 0, 12288, 12288, 3072),
    ("flux double: txt mlp.1+mlp.2, ComfyUI's 256 text tokens", 256, 0, 12288, 12288, 3072),
    ("wan14b: ffn.1+ffn.2", 32760, 0, 13824, 13824, 5120),
]


def plain_tail(attn, pre):
    act = F.gelu(pre, approximate="tanh")
    return act if attn is None else torch.cat((attn, act), -1)


def main():
    a = options()
    dev = torch.device("cuda")
    for label, m, pw, g, width, n in TAILS:
        torch.manual_seed(0)
        k = pw + g
        produced = torch.randn(m, width, device=dev, dtype=torch.bfloat16)
        attn = torch.randn(m, pw, device=dev, dtype=torch.bfloat16) if pw else None
        w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.02
        copies = copies_needed(produced, attn, w)
        ins = [(attn if i == 0 or attn is None else torch.randn_like(attn),
                (produced if i == 0 else torch.randn_like(produced))[:, width - g:]) for i in range(copies)]
        ws = [w] + [w.roll(i, 0) for i in range(1, copies)]
        t_bf16 = graph_ms(lambda at, pr, wi: F.linear(plain_tail(at, pr), wi, bias), [(*x, wi) for x, wi in zip(ins, ws)])
        t_act = graph_ms(lambda at, pr: plain_tail(at, pr), ins)
        print(f"\n{label}: M={m} K={k} N={n}  bf16 tail {t_bf16 * 1000:.1f} us (GELU{'+cat' if pw else ''} "
              f"alone {t_act * 1000:.1f} us)", flush=True)
        del ws
        for scheme_name in a.schemes:
            scheme = get_scheme(scheme_name)
            qdata, scale = reference.quantize_weight(w.float(), scheme)
            qs = [(qdata, scale)] + [(qdata.clone(), scale.clone()) for _ in range(copies - 1)]
            for backend, linear in usable_linears(scheme_name, scheme, a.backends, dev):

                def unfused(at, pr, qd, sc):
                    return linear(plain_tail(at, pr), qd, sc, bias, scheme, k)

                def handed_off(at, pr, qd, sc):
                    return linear(DeferredActivation(pr, at), qd, sc, bias, scheme, k)

                compare(f"{scheme_name:10} {backend:7}", unfused, handed_off, [(*x, *q) for x, q in zip(ins, qs)],
                        t_bf16, ("GELU written then quantized", "GELU in the quantizer"))
            del qs
    print("\nRatios: bf16 tail time / quantized tail time (activation quant included).")


if __name__ == "__main__":
    main()
