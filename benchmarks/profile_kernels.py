"""A few forward+backward steps of one problem, for a profiler (ncu) to pick kernels from.

    ncu --clock-control none --section SpeedOfLight -k regex:"_fwd_kernel|_dq_kernel|_dkdv_kernel" \
        --launch-skip 3 --launch-count 3 python3 benchmarks/profile_kernels.py 8,12,4096,64,128

B,H,N,D,window as in trace_backward.py (window -1: dense). The first step compiles (launches 1-3),
the next ones are the ones to profile.
"""
from __future__ import annotations

import sys

import torch

import fxsparse
from trace_backward import problem


def main():
    q, k, v, dout, layout = problem(sys.argv[1])
    for _ in range(3):
        fxsparse.sparse_attention(q, k, v, layout).backward(dout)
    torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
