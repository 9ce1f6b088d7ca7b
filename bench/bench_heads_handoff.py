"""The attention hand-off (quant/deferred.py's DeferredHeads) at Flux's shapes: from SDPA's output
[B, H, L, D] to the double block's output projections, and to the single block's linear2 (after
the concatenation with the MLP's GELU). bf16 copies the output transposed (ComfyUI's
`transpose(1, 2).reshape`) and runs the linears; quantized as before, the copy is then read again
by the per-token quantizer (in the single block with the GELU hand-off already on); with the
hand-off the quantizer reads the head layout and no copy is written. Side by side in one run, GPU time (CUDA graphs, inputs and weights cycled past the L2, as
bench_gemm.py times them).

    python bench/bench_heads_handoff.py [--schemes int8-w8a8 fp8-w8a8] [--backends triton vllm] [--text-tokens 256]

Also checks that the hand-off gives the same output, bit for bit, as the plain path.
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
from quant.deferred import DeferredActivation, DeferredHeads  # noqa: E402
from quant.schemes import get_scheme  # noqa: E402

HEADS, HEAD_DIM, IMAGE = 24, 128, 4096   # Flux at 1024x1024
# Text tokens: 512 in the reference code, 256 for ComfyUI's Flux prompts (its T5 pads to 256).
TEXT_TOKENS = 512


def tails(text):
    """(label, the projections' token ranges in the joint output)"""
    return [("flux double: img proj (its tokens' copy + proj)", [(text, text + IMAGE)]),
            ("flux double: txt proj (its tokens' copy + proj)", [(0, text)]),
            ("flux double: the joint output's copy + img proj + txt proj", [(text, text + IMAGE), (0, text)])]


def comfy_rows(heads):
    b, h, tokens, d = heads.shape
    return heads.transpose(1, 2).reshape(b, tokens, h * d)


def main():
    a = options(lambda p: p.add_argument("--text-tokens", type=int, default=TEXT_TOKENS,
                                         help="Flux's text tokens (ComfyUI pads prompts to 256)"))
    dev = torch.device("cuda")
    k = n = HEADS * HEAD_DIM
    torch.manual_seed(0)
    text = a.text_tokens
    out = torch.randn(1, HEADS, text + IMAGE, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.02
    copies = copies_needed(out, w, w)
    outs = [out] + [torch.randn_like(out) for _ in range(copies - 1)]
    weights = [(w, w.roll(1, 0))] + [(w.roll(2 * i, 0), w.roll(2 * i + 1, 0)) for i in range(1, copies)]
    for label, ranges in tails(text):
        if len(ranges) == 1:  # only this projection's tokens, from 0
            first, last = ranges[0]
            pick, ranges = (lambda o, a=first, b=last: o[:, :, a:b]), [(0, last - first)]
        else:
            pick = lambda o: o  # noqa: E731

        def bf16(o, w_img, w_txt):
            rows = comfy_rows(pick(o))
            return [F.linear(rows[:, a:b], wi, bias) for (a, b), wi in zip(ranges, (w_img, w_txt))]

        t_bf16 = graph_ms(bf16, [(o, *wp) for o, wp in zip(outs, weights)])
        print(f"\n{label}: K={k} N={n}  bf16 {t_bf16 * 1000:.1f} us", flush=True)
        for scheme_name in a.schemes:
            scheme = get_scheme(scheme_name)
            qw = [tuple(reference.quantize_weight(wi.float(), scheme) for wi in wp) for wp in weights]
            for backend, linear in usable_linears(scheme_name, scheme, a.backends, dev):

                def run(o, qi, qt, handed_off):
                    src = DeferredHeads(pick(o)) if handed_off else comfy_rows(pick(o))
                    return [linear(src[:, a:b].rows() if handed_off else src[:, a:b].reshape(-1, k), *q, bias, scheme, k)
                            for (a, b), q in zip(ranges, (qi, qt))]

                compare(f"{scheme_name:10} {backend:7}", lambda o, qi, qt: run(o, qi, qt, False),
                        lambda o, qi, qt: run(o, qi, qt, True), [(o, *q) for o, q in zip(outs, qw)], t_bf16,
                        ("copied then quantized", "quantized from the heads"))
    single_block(a, dev, text)
    print("\nRatios: bf16 time / quantized time (activation quant included). One-projection rows copy only "
          "that projection's tokens; the joint row is what a double block does.")


def single_block(a, dev, text):
    """cat((attention, gelu(mlp)), 2) -> linear2 of a Flux single block at 1024x1024."""
    tokens, mlp_width, n = text + IMAGE, 4 * HEADS * HEAD_DIM, HEADS * HEAD_DIM
    k = n + mlp_width
    out = torch.randn(1, HEADS, tokens, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    mlp = torch.randn(1, tokens, mlp_width, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.02
    copies = copies_needed(out, mlp, w)
    ins = [(out, mlp)] + [(torch.randn_like(out), torch.randn_like(mlp)) for _ in range(copies - 1)]
    ws = [w] + [w.roll(i, 0) for i in range(1, copies)]
    t_bf16 = graph_ms(lambda o, g, wi: F.linear(torch.cat((comfy_rows(o), F.gelu(g, approximate="tanh")), 2), wi, bias),
                      [(*x, wi) for x, wi in zip(ins, ws)])
    print(f"\nflux single: attention copy + gelu + cat + linear2: K={k} N={n}  bf16 {t_bf16 * 1000:.1f} us", flush=True)
    for scheme_name in a.schemes:
        scheme = get_scheme(scheme_name)
        qs = [reference.quantize_weight(wi.float(), scheme) for wi in ws]
        for backend, linear in usable_linears(scheme_name, scheme, a.backends, dev):

            def run(o, g, qd, sc, handed_off):
                prefix = DeferredHeads(o) if handed_off else comfy_rows(o)
                return linear(DeferredActivation(g, prefix).rows(), qd, sc, bias, scheme, k)

            compare(f"{scheme_name:10} {backend:7}", lambda o, g, qd, sc: run(o, g, qd, sc, False),
                    lambda o, g, qd, sc: run(o, g, qd, sc, True), [(*x, *q) for x, q in zip(ins, qs)], t_bf16,
                    ("copied, GELU in the quantizer", "heads and GELU in the quantizer"))


if __name__ == "__main__":
    main()
