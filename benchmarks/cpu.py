"""The op's block-skipping CPU path against PyTorch's dense ``scaled_dot_product_attention`` on the CPU.

    python benchmarks/cpu.py                 # the default sweep: N in 1024, 2048, 4096, fp32
    python benchmarks/cpu.py --n 2048 --backward

For each length and mask (a causal sliding window, a 2-D local window on a square grid of patches
plus one global token, BigBird) it times, on the same fp32 inputs: SDPA dense (its fused CPU
kernel), the block-skipping path (``fxsparse.sparse_attention`` with a Layout built once) and, with
``--reference``, the exact chunked reference that computes every block. Before timing, each case is
checked against the reference (relative error). Prints a table and writes JSON to
``benchmarks/out/cpu-<host>.json``. The target: at N >= 1024 and block density <= 25 %, the
forward at least 2x faster than SDPA dense.
"""
from __future__ import annotations

import os

# OpenMP threads spin between operations by default; on a shared machine the spinning takes the cores
# from the work (the sparse path runs many operations per call, so it suffers most). Both sides are
# timed with the same setting, recorded in the JSON; set OMP_WAIT_POLICY=ACTIVE to time the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tabulate import tabulate  # noqa: E402

import fxsparse  # noqa: E402
from fxsparse import Layout, cpu, patterns, reference  # noqa: E402


def masks(n: int, block: int):
    """name -> bool token mask [n, n] (or None: dense with SDPA's is_causal)."""
    side = int(math.isqrt(n - 1))
    out = {
        "causal sliding window 256": (patterns.sliding_window_mask(n, n, window=256, causal=True), True),
        "sliding window 128": (patterns.sliding_window_mask(n, n, window=128), False),
        "bigbird (3 window, 1 random, 1 global)": (
            patterns.bigbird_mask(n, n, block=block, num_random=1, num_window=3, num_global=1), False),
    }
    if side * side == n - 1:
        out[f"local_2d(window=3) on {side}x{side} + CLS"] = (
            patterns.local_2d_mask(n, n, window=3, prefix_tokens=1), False)
    return out


def timed(fn, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def run_case(b, h, n, d, mask, causal, block, iters, backward, with_reference):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    layout = Layout.from_mask(mask, block)
    sparse_mask = mask & torch.ones(n, n, dtype=torch.bool).tril() if causal else mask

    def sparse():
        return fxsparse.sparse_attention(q, k, v, layout, causal=causal)

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def dense_masked():  # what the sparse result equals: SDPA with the token mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sparse_mask)

    with torch.no_grad():
        want = dense_masked()
        err = ((sparse() - want).norm() / want.norm()).item()
        row = dict(n=n, batch=b, heads=h, head_dim=d, block=block, density=layout.density, rel_err=err,
                   sdpa_ms=timed(dense, iters), sparse_ms=timed(sparse, iters))
        if with_reference:
            tables = (layout.data, layout.batch, layout.num_heads)
            out = torch.empty_like(q)
            row["reference_ms"] = timed(
                lambda: reference.forward(q, k, v, tables, None, d ** -0.5, block, causal, out), iters)
    if backward:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        dout = torch.randn_like(q)

        def step(fn):
            def go():
                out = fn(qg, kg, vg)
                torch.autograd.grad(out, (qg, kg, vg), dout)
            return go

        row["sdpa_fwd_bwd_ms"] = timed(step(lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, is_causal=causal)), iters)
        row["sparse_fwd_bwd_ms"] = timed(step(lambda a, b_, c: fxsparse.sparse_attention(a, b_, c, layout, causal=causal)), iters)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="*", default=[1025, 2049, 4097])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--reference", action="store_true", help="also time the exact chunked reference")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    for n in args.n:
        for name, (mask, causal) in masks(n, args.block).items():
            row = run_case(args.batch, args.heads, n, args.head_dim, mask, causal, args.block, args.iters,
                           args.backward, args.reference)
            row["mask"] = name
            row["speedup"] = row["sdpa_ms"] / row["sparse_ms"]
            if args.backward:
                row["fwd_bwd_speedup"] = row["sdpa_fwd_bwd_ms"] / row["sparse_fwd_bwd_ms"]
            rows.append(row)
            print(f"  {n} {name}: density {row['density']:.1%}, SDPA {row['sdpa_ms']:.1f} ms, "
                  f"sparse {row['sparse_ms']:.1f} ms ({row['speedup']:.2f}x), rel err {row['rel_err']:.1e}",
                  flush=True)
    cols = ["n", "mask", "density", "sdpa_ms", "sparse_ms", "speedup"]
    cols += ["reference_ms"] if args.reference else []
    cols += ["sdpa_fwd_bwd_ms", "sparse_fwd_bwd_ms", "fwd_bwd_speedup"] if args.backward else []
    cols += ["rel_err"]
    print(f"\nfp32, batch {args.batch}, {args.heads} heads, head dim {args.head_dim}, layout block {args.block}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; torch "
          f"{torch.__version__}, {platform.processor() or platform.machine()}; load average {load_before:.1f} -> "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(tabulate([[r.get(c) for c in cols] for r in rows], headers=cols, floatfmt=".3g"))
    os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "out", f"cpu-{socket.gethostname()}-{torch.get_num_threads()}t.json")
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                cpu_count=os.cpu_count(), args=vars(args), plan_chunk_elements=cpu._CHUNK_ELEMENTS,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), load_average=(load_before, os.getloadavg()[0]))
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
