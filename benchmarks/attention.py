"""Block-sparse attention speed: fxsparse against dense SDPA, FlexAttention and SDPA with a bool mask.

    PYTHONPATH=. python benchmarks/attention.py                 # the full table (GPU), JSON in benchmarks/out/
    PYTHONPATH=. python benchmarks/attention.py --check         # correctness at real shapes first
    PYTHONPATH=. python benchmarks/attention.py --sweep         # kernel launch configs (CUDA-graph replays)
    PYTHONPATH=. python benchmarks/attention.py --shapes 8x16x4096x64 --options '{"forward_descriptors": true}'
    PYTHONPATH=. python benchmarks/attention.py --shapes 1x12x8192x64 --causal-window 1024   # a causal LM's window
    PYTHONPATH=. python benchmarks/attention.py --shapes 1x12x16385x64 --local-2d 128,3,1    # ViT-B/16 at 2048 px

--options takes a fxsparse.KernelOptions as JSON of the fields to change (LaunchConfigs as lists:
"forward_config": [rows, cols, warps, stages]); every fxsparse call of the run uses it.

Masks are 1-D local windows |i - j| <= w, w chosen so that the 128-block density is near the target;
with --causal-window W, the causal sliding window 0 <= i - j <= W instead (the densities are ignored; the
layout holds the causality, so fxsparse gets no causal flag, and the dense baseline is SDPA's causal kernel);
with --local-2d G,W,P, a ViT's local 2-D window on a G x G grid after P prefix tokens, which every query
sees (--prefix-queries global: the prefix tokens also see every key; local: only the prefix).
"Useful" TFLOP/s counts the FLOPs of the blocks a method computes: density x dense FLOPs for the
block-sparse methods, dense FLOPs for SDPA (forward 4·N²·D per head, backward 2.5x that).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

import fxsparse
from fxsparse import Layout

OPTIONS = {}  # keyword arguments of every fxsparse call: {"options": KernelOptions} when --options is given

SHAPES = [(8, 12, 4096, 64), (2, 16, 16384, 64), (1, 16, 32768, 128), (64, 12, 1024, 64)]
DENSITIES = [0.03, 0.10, 0.25, 1.0]
BLOCK = 128
CAUSAL_WINDOW = None  # --causal-window: every mask is 0 <= i - j <= CAUSAL_WINDOW
MASK_MOD = None  # --causal-window, --local-2d: every mask is mask_mod(q_idx, kv_idx) on broadcast indices


def causal_window_mod(w: int):
    def mod(q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= w)
    return mod


def local_2d_mod(grid: int, window: int, prefix: int, global_queries: bool = True):
    """A ViT's local window: patch tokens (after `prefix` tokens) see patches within `window` rows and
    columns on a grid x grid image, and the prefix tokens; the prefix tokens see every key
    (global_queries) or only the prefix."""
    def mod(q_idx, kv_idx):
        qp, kp = q_idx - prefix, kv_idx - prefix
        near = ((qp // grid - kp // grid).abs() <= window) & ((qp % grid - kp % grid).abs() <= window)
        patch_row = (kv_idx < prefix) | near
        return torch.where(q_idx < prefix, (kv_idx >= 0) if global_queries else (kv_idx < prefix), patch_row)
    return mod


def block_density(n: int, w: int) -> float:
    """128-block density of the window |i - j| <= w: block pair (i, j) is visited when |i - j| * B - (B - 1) <= w."""
    nb = math.ceil(n / BLOCK)
    d = torch.arange(nb)
    return ((d[:, None] - d[None, :]).abs() * BLOCK - (BLOCK - 1) <= w).sum().item() / nb**2


def window_for(n: int, density: float) -> int:
    """Window whose 128-block density is nearest `density` (the largest such window)."""
    if density >= 1.0:
        return n
    candidates = [0] + [k * BLOCK for k in range(1, math.ceil(n / BLOCK) + 1)]
    return min(candidates, key=lambda w: (abs(block_density(n, w) - density), -w))


def window_mask(n: int, w: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    if MASK_MOD is not None:
        return MASK_MOD(i[:, None], i[None, :])
    return (i[:, None] - i[None, :]).abs() <= w


def windows(n: int, densities) -> list:
    """The windows a shape is measured at: one per density, or the causal window."""
    if MASK_MOD is not None:
        return [CAUSAL_WINDOW or 0]
    return sorted({window_for(n, dens) for dens in densities})


def spin(ms: float = 300.0):
    """Keep the GPU busy for a while, so the clocks are up before the first measurement."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(20):
            a @ a
        end.record()
        end.synchronize()
        if start.elapsed_time(end) > ms:
            return


def bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=100, rep=100, grad_to_none=grad_to_none, return_mode="median")


def graphed(fn, grad=False):
    """fn captured in a CUDA graph (grad=False: under no_grad); the returned function replays it."""
    with torch.set_grad_enabled(grad):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph.replay


def make_flex(n: int, w: int, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def local(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= w

    def given(b, h, q_idx, kv_idx):
        return MASK_MOD(q_idx, kv_idx)

    bm = create_block_mask(local if MASK_MOD is None else given, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device, BLOCK_SIZE=BLOCK)
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=bm)


def run_table(shapes, densities, modes, methods, block_sizes=(BLOCK,), progress=None, repeats=1):
    torch._dynamo.config.cache_size_limit = 1000
    dev = "cuda"
    rows = []
    for b, h, n, d in shapes:
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3))
        dout = torch.randn_like(q)
        dense_flops = 4 * b * h * n * n * d
        for w in windows(n, densities):
            mask = window_mask(n, w, dev)
            layout = Layout.from_mask(mask, block_size=BLOCK)  # the 128-block density every method is counted at
            causal = CAUSAL_WINDOW is not None  # the dense baseline of a causal mask is SDPA's causal kernel
            fns = {"sdpa-dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
            own_density = {}
            for bs in block_sizes:  # fxsparse with layouts of each block size ("fxsparse", "fxsparse-b64", ...)
                lay = layout if bs == BLOCK else Layout.from_mask(mask, block_size=bs)
                tag = "" if bs == block_sizes[0] else f"-b{bs}"
                own_density[f"fxsparse{tag}"] = own_density[f"fxsparse{tag}-graph"] = lay.density
                fns[f"fxsparse{tag}"] = lambda lay=lay: fxsparse.sparse_attention(q, k, v, lay, **OPTIONS)
            if "flex" in methods:
                flex = make_flex(n, w, dev)
                fns["flex"] = lambda: flex(q, k, v)
            if "sdpa-mask" in methods and n <= 16384:
                fns["sdpa-mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            spin()
            for mode in modes:
                base = {}
                names = []
                for m in methods:  # "fxsparse" and "fxsparse-graph" stand for every block size
                    if m in ("fxsparse", "fxsparse-graph"):
                        names += [f"fxsparse{'' if bs == block_sizes[0] else f'-b{bs}'}{m[8:]}" for bs in block_sizes]
                    else:
                        names.append(m)
                replays = {}

                def measure(name):
                    """ms of one method in this mode, or None (out of memory)."""
                    graph = name.endswith("-graph")  # the same calls replayed from a CUDA graph: no host overhead
                    fn = fns[name.removesuffix("-graph")]
                    try:
                        if mode == "fwd+bwd":
                            def step(fn=fn):
                                fn().backward(dout)
                            if graph and name not in replays:
                                # the replay accumulates into the gradients that existed at capture: keep them
                                # alive, or an eager run that drops q.grad frees memory the replay still writes
                                replays[name] = graphed(step, grad=True)
                                replays[name + " grads"] = [q.grad, k.grad, v.grad]
                            return bench(replays[name] if graph else step, grad_to_none=None if graph else [q, k, v])
                        with torch.no_grad():
                            if graph and name not in replays:
                                replays[name] = graphed(fn)
                            return bench(replays[name] if graph else fn)
                    except torch.OutOfMemoryError:
                        return None

                names = [nm for nm in names if nm.removesuffix("-graph") in fns]
                samples = {nm: [] for nm in names}
                for _ in range(repeats):  # methods take turns, so a slow spell of the host hits them alike
                    for nm in names:
                        ms = measure(nm)
                        if ms is not None:
                            samples[nm].append(ms)
                for name in names:
                    if not samples[name]:
                        continue
                    ms = sorted(samples[name])[len(samples[name]) // 2]
                    dense_share = 0.5 if causal else 1.0
                    computed = dense_flops * (dense_share if name.startswith("sdpa") else own_density.get(name, layout.density))
                    if mode == "fwd+bwd":
                        computed *= 3.5
                    useful = dense_flops * layout.density * (3.5 if mode == "fwd+bwd" else 1.0)
                    base[name] = ms
                    rows.append(dict(
                        shape=f"{b}x{h}x{n}x{d}", density=round(layout.density, 4), window=w, mode=mode, method=name,
                        ms=round(ms, 4), tflops=round(computed / ms / 1e9, 1), useful_tflops=round(useful / ms / 1e9, 1),
                        **({"runs": [round(x, 4) for x in samples[name]]} if repeats > 1 else {}),
                    ))
                for r in rows:
                    if r["shape"] == f"{b}x{h}x{n}x{d}" and r["mode"] == mode and r["density"] == round(layout.density, 4):
                        if "flex" in base:
                            r["vs_flex"] = round(base["flex"] / r["ms"], 2)
                        if "sdpa-dense" in base:
                            r["vs_sdpa"] = round(base["sdpa-dense"] / r["ms"], 2)
                torch.cuda.empty_cache()
        if progress:
            progress(rows)
    return rows


def check(shapes):
    """fxsparse (Triton, bf16/fp32) against fp32 masked SDPA math at real shapes, forward and backward."""
    dev = "cuda"
    results = []
    cases = []
    for b, h, n, d in shapes:
        # with --causal-window, that window as it is (its full blocks too); else 10 % of its elements dropped
        keep = 1.0 if MASK_MOD is not None else 0.9
        cases.append(dict(b=1, h=h, hkv=h, n=n, d=d, dens=0.1, bias=False, causal=False, dtype=torch.bfloat16, keep=keep))
    cases += [
        dict(b=2, h=12, hkv=12, n=197, d=64, dens=0.3, bias=True, causal=False, dtype=torch.bfloat16),
        dict(b=2, h=8, hkv=2, n=1000, d=80, dens=0.2, bias=False, causal=True, dtype=torch.float16),
        dict(b=1, h=4, hkv=4, n=777, d=128, dens=0.25, bias=True, causal=True, dtype=torch.float32),
        dict(b=1, h=4, hkv=1, n=513, d=96, dens=0.5, bias=False, causal=False, dtype=torch.bfloat16),
        dict(b=1, h=2, hkv=2, n=300, d=256, dens=0.5, bias=False, causal=False, dtype=torch.bfloat16),
        dict(b=2, h=8, hkv=8, n=1500, d=64, dens=0.2, bias=False, causal=True, dtype=torch.bfloat16),
        dict(b=2, h=8, hkv=4, n=2000, d=128, dens=0.15, bias=False, causal=True, dtype=torch.bfloat16),
        # global tokens (rows that visit every kv block: the forward splits them across programs)
        dict(b=1, h=12, hkv=12, n=8193, d=64, dens=0.05, bias=False, causal=False, dtype=torch.bfloat16, glob=(0,)),
        dict(b=2, h=8, hkv=8, n=6000, d=128, dens=0.05, bias=True, causal=False, dtype=torch.float16,
             glob=(0, 1, 2, 3000)),
        dict(b=2, h=8, hkv=2, n=8192, d=64, dens=0.05, bias=False, causal=True, dtype=torch.bfloat16,
             glob=(0, 4100, 8000)),
    ]
    for c in cases:
        b, h, hkv, n, d, dt = c["b"], c["h"], c["hkv"], c["n"], c["d"], c["dtype"]
        if n > 8192:
            n = 8192
        g = torch.Generator(device=dev).manual_seed(1)
        q = torch.randn(b, n, 3, h, d, device=dev, dtype=dt, generator=g)[:, :, 0].transpose(1, 2).requires_grad_()
        k = torch.randn(b, hkv, n, d, device=dev, dtype=dt, generator=g).requires_grad_()
        v = torch.randn(b, hkv, n, d, device=dev, dtype=dt, generator=g).requires_grad_()
        mask = window_mask(n, max(16, int(c["dens"] * n / 2)), dev)
        if c.get("keep", 0.9) < 1:  # partial blocks everywhere
            mask = mask & (torch.rand(h, n, n, device=dev, generator=g) < c.get("keep", 0.9))
        for t in c.get("glob", ()):  # a global token: it attends to every key, every query attends to it
            mask = mask.clone()
            mask[..., t, :] = True
            mask[..., :, t] = True
        bias = torch.randn(1, h, n, n, device=dev, generator=g).requires_grad_() if c["bias"] else None
        layout = Layout.from_mask(mask, block_size=BLOCK)
        out = fxsparse.sparse_attention(q, k, v, layout, bias=bias, causal=c["causal"], **OPTIONS)
        split = fxsparse.op.kernel_layout(layout, d).split
        # reference: fp32 math
        full = mask & (torch.ones(n, n, device=dev, dtype=torch.bool).tril() if c["causal"] else True)
        add = torch.zeros(h, n, n, device=dev).masked_fill(~full, float("-inf"))
        if bias is not None:
            add = add + bias.float()
        qf, kf, vf = (t.float() for t in (q, k, v))
        kf, vf = kf.repeat_interleave(h // hkv, 1), vf.repeat_interleave(h // hkv, 1)
        s = qf @ kf.transpose(-1, -2) / math.sqrt(d) + add
        empty = (add == float("-inf")).all(-1, keepdim=True)  # rows with no allowed key: 0, gradient 0
        ref = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0) @ vf
        dout = torch.randn_like(out)
        ins = [q, k, v] + ([bias] if bias is not None else [])
        got = torch.autograd.grad(out, ins, dout)
        want = torch.autograd.grad(ref, ins, dout.float())
        errs = [((out.float() - ref).norm() / ref.norm()).item()]
        errs += [((a.float() - w_.float()).norm() / w_.float().norm()).item() for a, w_ in zip(got, want)]
        nan = any(torch.isnan(t).any().item() for t in (out, *got))
        tol = 2e-2 if dt != torch.float32 else 5e-3
        ok = not nan and all(e < tol for e in errs)  # a NaN error fails too
        results.append(dict(case=f"{b}x{h}/{hkv}x{n}x{d} {str(dt)[6:]} bias={c['bias']} causal={c['causal']}"
                                 + (f" global={c['glob']} split={split}" if "glob" in c else ""),
                            errs=" ".join(f"{e:.1e}" for e in errs), ok=ok))
        print(results[-1], flush=True)
        del q, k, v, s, ref, got, want
        torch.cuda.empty_cache()
    return results


def sweep(shape, density, block=BLOCK, fwd_configs=(), bwd_configs=()):
    """Launch configs tried in turn, each as the only plan of its kernel (bwd: the same config for the
    dq and the dk/dv kernel; rows are each kernel's own: query rows for dq, kv rows for dk/dv)."""
    from fxsparse import KernelOptions, LaunchConfig

    b, h, n, d = shape
    dev = "cuda"
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    w = 0 if MASK_MOD is not None else window_for(n, density)
    layout = Layout.from_mask(window_mask(n, w, dev), block_size=block)
    dout = torch.randn_like(q)
    rows = []
    useful = 4 * b * h * n * n * d * layout.density
    spin()
    base = OPTIONS.get("options", KernelOptions())
    for kernel, configs in (("fwd", fwd_configs), ("fwd+bwd", bwd_configs)):
        for cfg in configs:
            config = LaunchConfig(*(int(x) for x in cfg.split(",")))
            if kernel == "fwd":
                opts = dataclasses.replace(base, forward_config=config)
                run, grad = (lambda: fxsparse.sparse_attention(q, k, v, layout, options=opts)), False
            else:
                opts = dataclasses.replace(base, dq_config=config, dkdv_config=config)
                run, grad = (lambda: fxsparse.sparse_attention(q, k, v, layout, options=opts).backward(dout)), True
            try:
                with torch.set_grad_enabled(grad):
                    ms = bench(graphed(run, grad=grad))
            except Exception as e:  # a config that does not fit this GPU's shared memory
                print(cfg, type(e).__name__, str(e)[:120])
                continue
            flops = useful * (3.5 if grad else 1.0)
            rows.append(dict(shape=str(shape), block=block, density=round(layout.density, 3), kernel=kernel,
                             config=cfg, ms=round(ms, 4), useful_tflops=round(flops / ms / 1e9, 1)))
            print(rows[-1], flush=True)
    return rows


def parse_shapes(spec: str):
    """"all", indices into SHAPES ("0,3") or shapes ("8x16x4096x64,4x16x16384x128")."""
    if spec == "all":
        return SHAPES
    return [tuple(int(x) for x in s.split("x")) if "x" in s else SHAPES[int(s)] for s in spec.split(",")]


def main():
    from tabulate import tabulate

    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--table", action="store_true")
    p.add_argument("--sweep-points", default="0:0.10:128;0:1.0:128;2:0.10:128",
                   help="shape (index or BxHxNxD):density:block size; ... (launch configs from --fwd-configs / "
                        "--bwd-configs)")
    p.add_argument("--fwd-configs", default="128,128,8,3;64,64,4,3;64,64,4,4;64,64,4,2;64,32,4,3;128,64,4,3;64,128,4,2",
                   help="forward LaunchConfigs rows,cols,warps,stages; ... ('' for none)")
    p.add_argument("--bwd-configs", default="64,64,4,3;64,64,4,4;64,32,4,3;32,64,4,3;64,64,8,3;128,64,8,3",
                   help="backward LaunchConfigs (dq and dk/dv alike) rows,cols,warps,stages; ... ('' for none)")
    p.add_argument("--options", default="", help="a KernelOptions as JSON, for every fxsparse call")
    p.add_argument("--shapes", default="all", help="indices into SHAPES (0,3) or shapes (8x16x4096x64,...)")
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--methods", default="fxsparse,flex,sdpa-dense,sdpa-mask",
                   help="also: fxsparse-graph, flex-graph (the same calls replayed from a CUDA graph: GPU time "
                        "without host overhead; forward+backward replays accumulate the gradients)")
    p.add_argument("--block-sizes", default=str(BLOCK),
                   help="fxsparse layouts of these block sizes, e.g. 128,64 (the first is 'fxsparse', the others "
                        "'fxsparse-bNN'); at head dims <= 64 the kernels walk 64-blocks anyway unless the options "
                        "say refine=false")
    p.add_argument("--repeats", type=int, default=1, help="measure each method this many times, in turns; report the median")
    p.add_argument("--causal-window", type=int, default=None,
                   help="every mask is the causal sliding window 0 <= i - j <= W (a causal LM's), for the table, "
                        "the sweep and the check")
    p.add_argument("--local-2d", default=None, metavar="G,W,P",
                   help="every mask is a ViT's local 2-D window: a G x G grid, window W, P prefix tokens (the "
                        "shapes' N must be G * G + P)")
    p.add_argument("--prefix-queries", choices=("global", "local"), default="global",
                   help="with --local-2d: the prefix tokens see every key (global) or only the prefix (local)")
    p.add_argument("--out", default="benchmarks/out")
    a = p.parse_args()
    global CAUSAL_WINDOW, MASK_MOD
    CAUSAL_WINDOW = a.causal_window
    if a.causal_window is not None:
        MASK_MOD = causal_window_mod(a.causal_window)
    elif a.local_2d:
        g, w, pre = (int(x) for x in a.local_2d.split(","))
        MASK_MOD = local_2d_mod(g, w, pre, a.prefix_queries == "global")
    shapes = parse_shapes(a.shapes)
    if a.options:
        from fxsparse.options import decode

        OPTIONS["options"] = decode(a.options)
    os.makedirs(a.out, exist_ok=True)
    import triton

    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               fxsparse=os.path.dirname(fxsparse.__file__), options=a.options)
    print(env)
    result = dict(env=env)
    if a.check:
        res = check(shapes)
        result["check"] = res
        print(tabulate(res, headers="keys"))
        if not all(r["ok"] for r in res):
            print("CHECK FAILED")
    if a.sweep:
        points = [p.split(":") for p in a.sweep_points.split(";")]  # shape index : density : block
        fwd, bwd = ([c for c in cs.split(";") if c] for cs in (a.fwd_configs, a.bwd_configs))
        res = [r for i, dens, bs in points for r in sweep(parse_shapes(i)[0], float(dens), int(bs), fwd, bwd)]
        result["sweep"] = res
        print(tabulate(res, headers="keys"))
    if a.table or not (a.check or a.sweep):
        def progress(rows):  # each shape's rows reach the JSON as soon as they exist
            with open(os.path.join(a.out, "attention.json"), "w") as f:
                json.dump(dict(result, table=rows), f, indent=1)

        res = run_table(shapes, [float(x) for x in a.densities.split(",")], a.modes.split(","),
                        a.methods.split(","), [int(x) for x in a.block_sizes.split(",")], progress, a.repeats)
        result["table"] = res
        print(tabulate(res, headers="keys"))
    with open(os.path.join(a.out, "attention.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
