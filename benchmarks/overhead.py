"""Host overhead of one fxsparse call: where the microseconds go when the GPU work is tiny.

    PYTHONPATH=. python benchmarks/overhead.py            # table of µs per call, then a cProfile summary
    PYTHONPATH=. python benchmarks/overhead.py 8,12,4096,64,128   # host issue time vs GPU time at a real shape
    PYTHONPATH=. python benchmarks/overhead.py 8,12,4096,64,128 --gc-freeze   # the same, gc.freeze() first
    PYTHONPATH=. python benchmarks/overhead.py --sites [--device cpu]   # a model's attention: each layer's host µs

Each row times N calls back to back on a 1x1x128x64 problem (the GPU finishes each call long before
the host issues the next), so the time per call is the host's.
"""
from __future__ import annotations

import cProfile
import gc
import io
import json
import os
import pstats
import sys
import time

import torch
from tabulate import tabulate

import fxsparse
from fxsparse import Layout
from fxsparse.kernels import launch as kernels


def _sync():
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def per_call_us(fn, n=300) -> float:
    for _ in range(20):
        fn()
    _sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync()
    return (time.perf_counter() - t) / n * 1e6


def issue_vs_gpu(fn, n=50):
    """(host µs to issue one call, GPU µs per call) over n calls back to back, grads dropped each call."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = 0.0
    start.record()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        host += time.perf_counter() - t
    end.record()
    end.synchronize()
    return host / n * 1e6, start.elapsed_time(end) / n * 1e3


def problem(spec: str):
    """"B,H,N,D,window" -> (q, k, v, dout, layout): bf16 on the GPU, q/k/v requiring grad, a local
    window |i - j| <= window as a 128-block layout (window < 0: None, dense)."""
    b, h, n, d, w = (int(x) for x in spec.split(","))
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    i = torch.arange(n, device="cuda")
    layout = None if w < 0 else Layout.from_mask((i[:, None] - i[None, :]).abs() <= w, block_size=128)
    return q, k, v, torch.randn_like(q), layout


def at_shape(spec: str, gc_freeze: bool = False):
    """Host issue time against GPU time of forward+backward at a real shape, "B,H,N,D,window" as in
    problem() (fxsparse eager path, the custom-op path, FlexAttention)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import fxsparse.op as op

    q, k, v, dout, layout = problem(spec)
    b, h, n, d = q.shape
    w = int(spec.split(",")[-1])
    bm = create_block_mask(lambda b_, h_, qi, ki: (qi - ki).abs() <= w, None, None, n, n, device=q.device)
    flex = torch.compile(flex_attention, dynamic=False)

    def step(f):
        def run():
            for t in (q, k, v):
                t.grad = None
            f().backward(dout)
        return run

    rows = []
    if gc_freeze:  # move every object alive now out of the collector's sight
        gc.collect()
        gc.freeze()
    rows.append(("fxsparse eager path",) + issue_vs_gpu(step(lambda: fxsparse.sparse_attention(q, k, v, layout))))
    plain = op._plain_eager
    op._plain_eager = lambda tensors: False
    rows.append(("fxsparse custom op",) + issue_vs_gpu(step(lambda: fxsparse.sparse_attention(q, k, v, layout))))
    op._plain_eager = plain
    rows.append(("flex",) + issue_vs_gpu(step(lambda: flex(q, k, v, block_mask=bm))))
    with torch.no_grad():
        rows.append(("fxsparse forward",) + issue_vs_gpu(lambda: fxsparse.sparse_attention(q, k, v, layout)))
        rows.append(("flex forward",) + issue_vs_gpu(lambda: flex(q, k, v, block_mask=bm)))
    print(f"{b}x{h}x{n}x{d}, window {w}, forward+backward unless named; gc objects tracked {len(gc.get_objects())}, "
          f"frozen {gc.get_freeze_count()}")
    print(tabulate(rows, headers=["what", "host µs to issue", "GPU µs per call"], floatfmt=".1f"))
    _write_json("overhead-at-shape.json", dict(shape=spec, rows=[dict(what=r[0], host_us=r[1], gpu_us=r[2]) for r in rows]))


def _write_json(name: str, result: dict):
    """Raw output under the ignored benchmarks/out/."""
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    env = dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "none", torch=torch.__version__)
    with open(os.path.join(out, name), "w") as f:
        json.dump(dict(env=env, **result), f, indent=1)


def sites(device: str):
    """Host µs per call of one attention layer of a transformed model, layer by layer: the owner module
    (a GPT-2 attention: its projections, the redirect's TorchFunctionMode over every torch call of its
    forward, the site), the SiteAttention call alone, sparse_attention alone with the site's Layout, and
    the original module. A 1-head, 128-token, 64-wide layer in bf16 on the GPU (float32 on the CPU), so
    the device's work is far below the host's and the times are the host's."""
    import transformers

    from fxsparse import patterns
    from fxsparse.site import site_modules

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = transformers.GPT2Config(n_positions=128, n_embd=64, n_layer=1, n_head=1, vocab_size=128, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  attn_implementation="sdpa")
    model = transformers.GPT2Model(cfg).to(device, dtype).eval()
    ids = torch.zeros(1, 128, dtype=torch.long, device=device)
    sparse = fxsparse.transform(model, patterns.sliding_window(32, causal=True, block_size=64),
                                example_inputs={"input_ids": ids})
    x = torch.randn(1, 128, 64, device=device, dtype=dtype)
    q = torch.randn(1, 1, 128, 64, device=device, dtype=dtype)
    site = site_modules(sparse)[0]
    layout = site.kernel_layout_for(q, q, q)
    calls = {
        "transformed attention module (owner)": lambda: sparse.h[0].attn(x),
        "original attention module": lambda: model.h[0].attn(x),
        "SiteAttention call": lambda: site(q, q, q, causal=True),
        "sparse_attention(layout)": lambda: fxsparse.sparse_attention(q, q, q, layout),
        "scaled_dot_product_attention (reference)":
            lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True),
    }
    samples = {name: [] for name in calls}
    with torch.no_grad():
        for turn in range(3):  # in turns, the order reversed every other turn: the host's speed drifts
            for name in (list(calls) if turn % 2 == 0 else list(calls)[::-1]):
                samples[name].append(per_call_us(calls[name]))
    rows = [(name, sorted(us)[1], " ".join(f"{u:.1f}" for u in us)) for name, us in samples.items()]
    print(f"host µs per call on {device} ({dtype}), forward without grad; median of 3 turns")
    print(tabulate(rows, headers=["what", "µs per call", "turns"], floatfmt=".1f"))
    _write_json(f"overhead-sites-{device}.json", dict(rows=[dict(what=w, us=us, turns=t) for w, us, t in rows]))


def main():
    if "--sites" in sys.argv[1:]:
        return sites(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda")
    if len(sys.argv) > 1:  # B,H,N,D,window [--gc-freeze]
        return at_shape(sys.argv[1], "--gc-freeze" in sys.argv[2:])
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
    class Nothing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    rows.append(("autograd.Function clone fwd+bwd (reference)", per_call_us(lambda: Nothing.apply(q).backward(dout))))
    rows.append(("sparse_attention forward (grad)", per_call_us(lambda: fxsparse.sparse_attention(q, k, v, layout))))
    rows.append(("forward + backward", per_call_us(fwd_bwd)))
    rows.append(("SDPA forward + backward (reference)", per_call_us(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(dout))))
    print(tabulate(rows, headers=["what", "µs per call"], floatfmt=".1f"))
    _write_json("overhead.json", dict(rows=[dict(what=w, us=us) for w, us in rows]))

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fwd_bwd()
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats("fxsparse|jit.py|autograd", 25)
    print("\n".join(line[:150] for line in s.getvalue().splitlines() if line.strip()))


if __name__ == "__main__":
    sys.exit(main())
