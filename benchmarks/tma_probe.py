"""How fast can a Triton dense attention forward go on this GPU, with pointer loads against tensor
descriptors (the bulk tensor copy engine, TMA) and the loop's automatic warp specialization?

A probe, not fxsparse's kernel: one dense non-causal forward, bf16, [B*H, N, D] contiguous, one
query tile per program, the plain online softmax. It answers whether moving fxsparse's block loops
to tensor descriptors is worth the rewrite (RESULTS.md, session 4):

    PYTHONPATH=. python3 benchmarks/tma_probe.py            # D = 64 and 128, a table of TFLOP/s
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(acc, m_i, l_i, qk, v, scale_log2):
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _fwd_pointers(Q, K, V, O, N, scale_log2, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    base = bh * N * D
    q = tl.load(Q + base + rows[:, None] * D + d[None, :])
    acc = tl.zeros([BM, D], tl.float32)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for start in range(0, N, BN):
        cols = start + tl.arange(0, BN)
        kt = tl.load(K + base + cols[None, :] * D + d[:, None])
        v = tl.load(V + base + cols[:, None] * D + d[None, :])
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, tl.dot(q, kt), v, scale_log2)
    tl.store(O + base + rows[:, None] * D + d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


@triton.jit
def _fwd_descriptors(desc_q, desc_k, desc_v, desc_o, N, scale_log2, D: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, WS: tl.constexpr):
    bh = tl.program_id(1)
    row0 = bh * N + tl.program_id(0) * BM
    q = desc_q.load([row0, 0])
    acc = tl.zeros([BM, D], tl.float32)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for start in tl.range(0, N, BN, warp_specialize=WS):
        k = desc_k.load([bh * N + start, 0])
        v = desc_v.load([bh * N + start, 0])
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, tl.dot(q, k.T), v, scale_log2)
    desc_o.store([row0, 0], (acc / l_i[:, None]).to(desc_o.dtype))


def run(variant, q, k, v, bm, bn, warps, stages):
    from triton.tools.tensor_descriptor import TensorDescriptor

    bh, n, d = q.shape
    o = torch.empty_like(q)
    grid = (n // bm, bh)
    scale_log2 = d ** -0.5 * 1.4426950408889634
    if variant == "pointers":
        return o, lambda: _fwd_pointers[grid](q, k, v, o, n, scale_log2, D=d, BM=bm, BN=bn,
                                              num_warps=warps, num_stages=stages)
    descs = [TensorDescriptor.from_tensor(t.view(bh * n, d), [rows, d]) for t, rows in ((q, bm), (k, bn), (v, bn), (o, bm))]
    ws = variant == "descriptors+ws"
    return o, lambda: _fwd_descriptors[grid](*descs, n, scale_log2, D=d, BM=bm, BN=bn, WS=ws,
                                             num_warps=warps, num_stages=stages)


def main():
    from tabulate import tabulate
    from triton.testing import do_bench

    rows = []
    for b, h, n, d in ((8, 12, 4096, 64), (1, 16, 32768, 128)):
        q, k, v = (torch.randn(b * h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * b * h * n * n * d
        ref = F.scaled_dot_product_attention(q[None].float(), k[None].float(), v[None].float())[0]
        ms = do_bench(lambda: F.scaled_dot_product_attention(q[None], k[None], v[None]), warmup=100, rep=200)
        rows.append((f"{b}x{h}x{n}x{d}", "sdpa", "", round(ms, 4), round(flops / ms / 1e9), ""))
        for variant in ("pointers", "descriptors", "descriptors+ws"):
            for bm, bn, warps, stages in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3),
                                          (128, 128, 8, 2)):
                cfg = f"{bm},{bn},{warps},{stages}"
                try:
                    o, fn = run(variant, q, k, v, bm, bn, warps, stages)
                    fn()
                    err = ((o.float() - ref).norm() / ref.norm()).item()
                    ms = do_bench(fn, warmup=100, rep=200)
                except Exception as e:  # a config this triton or GPU rejects
                    rows.append((f"{b}x{h}x{n}x{d}", variant, cfg, None, None, f"{type(e).__name__}: {str(e)[:60]}"))
                    print(rows[-1], flush=True)
                    continue
                rows.append((f"{b}x{h}x{n}x{d}", variant, cfg, round(ms, 4), round(flops / ms / 1e9), f"{err:.1e}"))
                print(rows[-1], flush=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(tabulate(rows, headers=["shape", "variant", "BM,BN,warps,stages", "ms", "TFLOP/s", "rel err / error"]))


if __name__ == "__main__":
    sys.exit(main())
