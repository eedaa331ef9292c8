"""KernelOptions: how the Triton kernels are launched, passed per call instead of read from the environment.

The defaults are what the kernels run best with on the GPUs measured (docs/performance.md); the
fields exist to compare alternatives in benchmarks and to pin a choice on a GPU that differs. None
of them changes the result beyond floating-point rounding.

Through the op (``torch.ops.fxsparse.sparse_attention``) the options travel as a short string
(`encode` / `decode`), so torch.compile and torch.export record them as a constant of the graph.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Optional

from .kernels.configs import LaunchConfig


@dataclass(frozen=True)
class KernelOptions:
    """Launch options of fxsparse's Triton kernels (CUDA, or CPU through ``TRITON_INTERPRET=1``).

    Pass one to ``fxsparse.sparse_attention(..., options=)``; ``transform`` and ``backend`` pass theirs
    to every rewritten site. Unset fields keep the tuned defaults.

    forward_config, dq_config, dkdv_config: a `LaunchConfig` that becomes that kernel's first launch
        plan (rows, cols, warps, stages), instead of the per-GPU default. The forward's replaces its
        plans entirely; the backward's kernels keep a small fallback that fits any GPU.
    forward_look_ahead, dq_look_ahead, dkdv_look_ahead: the largest padded head dim (the wider of
        q/k's and v's where v has its own) at which that kernel reads the next full block's index
        one tile ahead (a load whose address waits on another load costs a pipeline stage); 0 =
        never. Defaults 128, 64, 64: in the backward the extra registers at D = 128 cost more than
        the stage saves.
    forward_descriptors, backward_descriptors: read the streamed tiles (K and V in the forward and
        dq kernels, q and the output's gradient in dk/dv) through tensor descriptors (TMA, Hopper
        and newer): True = wherever the tensors allow it, False = never, None = at head dim 128
        only (q/k's and v's both), where it pays. Tensors that do not allow it (fp32, padded head
        dims, unaligned or broadcast strides) always use pointer loads.
    forward_fold, backward_fold: fold the scores' scale and the row shift into one multiply-add in
        tiles that need no mask (False: two operations; for comparison).
    forward_max_registers, dkdv_max_registers: cap that kernel's registers per thread (triton's
        ``maxnreg``); None = the compiler's choice.
    fast_launch: after the first launch with given shapes, strides and dtypes, call the compiled
        kernel directly instead of through triton's argument binding (False: always through triton).
    refine: at head dims up to 64 (q/k's and v's), walk a coarser layout in 64-token blocks
        (``Layout.refine(64)``), so element masks apply only where they cut (False: walk the layout
        as given).
    split: walk a block whose visit list is far longer than the mean (``Layout.split``: a global
        token's query row in the forward and dq kernels, its key column in the dk/dv kernel) with
        several programs and merge their results (False: one program per block, for comparison).
    """

    forward_config: Optional[LaunchConfig] = None
    dq_config: Optional[LaunchConfig] = None
    dkdv_config: Optional[LaunchConfig] = None
    forward_look_ahead: int = 128
    dq_look_ahead: int = 64
    dkdv_look_ahead: int = 64
    forward_descriptors: Optional[bool] = None
    backward_descriptors: Optional[bool] = None
    forward_fold: bool = True
    backward_fold: bool = True
    forward_max_registers: Optional[int] = None
    dkdv_max_registers: Optional[int] = None
    fast_launch: bool = True
    refine: bool = True
    split: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_config"):
                ok = value is None or isinstance(value, LaunchConfig)
                want = "a fxsparse.LaunchConfig or None"
            elif f.name.endswith("_look_ahead"):
                ok = type(value) is int and value >= 0
                want = "an int >= 0 (a padded head dim; 0 = never)"
            elif f.name.endswith("_descriptors"):
                ok = value is None or type(value) is bool
                want = "True, False or None (head dim 128 only)"
            elif f.name.endswith("_max_registers"):
                ok = value is None or (type(value) is int and 24 <= value <= 255)
                want = "None or an int from 24 to 255"
            else:
                ok = type(value) is bool
                want = "a bool"
            if not ok:
                raise ValueError(f"KernelOptions.{f.name} must be {want}, got {value!r}")


DEFAULT = KernelOptions()


def encode(options: Optional[KernelOptions]) -> str:
    """The options as the op's string argument: "" for the defaults, else JSON of the fields set."""
    if options is None or options == DEFAULT:
        return ""
    if not isinstance(options, KernelOptions):
        raise TypeError(f"options must be a fxsparse.KernelOptions or None, got {type(options).__name__}")
    return _encode(options)


@functools.lru_cache(maxsize=256)
def _encode(options: KernelOptions) -> str:
    changed = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if value != f.default:
            changed[f.name] = dataclasses.astuple(value) if isinstance(value, LaunchConfig) else value
    return json.dumps(changed, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def decode(text: str) -> KernelOptions:
    """The options `encode` wrote (cached: a call with the same string costs a dict lookup)."""
    if not text:
        return DEFAULT
    fields = json.loads(text)
    for name, value in fields.items():
        if name.endswith("_config") and value is not None:
            fields[name] = LaunchConfig(*value)
    return KernelOptions(**fields)
