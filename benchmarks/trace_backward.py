"""Where the host time of one eager forward+backward goes, by wall-clock stamps (no profiler).

    PYTHONPATH=. python benchmarks/trace_backward.py 8,12,4096,64,128
"""
import sys
import time

import torch

import fxsparse
import fxsparse.op as op
from fxsparse import Layout


def problem(spec: str):
    """"B,H,N,D,window" -> (q, k, v, dout, layout): bf16 on the GPU, q/k/v requiring grad, a local
    window |i - j| <= window as a 128-block layout (window < 0: None, dense)."""
    b, h, n, d, w = (int(x) for x in spec.split(","))
    dev = "cuda"
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    i = torch.arange(n, device=dev)
    layout = None if w < 0 else Layout.from_mask((i[:, None] - i[None, :]).abs() <= w, block_size=128)
    return q, k, v, torch.randn_like(q), layout


def main():
    q, k, v, dout, layout = problem(sys.argv[1])
    b, h, n, d = q.shape
    w = sys.argv[1].split(",")[-1]
    stamps = {}
    inner = op._EagerAttention.backward
    impl = op._backward_impl

    def backward(ctx, g):
        stamps["bwd_in"] = time.perf_counter()
        r = inner(ctx, g)
        stamps["bwd_out"] = time.perf_counter()
        return r

    def backward_impl(*a):
        stamps["impl_in"] = time.perf_counter()
        r = impl(*a)
        stamps["impl_out"] = time.perf_counter()
        return r

    op._EagerAttention.backward = staticmethod(backward)
    op._backward_impl = backward_impl
    sums = {}
    for it in range(60):
        for t in (q, k, v):
            t.grad = None
        t0 = time.perf_counter()
        out = fxsparse.sparse_attention(q, k, v, layout)
        t1 = time.perf_counter()
        out.backward(dout)
        t2 = time.perf_counter()
        if it >= 10:
            parts = dict(forward=t1 - t0, to_backward=stamps["bwd_in"] - t1, backward_fn=stamps["bwd_out"] - stamps["bwd_in"],
                         kernels_backward=stamps["impl_out"] - stamps["impl_in"], after_backward=t2 - stamps["bwd_out"],
                         total=t2 - t0)
            for key, val in parts.items():
                sums[key] = sums.get(key, 0.0) + val
    torch.cuda.synchronize()
    print(f"{b}x{h}x{n}x{d} window {w}: µs per call")
    for key, val in sums.items():
        print(f"  {key:18s} {val / 50 * 1e6:8.1f}")


if __name__ == "__main__":
    main()
