"""Cost of the FX pass: ``fxsparse.transform`` vs a bare ``torch.fx.symbolic_trace`` of a ViT-L/16.

Target: at 24 layers the transform costs at most 3x the bare trace, and it grows linearly with
depth. Model construction is outside both measurements; each is the best of a few repeats.

    .venv/bin/python benchmarks/transform.py [--repeats 3] [--depths 12 24 48]

Prints a table; the raw numbers go to benchmarks/out/transform.json (ignored by git).
"""
import argparse
import gc
import json
import os
import time

import timm
import torch
from tabulate import tabulate
from torch import fx

import fxsparse
from fxsparse import patterns

VIT_L = dict(img_size=224, patch_size=16, embed_dim=1024, num_heads=16, mlp_ratio=4.,
             class_token=True, global_pool="token")


def vit_l(depth):
    # weight_init="skip": PyTorch's default init; the weights are random either way and the
    # pass never looks at them, and timm's trunc-normal init of 48 layers takes long.
    return timm.models.vision_transformer.VisionTransformer(
        depth=depth, weight_init="skip", **VIT_L).eval()


def bare_trace():
    """Plain torch.fx.symbolic_trace; a tracer with timm's fx hints when the plain one fails."""
    try:
        fx.symbolic_trace(vit_l(1))
        return "torch.fx.symbolic_trace", fx.symbolic_trace
    except Exception:  # noqa: BLE001
        from timm.layers import _fx as timm_fx

        leaves = tuple(timm_fx.get_notrace_modules())

        class TimmTracer(fx.Tracer):
            def is_leaf_module(self, m, qualname):
                return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

        def trace(model):
            tracer = TimmTracer(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
            return fx.GraphModule(model, tracer.trace(model))
        return "fx.Tracer with timm's no-trace modules/functions", trace


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    trace_name, trace = bare_trace()
    mask_fn = patterns.only(patterns.union(patterns.local_2d(window=2, prefix_tokens=1),
                                           patterns.global_tokens(1)), layers=range(6))
    rows = []
    with torch.no_grad():
        for depth in args.depths:
            model = vit_l(depth)                              # built once, outside the timings
            t_trace = best_of(lambda: trace(model), args.repeats)
            t_xf = best_of(lambda: fxsparse.transform(model, mask_fn), args.repeats)
            sites = len(fxsparse.report(fxsparse.transform(model, mask_fn)).rows)
            assert sites == depth, f"found {sites} attentions in a {depth}-layer ViT"
            rows.append([depth, t_trace, t_xf, t_xf / t_trace, t_xf / depth * 1e3])

    print(f"ViT-L/16 (embed 1024, 16 heads, 224px), CPU, {torch.get_num_threads()} threads; "
          f"bare trace = {trace_name}; fxsparse.transform without example_inputs; "
          f"best of {args.repeats}")
    print(tabulate(rows, headers=["depth", "trace s", "transform s", "ratio", "transform ms/layer"],
                   floatfmt=("d", ".3f", ".3f", ".2f", ".1f")))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "transform.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), bare_trace=trace_name,
                       rows=[dict(zip(("depth", "trace_s", "transform_s", "ratio", "transform_ms_per_layer"), r))
                             for r in rows]), f, indent=1)
    ratio24 = {r[0]: r[3] for r in rows}.get(24)
    if ratio24 is not None:
        print(f"target ratio <= 3 at depth 24: {'met' if ratio24 <= 3 else 'NOT met'} "
              f"({ratio24:.2f})")


if __name__ == "__main__":
    main()
