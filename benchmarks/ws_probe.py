"""What triton's automatic warp specialization (a producer warp group issuing the TMA loads, two
consumer groups computing) could give a flash forward on this GPU, before fitting it to the op's
kernel: a plain dense forward over 2-D tensor descriptors, with and without `warp_specialize`,
against SDPA (flash) on the same inputs. Prints ms, TFLOP/s and the error against SDPA.

    python3 benchmarks/ws_probe.py            # (8, 12, 4096, 64) and (1, 16, 32768, 128), bf16
    python3 benchmarks/ws_probe.py 8,12,4096,64 128,64,4,2,1   # one config (ws 0 / 1)

On triton 3.6 the Hopper pass runs only at num_warps=4 (it adds the other groups) and only on a
kernel with one loop whose loads are all tensor-descriptor loads. On the H200 with triton 3.6 the
warp-specialized kernels compile and then hang (RESULTS.md, v11): run each config under `timeout`.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _dense_fwd(QD, KD, VD, Out, N, scale_log2, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
               WS: tl.constexpr):
    row0 = tl.program_id(1) * N
    off = tl.program_id(0) * BM
    q = QD.load([row0 + off, 0])
    acc = tl.zeros([BM, D], tl.float32)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for j in tl.range(0, N, BN, warp_specialize=WS):
        kt = KD.load([row0 + j, 0])
        qk = tl.dot(q, kt.T)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = VD.load([row0 + j, 0])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    rows = off + tl.arange(0, BM)
    tl.store(Out + (row0 + rows)[:, None] * D + tl.arange(0, D)[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty))


def run(shape, bm, bn, warps, stages, ws):
    b, h, n, d = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(b * h * n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    qd = TensorDescriptor(q, [b * h * n, d], [d, 1], [bm, d])
    kd, vd = (TensorDescriptor(t, [b * h * n, d], [d, 1], [bn, d]) for t in (k, v))
    fn = lambda: _dense_fwd[(n // bm, b * h)](qd, kd, vd, out, n, d ** -0.5 * 1.4426950408889634, BM=bm, BN=bn, D=d,
                                              WS=ws, num_warps=warps, num_stages=stages)
    fn()
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.view(b, h, n, d) for t in (q, k, v)))
    err = (out.view(b, h, n, d).float() - ref.float()).abs().max().item()
    ms = triton.testing.do_bench(fn, warmup=50, rep=300)
    return ms, err


CONFIGS = {(8, 12, 4096, 64): [(128, 64, 8, 3, False), (64, 64, 4, 3, False), (128, 64, 4, 2, True),
                               (128, 64, 4, 3, True), (128, 128, 4, 2, True)],
           (1, 16, 32768, 128): [(128, 128, 8, 3, False), (128, 128, 8, 2, False), (128, 128, 4, 2, True),
                                 (128, 64, 4, 3, True), (128, 128, 4, 3, True)]}


def main():
    """No arguments: every shape and config. `B,H,N,D BM,BN,warps,stages,ws` (ws 0/1): that one only
    (a warp-specialized kernel that hangs can then be cut off by the caller's timeout)."""
    from tabulate import tabulate

    if len(sys.argv) == 3:
        shape = tuple(int(x) for x in sys.argv[1].split(","))
        bm, bn, w, s, ws = (int(x) for x in sys.argv[2].split(","))
        work = {shape: [(bm, bn, w, s, bool(ws))]}
    else:
        work = CONFIGS
    rows = []
    for shape, configs in work.items():
        b, h, n, d = shape
        flops = 4 * b * h * n * n * d
        q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
        ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), warmup=50, rep=300)
        rows.append(dict(shape=str(shape), config="sdpa", ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1), err=""))
        for cfg in configs:
            try:
                ms, err = run(shape, *cfg)
                rows.append(dict(shape=str(shape), config=str(cfg), ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                                 err=f"{err:.1e}"))
            except Exception as e:  # a config the compiler refuses
                rows.append(dict(shape=str(shape), config=str(cfg), ms="", tflops="", err=f"{type(e).__name__}: {str(e)[:60]}"))
    print(tabulate(rows, headers="keys"))


if __name__ == "__main__":
    sys.exit(main())
