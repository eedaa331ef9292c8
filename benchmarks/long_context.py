"""Long context: building layouts from mask functions, and the op, against FlexAttention.

Two parts, fxsparse and FlexAttention in one run (GPU; ``--device cpu`` times the builds on the CPU):

* ``build``: a causal sliding window (4096 tokens) and a causal 16-document packed mask, from 16k to
  1M tokens: fxsparse's ``Layout.from_mask_mod`` / ``masks.document_layout`` against
  ``create_block_mask``; time (median of ``--reps``) and the peak memory the build adds beyond
  what it returns (CUDA's peak-memory counter; on the CPU, the process's peak resident memory).
* ``op``: forward and forward+backward at 128k and 256k tokens (B = 1, H = 16, D = 64 and 128, bf16)
  with the same masks: ``fxsparse.sparse_attention`` against a compiled ``flex_attention``.

    python benchmarks/long_context.py --parts build,op --out benchmarks/out/long_context.json

Rows are printed as they are measured (one JSON object a line) and written to ``--out``; a part
stops starting new rows once ``--deadline`` seconds have passed since the start.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxsparse  # noqa: E402
from fxsparse import Layout, patterns  # noqa: E402
from fxsparse.masks import document_ids, document_layout  # noqa: E402

WINDOW, DOCS, BLOCK = 4096, 16, 128
START = time.perf_counter()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def doc_lengths(n: int, seed: int = 0) -> torch.Tensor:
    """DOCS document lengths summing to n, uneven (between half and 1.5 times the mean)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(DOCS, generator=g) + 0.5
    lengths = (w / w.sum() * n).long()
    lengths[-1] += n - int(lengths.sum())
    return lengths


def window_mod(b, h, q_idx, kv_idx):
    d = q_idx - kv_idx
    return (d >= 0) & (d <= WINDOW)


def doc_mod(ids):
    def mod(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (kv_idx <= q_idx)
    return mod


def measure(build, device, reps: int):
    """(median seconds, extra peak bytes beyond the result, result) of build()."""
    times, extra, out = [], 0, None
    for _ in range(reps):
        out = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sync(device)
        t0 = time.perf_counter()
        out = build()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            extra = max(extra, torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated())
        else:  # the process's peak only grows: the first build's growth, later ones' only if higher
            extra = max(extra, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    return statistics.median(times), extra, out


def block_mask_bytes(bm) -> int:
    """What a FlexAttention BlockMask holds: its block counts and index tables, forward and transposed."""
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
             "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    tensors = [getattr(bm, n, None) for n in names]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def emit(row: dict, rows: list):
    rows.append(row)
    print(json.dumps(row), flush=True)


def part_build(args, device, rows):
    from torch.nn.attention.flex_attention import create_block_mask

    for n in args.lengths:
        ids = document_ids(doc_lengths(n)).to(device)
        cases = {
            "window": (lambda: Layout.from_mask_mod(patterns.sliding_window(WINDOW, causal=True).mask_mod(n, n), n, n,
                                                    block_size=BLOCK, device=device), window_mod),
            "documents": (lambda: document_layout(ids, causal=True, block_size=BLOCK), doc_mod(ids)),
        }
        for mask, (fx_build, mod) in cases.items():
            if time.perf_counter() - START > args.deadline:
                return
            row = dict(part="build", mask=mask, n=n, device=str(device))
            measure(fx_build, device, 1)  # first call: warm-up
            t, extra, layout = measure(fx_build, device, args.reps)
            row.update(fxsparse_ms=round(t * 1e3, 2), fxsparse_extra_mib=round(extra / 2**20, 1),
                       fxsparse_tables_mib=round(layout.data.numel() * 4 / 2**20, 1), density=round(layout.density, 5))
            del layout
            if "flex" in args.methods:
                compile_flex = n > args.flex_eager_max
                try:
                    def flex_build():
                        return create_block_mask(mod, None, None, n, n, device=device, BLOCK_SIZE=BLOCK,
                                                 _compile=compile_flex)
                    measure(flex_build, device, 1)
                    t, extra, bm = measure(flex_build, device, args.reps)
                    row.update(flex_ms=round(t * 1e3, 2), flex_extra_mib=round(extra / 2**20, 1),
                               flex_tables_mib=round(block_mask_bytes(bm) / 2**20, 1), flex_compiled=compile_flex)
                    row["speedup"] = round(row["flex_ms"] / row["fxsparse_ms"], 2)
                    del bm
                except Exception as err:  # out of memory at long lengths: say so and go on
                    row["flex_error"] = f"{type(err).__name__}: {str(err)[:120]}"
            emit(row, rows)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def bench_ms(fn, reps: int) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=3 * reps, rep=20 * reps, return_mode="median")


def op_row(n, mask, d, layout, bm, flex, device, reps) -> dict:
    """Forward and forward+backward of fxsparse and FlexAttention on one problem."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 16, n, d, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn_like(q)
    fns = {"fxsparse": lambda: fxsparse.sparse_attention(q, k, v, layout),
           "flex": lambda: flex(q, k, v, block_mask=bm)}
    row = dict(part="op", mask=mask, n=n, d=d, heads=16, density=round(layout.density, 5))
    for name, fn in fns.items():
        try:
            with torch.no_grad():
                fwd = bench_ms(fn, reps)

            def step(fn=fn):
                q.grad = k.grad = v.grad = None
                fn().backward(dout)
            step()
            both = bench_ms(step, reps)
            row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = round(fwd, 3), round(both, 3)
        except Exception as err:
            row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:160]}"
    if "flex_fwd_ms" in row and "fxsparse_fwd_ms" in row:
        row["fwd_vs_flex"] = round(row["flex_fwd_ms"] / row["fxsparse_fwd_ms"], 2)
        row["fwdbwd_vs_flex"] = round(row["flex_fwdbwd_ms"] / row["fxsparse_fwdbwd_ms"], 2)
    return row


def tables_block_mask(layout, mod):
    """A FlexAttention BlockMask with fxsparse's blocks and FlexAttention's own mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask.from_kv_blocks(layout.part_num.clone(), layout.part_idx.clone(), layout.full_num.clone(),
                                    layout.full_idx.clone(), BLOCK_SIZE=layout.block_size, mask_mod=mod,
                                    seq_lengths=tuple(layout.shape))


def part_op(args, device, rows):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    for n in args.op_lengths:
        ids = document_ids(doc_lengths(n)).to(device)
        for mask in args.op_masks:
            if mask == "window":
                layout = Layout.from_mask_mod(patterns.sliding_window(WINDOW, causal=True).mask_mod(n, n), n, n,
                                              block_size=BLOCK, device=device)
                mod = window_mod
            else:
                layout, mod = document_layout(ids, causal=True, block_size=BLOCK), doc_mod(ids)
            source = "create_block_mask"
            try:
                bm = create_block_mask(mod, None, None, n, n, device=device, BLOCK_SIZE=BLOCK, _compile=True)
            except torch.OutOfMemoryError:
                source = "fxsparse tables"  # FlexAttention's builder at 256k: the same blocks from fxsparse's tables
                gc.collect()
                torch.cuda.empty_cache()
                bm = tables_block_mask(layout, mod)
            for d in args.head_dims:
                if time.perf_counter() - START > args.deadline:
                    return
                row = op_row(n, mask, d, layout, bm, flex, device, args.reps)
                row["flex_block_mask"] = source
                emit(row, rows)
            del layout, bm
            gc.collect()
            torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="build,op")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default="16384,32768,65536,131072,262144,524288,1048576")
    p.add_argument("--op-lengths", default="131072,262144")
    p.add_argument("--op-masks", default="window,documents")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--methods", default="fxsparse,flex")
    p.add_argument("--flex-eager-max", type=int, default=65536,
                   help="create_block_mask runs uncompiled up to this length, with _compile=True above it")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--deadline", type=float, default=1e9, help="seconds after which no new row is started")
    p.add_argument("--out", default="benchmarks/out/long_context.json")
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.op_lengths = [int(x) for x in args.op_lengths.split(",")]
    args.head_dims = [int(x) for x in args.head_dims.split(",")]
    args.op_masks = args.op_masks.split(",")
    device = torch.device(args.device)
    rows = []
    meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(meta), flush=True)
    try:
        for part in args.parts.split(","):
            {"build": part_build, "op": part_op}[part](args, device, rows)
    finally:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
