"""Whether a launch plan gives way when its kernel does not fit the GPU's shared memory (GPU only).

    PYTHONPATH=. python benchmarks/fit_probe.py

Puts a plan of 6 pipeline stages (more shared memory than any GPU has at D = 128) before the
forward's own plans: the call must fall back to the next plan and give the same output as the
default; with that plan alone, the call must fail with fxsparse's error naming the kernel.
"""
from __future__ import annotations

import torch

import fxsparse
from fxsparse.kernels import attention as kernels


def main():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    i = torch.arange(1000, device="cuda")
    mask = (i[:, None] - i[None, :]).abs() <= 200
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    default = fxsparse.sparse_attention(q, k, v, mask)
    plans = kernels._fwd_plans
    too_big = (128, 128, 8, 6, True)
    try:
        kernels._FITTED.clear()
        kernels._fwd_plans = lambda *a: [too_big] + plans(*a)
        got = fxsparse.sparse_attention(q, k, v, mask)
        fitted = [p for key, p in kernels._FITTED.items() if key[0] == "_fwd_kernel"]
        print("fallback plan:", fitted, "max error", (got.float() - want).abs().max().item(),
              "same as default", torch.equal(got, default))
        kernels._FITTED.clear()
        kernels._fwd_plans = lambda *a: [too_big]
        try:
            fxsparse.sparse_attention(q, k, v, mask)
            print("error: none raised")
        except RuntimeError as e:
            print("error:", str(e)[:300])
    finally:
        kernels._fwd_plans = plans
        kernels._FITTED.clear()


if __name__ == "__main__":
    main()
