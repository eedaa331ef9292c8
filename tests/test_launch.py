"""The kernels' launch path: after a first launch through triton, calls with the same key go straight to
the compiled kernel's launcher, with the arguments in triton's order; anything triton specialises on
(an int's value, a tensor's dtype or 16-byte alignment, a constexpr, warps, stages) leads through
triton again. A stand-in kernel records what each path received (no GPU needed)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import triton

import fxsparse
from fxsparse import KernelOptions, LaunchConfig
from fxsparse.kernels import configs
from fxsparse.kernels import launch as kernels


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


def test_fast_launch_off_and_launch_hooks_send_every_call_through_triton(fast, monkeypatch):
    x = torch.zeros(64)
    for _ in range(2):
        kernels._launch(fast, (1, 1), (x,), (1, 0.5), dict(A=1, B=2), 4, 3, fast=False)  # fast_launch=False
    assert _paths(fast) == ["triton", "triton"]
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

    guard = kernels.launch_device(OnGpu(1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(kernels.launch_device(OnGpu(0)), contextlib.nullcontext)
    assert isinstance(kernels.launch_device(torch.zeros(1)), contextlib.nullcontext)  # CPU, interpreter


def test_configs_from_options_become_each_kernels_first_plan():
    """A LaunchConfig in the options is that kernel's first plan, cut to the layout's block; the
    forward's replaces its plans, the backward's kernels keep a fallback that fits any GPU."""
    opts = KernelOptions(forward_config=LaunchConfig(128, 64, 8, 3), dq_config=LaunchConfig(64, 32, 4, 2),
                         dkdv_config=LaunchConfig(32, 64, 8, 1, look_ahead=False))
    assert configs.forward_plans(64, 64, torch.bfloat16, opts) == [LaunchConfig(64, 64, 8, 3)]
    assert configs.dq_plans(128, 64, torch.bfloat16, opts) == [LaunchConfig(64, 32, 4, 2), LaunchConfig(32, 32, 4, 1, False)]
    assert configs.dkdv_plans(128, 64, torch.bfloat16, opts)[0] == LaunchConfig(32, 64, 8, 1, False)
    # the defaults: per dtype and head dim, the GPU's plans fastest first, the interpreter whole blocks
    default = KernelOptions()
    assert [p.rows for p in configs.forward_plans(128, 128, torch.bfloat16, default)] == [128, 128, 64]
    assert configs.forward_plans(64, 32, torch.float32, default, interpret=True) == [LaunchConfig(64, 64, 4, 1)]
    assert configs.dq_plans(128, 128, torch.float32, default)[0] == LaunchConfig(64, 32, 4, 1, False)


@pytest.mark.parametrize("bad,match", [
    (dict(rows=48, cols=64), "rows must be a positive power of two"),
    (dict(rows=64, cols=16), "cols >= 32"),
    (dict(rows=64, cols=64, num_warps=3), "num_warps"),
    (dict(rows=64, cols=64, num_stages=0), "num_stages"),
])
def test_a_bad_launch_config_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        LaunchConfig(**bad)


@pytest.mark.parametrize("bad,match", [
    (dict(forward_config=(64, 64, 4, 3)), "forward_config must be a fxsparse.LaunchConfig"),
    (dict(dq_look_ahead=-1), "dq_look_ahead must be an int >= 0"),
    (dict(forward_descriptors="auto"), "forward_descriptors must be True, False or None"),
    (dict(dkdv_max_registers=300), "dkdv_max_registers"),
    (dict(fast_launch=0), "fast_launch must be a bool"),
])
def test_bad_options_are_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        KernelOptions(**bad)
    q = torch.zeros(1, 1, 8, 16)
    with pytest.raises(TypeError, match="options must be a fxsparse.KernelOptions"):
        fxsparse.sparse_attention(q, q, q, options=dict(fast_launch=False))


def test_options_travel_through_the_op_as_a_string():
    """The op takes the options as a string (a constant of a traced graph); it reads back equal."""
    from fxsparse.options import decode, encode

    assert encode(None) == encode(KernelOptions()) == ""
    for opts in (KernelOptions(forward_config=LaunchConfig(64, 32, 4, 3, False), refine=False),
                 KernelOptions(backward_descriptors=True, dkdv_max_registers=128, dq_look_ahead=0)):
        assert decode(encode(opts)) == opts


def _launch_consts(monkeypatch, d, scale, bias=False, options=KernelOptions()):
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
    monkeypatch.setattr(kernels, "_FITTED", {})
    lse = kernels.forward(q, k, v, tables, b, scale, 32, False, out, options)
    kernels.backward(torch.zeros_like(q), q, k, v, out, lse, tables, b, scale, 32, False, False, options)
    return seen


def test_look_ahead_and_folds_follow_the_problem_and_options(monkeypatch):
    """The forward reads block indices ahead at padded head dims up to 128, the backward's kernels up
    to 64 (the options' *_look_ahead move those); the forward folds the scale into one multiply-add
    only for scale > 0; the backward folds the row's max and log-sum into it only without a bias
    (forward_fold / backward_fold = False: off)."""
    c = _launch_consts(monkeypatch, 64, 0.125)
    assert all(c[k]["LOOK_AHEAD"] for k in ("forward_kernel", "dq_kernel", "dkdv_kernel"))
    assert c["forward_kernel"]["FOLD"] and c["dq_kernel"]["FOLD"] and c["dkdv_kernel"]["FOLD"]
    c = _launch_consts(monkeypatch, 96, -0.125, bias=True)
    assert c["forward_kernel"]["LOOK_AHEAD"] and not c["dq_kernel"]["LOOK_AHEAD"] and not c["dkdv_kernel"]["LOOK_AHEAD"]
    assert not c["forward_kernel"]["FOLD"] and not c["dq_kernel"]["FOLD"] and not c["dkdv_kernel"]["FOLD"]
    c = _launch_consts(monkeypatch, 192, 0.125)
    assert not any(c[k]["LOOK_AHEAD"] for k in ("forward_kernel", "dq_kernel", "dkdv_kernel"))
    opts = KernelOptions(forward_look_ahead=64, dq_look_ahead=128, forward_fold=False, backward_fold=False)
    c = _launch_consts(monkeypatch, 96, 0.125, options=opts)
    assert not c["forward_kernel"]["LOOK_AHEAD"] and c["dq_kernel"]["LOOK_AHEAD"] and not c["dkdv_kernel"]["LOOK_AHEAD"]
    assert not c["forward_kernel"]["FOLD"] and not c["dq_kernel"]["FOLD"] and not c["dkdv_kernel"]["FOLD"]


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


def test_tensor_descriptors_only_where_they_fit_and_pay():
    """K and V go through tensor descriptors at D = 128 by default (2-byte elements, unit stride along
    the head dim, 16-byte aligned rows); True allows any unpadded head dim, False none."""
    def use(d, d_pad, a, b, setting=None):  # d, d_pad: what the tensors' head dim is and pads to
        assert a.shape[-1] == d
        return kernels._use_descriptors(a, b, setting)

    def kv(d, dtype=torch.bfloat16):
        return [torch.zeros(1, 2, 16, d, dtype=dtype) for _ in range(2)]

    assert use(128, 128, *kv(128))
    assert not use(64, 64, *kv(64))  # slower there (docs/performance.md)
    assert not use(128, 128, *kv(128, torch.float32))
    k, v = kv(128)
    assert not use(128, 128, k.transpose(-1, -2).contiguous().transpose(-1, -2), v)  # head dim not unit stride
    rows = torch.zeros(1, 2, 16, 132, dtype=torch.bfloat16)[..., :128]  # 264-byte rows: not 16-byte aligned
    assert not use(128, 128, rows, v)
    assert not use(128, 128, torch.zeros(1, 1, 16, 128, dtype=torch.bfloat16).expand(1, 2, 16, 128), v)  # stride 0
    assert use(64, 64, *kv(64), True) and not use(80, 128, *kv(80), True)  # a padded head dim never
    assert not use(128, 128, *kv(128), False)


def test_options_reach_every_launch_through_the_op(monkeypatch):
    """sparse_attention(..., options=) reaches the three kernels' launches, eager and through the
    custom op: their configs, register caps, fast-launch switch, and the refinement of the layout.
    Launches are recorded, not run."""
    import fxsparse.op as op
    from fxsparse import Layout

    seen = {}

    def record(kernel, grid, ptrs, scalars, consts, warps, stages, maxnreg=None, fast=True):
        seen[kernel.fn.__name__] = dict(consts, warps=warps, stages=stages, maxnreg=maxnreg, fast=fast)

    monkeypatch.setattr(op, "_use_triton", lambda q: True)
    monkeypatch.setattr(kernels, "_launch", record)
    monkeypatch.setattr(kernels, "_FITTED", {})
    i = torch.arange(256)
    layout = Layout.from_mask((i[:, None] - i[None, :]).abs() <= 40, block_size=128)
    q, k, v = (torch.zeros(1, 2, 256, 64, requires_grad=True) for _ in range(3))
    opts = KernelOptions(forward_config=LaunchConfig(32, 64, 2, 1), dq_config=LaunchConfig(64, 32, 8, 2),
                         dkdv_config=LaunchConfig(32, 32, 4, 4), dkdv_max_registers=96, fast_launch=False)
    for through_op in (False, True):
        seen.clear()
        monkeypatch.setattr(op, "_plain_eager", lambda tensors, eager=not through_op: eager)
        fxsparse.sparse_attention(q, k, v, layout, options=opts).sum().backward()
        f, dq, dkdv = seen["forward_kernel"], seen["dq_kernel"], seen["dkdv_kernel"]
        assert (f["BLOCK_M"], f["BLOCK_N"], f["warps"], f["stages"]) == (32, 64, 2, 1)
        assert (dq["BLOCK_M"], dq["BLOCK_N"], dq["warps"], dq["stages"], dq["maxnreg"]) == (64, 32, 8, 2, None)
        assert (dkdv["BLOCK_N"], dkdv["BLOCK_M"], dkdv["stages"], dkdv["maxnreg"]) == (32, 32, 4, 96)
        assert not any(s["fast"] for s in seen.values())
        assert f["BLOCK"] == 64  # D = 64: the 128-block layout is walked refined to 64
    seen.clear()
    monkeypatch.setattr(op, "_plain_eager", lambda tensors: True)
    fxsparse.sparse_attention(q, k, v, layout, options=KernelOptions(refine=False))
    assert seen["forward_kernel"]["BLOCK"] == 128 and seen["forward_kernel"]["fast"]


def test_the_package_reads_no_fxsparse_environment_variables():
    """Launch choices are KernelOptions passed per call; no module reads an FXSPARSE_* variable."""
    import pathlib

    root = pathlib.Path(fxsparse.__file__).parent
    readers = [str(p.relative_to(root)) for p in root.rglob("*.py") if "FXSPARSE_" in p.read_text()]
    assert readers == []
