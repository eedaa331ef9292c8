"""Registers, spills and shared memory of the kernels for an H100/H200 (sm_90), compiled on a machine
with no GPU: triton's own ptxas and cuobjdump, no device time.

    python benchmarks/kernel_resources.py                          # default configs, two shapes
    python benchmarks/kernel_resources.py 1,16,32768,128,1664 --bwd "64,64,64,64,4,3;32,64,64,32,4,3"
    python benchmarks/kernel_resources.py 8,12,4096,64,128 --fwd "64,64,4,3;64,64,4,2"

Shapes are B,H,N,D,window (a local window |i - j| <= window, 128-block layout, bf16). The kernels
are compiled exactly as a launch of that problem would compile them (the op's own forward and
backward run with the launch intercepted). Uses the triton installed here, which may be newer than
the GPU machine's: at 8x12x4096x64, triton 3.8 here gave 128 / 162 / 230 registers (forward, dq,
dk/dv) where ncu read 123 / 165 / 230 under triton 3.6 on the H200. STACK > 0 means spills.
MAXNREG=n in the environment compiles with the registers capped at n (triton's maxnreg).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget


class _Sm90:
    """Stands in for the CUDA driver: triton asks it what to compile for."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _usage(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    fields = dict(item.split(":") for line in out.splitlines() if "REG:" in line for item in line.split())
    return f"registers {fields['REG']:>3}  stack {fields['STACK']:>3}  shared {compiled.metadata.shared:>6} B"


def _maxnreg(launched) -> dict:
    """The register cap a launch asked for (the op's knobs), or MAXNREG from the environment."""
    cap = int(os.environ.get("MAXNREG") or 0) or (launched[0] if launched else 0)
    return {"maxnreg": cap} if cap else {}


def launches(spec: str):
    """The (kernel, grid, ptrs, scalars, constexprs, warps, stages) of one forward and backward."""
    from fxsparse import Layout
    from fxsparse.kernels import attention as kernels
    from fxsparse.op import kernel_layout

    b, h, n, d, w = (int(x) for x in spec.split(","))
    q, k, v, out = (torch.empty(b, h, n, d, dtype=torch.bfloat16) for _ in range(4))
    i = torch.arange(n)
    layout = kernel_layout(Layout.from_mask((i[:, None] - i[None, :]).abs() <= w, block_size=128), d)
    tables = (layout.data, layout.batch, layout.num_heads)
    seen = []
    launch, kernels._launch = kernels._launch, lambda *a: seen.append(a)
    try:
        lse = kernels.forward(q, k, v, tables, None, d ** -0.5, layout.block_size, False, out)
        kernels.backward(torch.empty_like(q), q, k, v, out, lse, tables, None, d ** -0.5, layout.block_size,
                         False, False)
    finally:
        kernels._launch = launch
    return seen


def main():
    p = argparse.ArgumentParser()
    p.add_argument("shapes", nargs="*", default=["8,12,4096,64,128", "1,16,32768,128,1664"])
    p.add_argument("--fwd", default="", help="forward configs m,n,warps,stages; ... (default: the op's)")
    p.add_argument("--bwd", default="", help="backward configs n1,m1,m2,n2,warps,stages; ... (default: the op's)")
    a = p.parse_args()
    triton.runtime.driver.set_active(_Sm90())
    from fxsparse.kernels import attention as kernels

    runs = [("fwd", c) for c in a.fwd.split(";") if c] + [("bwd", c) for c in a.bwd.split(";") if c]
    for spec in a.shapes:
        for which, cfg in runs or [("all", "")]:
            kernels.KNOBS["FXSPARSE_FWD_CONFIG"] = cfg if which == "fwd" else None
            kernels.KNOBS["FXSPARSE_BWD_CONFIG"] = cfg if which == "bwd" else None
            for kernel, grid, ptrs, scalars, consts, warps, stages, *maxnreg in launches(spec):
                name = kernel.fn.__name__
                if which != "all" and (name == "_fwd_kernel") != (which == "fwd"):
                    continue  # only the kernels whose config was asked for
                try:
                    compiled = kernel.warmup(*[t.dtype if isinstance(t, torch.Tensor) else t for t in ptrs], *scalars, grid=grid, **consts,
                                             num_warps=warps, num_stages=stages, **_maxnreg(maxnreg))
                    usage = _usage(compiled)
                except Exception as e:  # e.g. out of shared memory
                    usage = f"{type(e).__name__}: {str(e)[:80]}"
                print(f"{spec:22s} {name:13s} {cfg or 'default':20s} warps {warps} stages {stages}  {usage}", flush=True)

if __name__ == "__main__":
    sys.exit(main())
