"""The kernels' launch path: after a first launch through triton, calls with the same key go straight to
the compiled kernel's launcher, with the arguments in triton's order; anything triton specialises on
(an int's value, a tensor's dtype or 16-byte alignment, a constexpr, warps, stages) leads through
triton again. A stand-in kernel records what each path received (no GPU needed)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import triton

from fxsparse.kernels import attention as kernels


class _Compiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "function", "metadata"

    def run(self, *args):
        self.log.append(("direct", args))


class _Kernel:
    """Parameters X, n, scale, then the constexprs A and B (as a triton kernel lists them)."""
    arg_names = ["X", "n", "scale", "A", "B"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages, **consts):
            self.log.append(("triton", grid, args, consts, num_warps, num_stages))
            return _Compiled(self.log)
        return launch


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(kernels, "_FAST_LAUNCH", True)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_current_stream", lambda device: 99)
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_FAST_LAUNCH", None)
    return _Kernel()


def _paths(kernel):
    return [entry[0] for entry in kernel.log]


def test_second_launch_goes_straight_to_the_compiled_kernel(fast):
    x = torch.zeros(64)
    kernels._launch(fast, (3, 5), (x,), (7, 0.5), dict(B=2, A=1), 4, 3)
    kernels._launch(fast, (3, 5), (x,), (7, 0.25), dict(B=2, A=1), 4, 3)
    kernels._launch(fast, (3, 5), (x,), (7, 0.25), dict(B=2, A=1), 4, 3)
    # a float is not specialised on by triton: a new scale costs one more launch through it, no compile
    assert _paths(fast) == ["triton", "triton", "direct"]
    assert fast.log[0][1:] == ((3, 5), (x, 7, 0.5), dict(B=2, A=1), 4, 3)
    # grid, stream, function, metadata, no launch metadata or hooks, then every parameter in the
    # kernel's order: the constexprs too, whatever order the call named them in
    args = fast.log[2][1]
    assert args[:9] == (3, 5, 1, 99, "function", "metadata", None, None, None)
    assert args[9] is x and args[10:] == (7, 0.25, 1, 2)


@pytest.mark.parametrize("change", ["int", "alignment", "dtype", "constexpr", "warps", "stages"])
def test_whatever_triton_specialises_on_launches_through_triton(fast, change):
    x = torch.zeros(64)
    ptrs, scalars, consts, warps, stages = (x,), (32, 0.5), dict(A=1, B=2), 4, 3
    kernels._launch(fast, (1, 1), ptrs, scalars, consts, warps, stages)
    if change == "int":
        scalars = (33, 0.5)
    elif change == "alignment":
        ptrs = (x[1:],)  # 4 bytes in: no longer 16-byte aligned
    elif change == "dtype":
        ptrs = (x.to(torch.float16),)
    elif change == "constexpr":
        consts = dict(A=1, B=3)
    elif change == "warps":
        warps = 8
    else:
        stages = 2
    kernels._launch(fast, (1, 1), ptrs, scalars, consts, warps, stages)
    kernels._launch(fast, (1, 1), ptrs, scalars, consts, warps, stages)
    assert _paths(fast) == ["triton", "triton", "direct"]


def test_knob_and_launch_hooks_send_every_call_through_triton(fast, monkeypatch):
    x = torch.zeros(64)
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_FAST_LAUNCH", "0")
    for _ in range(2):
        kernels._launch(fast, (1, 1), (x,), (1, 0.5), dict(A=1, B=2), 4, 3)
    assert _paths(fast) == ["triton", "triton"]
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_FAST_LAUNCH", None)
    for _ in range(2):
        kernels._launch(fast, (1, 1), (x,), (1, 0.5), dict(A=1, B=2), 4, 3)
    assert _paths(fast) == ["triton", "triton", "triton", "direct"]

    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda metadata: None)
    kernels._launch(fast, (1, 1), (x,), (1, 0.5), dict(A=1, B=2), 4, 3)
    assert _paths(fast)[-1] == "triton"


def test_launches_move_to_the_tensors_gpu(monkeypatch):
    """Triton launches on the current device; a model on another GPU gets that GPU made current."""
    monkeypatch.setattr(kernels, "_current_device", lambda: 0)

    class OnGpu:  # a stand-in tensor, as the guard reads only .device
        def __init__(self, index):
            self.device = torch.device("cuda", index)

    guard = kernels._on_device(OnGpu(1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(kernels._on_device(OnGpu(0)), contextlib.nullcontext)
    assert isinstance(kernels._on_device(torch.zeros(1)), contextlib.nullcontext)  # CPU, interpreter


def test_backward_config_knob_sets_each_kernel(monkeypatch):
    """FXSPARSE_BWD_CONFIG: tiles, then warps and stages of dk/dv, optionally the dq kernel's own."""
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_BWD_CONFIG", "64,32,64,16,8,3")
    assert kernels._bwd_config(64, 64, torch.bfloat16) == (64, 32, 64, 16, (8, 3), (8, 3))
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_BWD_CONFIG", "64,32,64,16,8,3,4,2")
    assert kernels._bwd_config(64, 64, torch.bfloat16) == (64, 32, 64, 16, (8, 3), (4, 2))
    assert kernels._bwd_config(32, 64, torch.bfloat16)[:4] == (32, 32, 32, 16)  # tiles never exceed a block
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_BWD_CONFIG", "64,32,64,16,8,3,4")
    with pytest.raises(ValueError, match="FXSPARSE_BWD_CONFIG"):
        kernels._bwd_config(64, 64, torch.bfloat16)


def _launch_consts(monkeypatch, d, scale, bias=False):
    """The constexprs of the forward and of the backward's kernels for one small problem (launches
    recorded, not run)."""
    from fxsparse import Layout
    from fxsparse.op import kernel_layout

    seen = {}
    monkeypatch.setattr(kernels, "_launch", lambda kernel, grid, ptrs, scalars, consts, *ws: seen.update(
        {kernel.fn.__name__: consts}))
    q, k, v, out = (torch.zeros(1, 2, 64, d) for _ in range(4))
    i = torch.arange(64)
    layout = kernel_layout(Layout.from_mask((i[:, None] - i[None, :]).abs() <= 8, block_size=32), d)
    tables = (layout.data, layout.batch, layout.num_heads)
    b = torch.zeros(1, 2, 64, 64) if bias else None
    lse = kernels.forward(q, k, v, tables, b, scale, 32, False, out)
    kernels.backward(torch.zeros_like(q), q, k, v, out, lse, tables, b, scale, 32, False, False)
    return seen


def test_look_ahead_and_folds_follow_the_problem_and_knobs(monkeypatch):
    """The forward reads block indices ahead at padded head dims up to 128, the backward's kernels up
    to 64 (FXSPARSE_FWD/DQ/DKDV_LOOK_AHEAD move those); the forward folds the scale into one
    multiply-add only for scale > 0; the backward folds the row's max and log-sum into it only
    without a bias (FXSPARSE_FOLD / FXSPARSE_BWD_FOLD = 0 off)."""
    for name in ("FXSPARSE_FWD_LOOK_AHEAD", "FXSPARSE_DQ_LOOK_AHEAD", "FXSPARSE_DKDV_LOOK_AHEAD",
                 "FXSPARSE_FOLD", "FXSPARSE_BWD_FOLD"):
        monkeypatch.setitem(kernels.KNOBS, name, None)
    c = _launch_consts(monkeypatch, 64, 0.125)
    assert all(c[k]["LOOK_AHEAD"] for k in ("_fwd_kernel", "_dq_kernel", "_dkdv_kernel"))
    assert c["_fwd_kernel"]["FOLD"] and c["_dq_kernel"]["FOLD"] and c["_dkdv_kernel"]["FOLD"]
    c = _launch_consts(monkeypatch, 96, -0.125, bias=True)
    assert c["_fwd_kernel"]["LOOK_AHEAD"] and not c["_dq_kernel"]["LOOK_AHEAD"] and not c["_dkdv_kernel"]["LOOK_AHEAD"]
    assert not c["_fwd_kernel"]["FOLD"] and not c["_dq_kernel"]["FOLD"] and not c["_dkdv_kernel"]["FOLD"]
    c = _launch_consts(monkeypatch, 192, 0.125)
    assert not any(c[k]["LOOK_AHEAD"] for k in ("_fwd_kernel", "_dq_kernel", "_dkdv_kernel"))
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_FWD_LOOK_AHEAD", "64")
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_DQ_LOOK_AHEAD", "128")
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_FOLD", "0")
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_BWD_FOLD", "0")
    c = _launch_consts(monkeypatch, 96, 0.125)
    assert not c["_fwd_kernel"]["LOOK_AHEAD"] and c["_dq_kernel"]["LOOK_AHEAD"] and not c["_dkdv_kernel"]["LOOK_AHEAD"]
    assert not c["_fwd_kernel"]["FOLD"] and not c["_dq_kernel"]["FOLD"] and not c["_dkdv_kernel"]["FOLD"]


def test_a_plan_that_does_not_fit_the_gpu_gives_way_to_the_next(monkeypatch):
    """Triton refuses a kernel that asks for more shared memory than the GPU has (the D = 128
    forward's look-ahead needs 229376 B: an H100 or H200, not an A100); the launch then takes the
    next plan, and later calls of that problem start there."""
    monkeypatch.setattr(kernels, "_FITTED", {})
    limit = 2  # this stand-in GPU fits plans up to 2
    tried = []

    def launch(plan):
        tried.append(plan)
        if plan > limit:
            raise triton.runtime.errors.OutOfResources(plan, limit, "shared memory")

    kernels._launch_fitting(("k", "p"), lambda: [4, 3, 2, 1], launch)
    assert tried == [4, 3, 2]
    tried.clear()
    kernels._launch_fitting(("k", "p"), lambda: [4, 3, 2, 1], launch)
    assert tried == [2]  # straight to the plan that fitted
    tried.clear()
    kernels._launch_fitting(("k", "other"), lambda: [2, 1], launch)  # each key on its own
    assert tried == [2]
    limit = 0
    with pytest.raises(RuntimeError, match="no launch plan of k fits this GPU"):
        kernels._launch_fitting(("k", "none"), lambda: [2, 1], launch)


def test_tensor_descriptors_only_where_they_fit_and_pay(monkeypatch):
    """K and V go through tensor descriptors at D = 128 by default (2-byte elements, unit stride along
    the head dim, 16-byte aligned rows); FXSPARSE_TMA=1 allows any unpadded head dim, 0 none; the
    backward's FXSPARSE_BWD_TMA likewise."""
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_TMA", None)
    use = kernels._use_descriptors

    def kv(d, dtype=torch.bfloat16):
        return [torch.zeros(1, 2, 16, d, dtype=dtype) for _ in range(2)]

    assert use(128, 128, *kv(128))
    assert not use(64, 64, *kv(64))  # slower there (RESULTS.md, v10)
    assert not use(128, 128, *kv(128, torch.float32))
    k, v = kv(128)
    assert not use(128, 128, k.transpose(-1, -2).contiguous().transpose(-1, -2), v)  # head dim not unit stride
    rows = torch.zeros(1, 2, 16, 132, dtype=torch.bfloat16)[..., :128]  # 264-byte rows: not 16-byte aligned
    assert not use(128, 128, rows, v)
    assert not use(128, 128, torch.zeros(1, 1, 16, 128, dtype=torch.bfloat16).expand(1, 2, 16, 128), v)  # stride 0
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_TMA", "1")
    assert use(64, 64, *kv(64)) and not use(80, 128, *kv(80))  # a padded head dim never
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_TMA", "0")
    assert not use(128, 128, *kv(128))
    # the backward's choice is its own knob, with the same default
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_BWD_TMA", None)
    assert use(128, 128, *kv(128), "FXSPARSE_BWD_TMA") and not use(64, 64, *kv(64), "FXSPARSE_BWD_TMA")
    monkeypatch.setitem(kernels.KNOBS, "FXSPARSE_BWD_TMA", "0")
    assert not use(128, 128, *kv(128), "FXSPARSE_BWD_TMA")
