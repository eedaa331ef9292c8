"""Host overhead of one fxsparse call: where the microseconds go when the GPU work is tiny.

    PYTHONPATH=. python benchmarks/overhead.py            # table of µs per call, then a cProfile summary

Each row times N calls back to back on a 1x1x128x64 problem (the GPU finishes each call long before
the host issues the next), so the time per call is the host's.
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import torch
from tabulate import tabulate

import fxsparse
from fxsparse import Layout
from fxsparse.kernels import attention as kernels


def per_call_us(fn, n=300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    dev = "cuda"
    q, k, v = (torch.randn(1, 1, 128, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    i = torch.arange(128, device=dev)
    layout = Layout.from_mask((i[:, None] - i[None, :]).abs() <= 16, block_size=64)
    tables = (layout.data, layout.batch, layout.num_heads)
    out = fxsparse.sparse_attention(q, k, v, layout)
    lse = torch.ops.fxsparse.sparse_attention(q, k, v, layout.data, 1, 1, None, 0.125, 64, False)[1]
    flat = torch.empty(1, 128, 1, 64, device=dev, dtype=torch.bfloat16).transpose(1, 2)

    def fwd_bwd():
        fxsparse.sparse_attention(q, k, v, layout).backward(dout)

    rows = []
    with torch.no_grad():
        rows.append(("sparse_attention forward (no grad)", per_call_us(lambda: fxsparse.sparse_attention(q, k, v, layout))))
        rows.append(("torch.ops.fxsparse.sparse_attention", per_call_us(
            lambda: torch.ops.fxsparse.sparse_attention(q, k, v, layout.data, 1, 1, None, 0.125, 64, False))))
        rows.append(("kernels.forward (launch + lse alloc)", per_call_us(
            lambda: kernels.forward(q, k, v, tables, None, 0.125, 64, False, flat))))
        rows.append(("kernels.backward (2 launches + allocs)", per_call_us(
            lambda: kernels.backward(dout, q, k, v, out, lse, tables, None, 0.125, 64, False, False))))
        rows.append(("torch.empty x4 (reference)", per_call_us(lambda: [torch.empty(1, 1, 128, 64, device=dev) for _ in range(4)])))
    rows.append(("sparse_attention forward (grad)", per_call_us(lambda: fxsparse.sparse_attention(q, k, v, layout))))
    rows.append(("forward + backward", per_call_us(fwd_bwd)))
    rows.append(("SDPA forward + backward (reference)", per_call_us(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(dout))))
    print(tabulate(rows, headers=["what", "µs per call"], floatfmt=".1f"))

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fwd_bwd()
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    print("\n".join(s.getvalue().splitlines()[:60]))


if __name__ == "__main__":
    sys.exit(main())
