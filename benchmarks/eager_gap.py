"""Why the eager forward at 16384 reads slower than its CUDA-graph replay: the same calls timed four
ways (triton's do_bench, which clears L2 before each call, and a plain loop of back-to-back calls
between two events; eager and replayed), for fxsparse and FlexAttention, each order twice.

    PYTHONPATH=. python benchmarks/eager_gap.py [B,H,N,D] [densities]
"""
from __future__ import annotations

import sys

import torch
from tabulate import tabulate

import fxsparse
from fxsparse import Layout

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from attention import bench, graphed, make_flex, spin, window_for, window_mask  # noqa: E402


def loop(fn, n=50) -> float:
    """ms per call over n back-to-back calls (no L2 clearing between them)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main():
    b, h, n, d = (int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "2,16,16384,64").split(","))
    densities = [float(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "0.25,1.0").split(",")]
    torch._dynamo.config.cache_size_limit = 1000
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows = []
    for dens in densities:
        w = window_for(n, dens)
        layout = Layout.from_mask(window_mask(n, w, "cuda"), block_size=128)
        flex = make_flex(n, w, "cuda")
        fns = {"fxsparse": lambda: fxsparse.sparse_attention(q, k, v, layout), "flex": lambda: flex(q, k, v)}
        with torch.no_grad():
            graphs = {name: graphed(fn) for name, fn in fns.items()}
            spin()
            for turn in range(2):
                for name in (fns if turn == 0 else reversed(list(fns))):
                    for how, f in (("eager", fns[name]), ("graph", graphs[name])):
                        rows.append(dict(density=round(layout.density, 3), turn=turn, method=name, how=how,
                                         do_bench=round(bench(f), 4), loop=round(loop(f), 4)))
                        print(rows[-1], flush=True)
    print(tabulate(rows, headers="keys"))


if __name__ == "__main__":
    main()
