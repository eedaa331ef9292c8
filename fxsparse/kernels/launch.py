"""Host side of the kernels: `forward` and `backward` (what the op calls), launch plans that give way
when shared memory does not fit, the fast-launch cache, tensor descriptors and the device guard.

The layout's tables arrive as one flat int32 tensor plus the offsets of the ones a kernel walks.
Offsets of whole (batch, head) slices are int64 inside the kernels: large tensors pass 2**31 elements.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton

from ..layout import bits_offsets, table_offsets
from ..options import DEFAULT, KernelOptions
from .backward import dkdv_kernel, dq_kernel
from .common import sum_chunks_kernel
from .configs import LaunchConfig, dkdv_plans, dq_plans, forward_plans
from .forward import combine_kernel, forward_kernel

LOG2E = 1.4426950408889634
# Triton decides when it decorates a kernel whether it runs compiled or through its CPU interpreter
# (TRITON_INTERPRET=1, read at import); the host follows that decision.
INTERPRETED = type(forward_kernel).__name__ == "InterpretedFunction"


# ------------------------------------------------------------------------------------- problem
def _precision(dtype) -> str:
    if dtype == torch.bfloat16 and INTERPRETED:
        return "upcast"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _next_pow2(n: int) -> int:
    # plain arithmetic: triton's helpers of the same name cost microseconds a call on the host
    return 1 << (n - 1).bit_length()


def _pad_dim(d: int) -> int:
    return max(16, _next_pow2(d))


def _pad_blocks(nqb: int, nkb: int, causal: bool) -> int:
    """Width of the causal bound search (a constexpr: 1 when not causal, so lengths don't recompile)."""
    return _next_pow2(max(nqb, nkb)) if causal else 1


def _ragged(nq: int, nk: int, block: int) -> bool:
    """Whether a sequence ends inside a block: only then do partial tiles need bounds checks (full
    blocks never cross a sequence's end, and partial blocks' element masks are False past it)."""
    return nq % block != 0 or nk % block != 0


def _table_args(tables, nqb: int, nkb: int):
    """The flat tables, the offsets of the six a kernel walks (forward, or transposed with the
    transposed element masks), and (SLOT_B, SLOT_H): how a (batch, head) pair picks its row of the
    tables (0 = broadcast), then the offsets of the split's tables (query blocks, kv blocks). tables:
    (flat tables, layout batch, layout heads[, `Layout.split`])."""
    data, bl, hl = tables[:3]
    return (data,) + _offsets(data.numel(), bl, hl, nqb, nkb)


@functools.lru_cache(maxsize=1024)
def _offsets(numel: int, bl: int, hl: int, nqb: int, nkb: int):
    off = {n: o for n, (o, _) in table_offsets(bl, hl, nqb, nkb).items()}
    off["bits"], off["t_bits"] = bits_offsets(numel, bl, hl, nqb, nkb)
    fwd = tuple(off[n] for n in ("part_mid", "bits", "full_num", "full_idx", "part_num", "part_idx"))
    bwd = tuple(off[n] for n in ("t_part_mid", "t_bits", "t_full_num", "t_full_idx", "t_part_num", "t_part_idx"))
    longs = (off["long_index"], off["long_rows"]), (off["t_long_index"], off["t_long_cols"])
    return fwd, bwd, ((hl if bl > 1 else 0), (1 if hl > 1 else 0)), longs


def _split(tables, options) -> tuple:
    """(query blocks, kv blocks): each (chunk, long blocks, chunks) of `Layout.split`, or None where
    that side has no long block (or the options turn the split off)."""
    split = tables[3] if len(tables) > 3 else ()
    if not (split and options.split):
        return None, None
    return (split[:3] if split[1] else None), (split[3:] if split[4] else None)


def _work(n: int, split, block: int, width: int, spare: torch.Tensor) -> torch.Tensor:
    """The float32 workspace of a split launch: per (batch, head) slice, long block and chunk, `width`
    floats for each of the block's rows. Without a split the kernels never read it: ``spare`` (a float32
    tensor of the call) stands in, so an unsplit call allocates nothing more."""
    if not split:
        return spare
    return torch.empty(n * split[1] * split[2] * block * width, dtype=torch.float32, device=spare.device)


def _bias_args(bias, q, nk):
    if bias is None:
        return q, (0, 0, 0, 0), False  # any pointer; never read
    b, h, nq, _ = q.shape
    full = bias.expand(b, h, nq, nk)
    return full, full.stride(), True


# ------------------------------------------------------------------------------------- launching
def _triton_at_least(major: int, minor: int) -> bool:
    try:
        return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


# Compiled kernels by our own key of a launch, for `_launch`. Triton's `kernel[grid](...)` binds and
# specialises all of a call's ~50 arguments in Python before it launches (tens of µs of host time, as
# much as a small problem's GPU time); the key below is cheaper and implies Triton's specialisation
# (the exact scalars, each tensor's dtype and 16-byte alignment, the constexprs, warps and stages,
# the device), so the kernel it maps to is the one Triton would pick.
_COMPILED: dict = {}
try:  # CompiledKernel.run's signature as triton 3.3 - 3.8 call it, hooks in triton.knobs
    import triton.knobs

    _FAST_LAUNCH = not INTERPRETED and _triton_at_least(3, 3)
except ImportError:
    _FAST_LAUNCH = False


def _current_device() -> int:
    return torch.cuda.current_device()


def launch_device(t: torch.Tensor):
    """Makes t's GPU the current device for the launches (nothing to do when it already is, or for CPU
    tensors under the interpreter): triton compiles for and launches on the current device, which
    need not be the one a model's tensors live on (a model on cuda:1 without torch.cuda.set_device)."""
    if t.device.type != "cuda" or t.device.index == _current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device.index)


def _current_stream(device: int):
    return triton.runtime.driver.active.get_current_stream(device)  # the raw stream handle triton launches on


def _hooked(hook) -> bool:
    """Whether a launch hook of triton's is set (triton >= 3.5 keeps an empty HookChain when none is)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _triton_options(num_warps, num_stages, maxnreg) -> dict:
    """Triton's launch options (only the slow path builds them: the fast path has a compiled kernel)."""
    return dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))


def _launch(kernel, grid, ptrs, scalars, consts, num_warps, num_stages, maxnreg=None, fast=True):
    """``kernel[grid](*ptrs, *scalars, **consts, num_warps=..., num_stages=...[, maxnreg=...])``; after the
    first call with a given key, straight to the compiled kernel's launcher (fast=False turns that
    off, and a launch hook, e.g. a profiler's, sends every call through triton). ptrs: the tensor
    parameters (tensors or tensor descriptors), which come first (their device is the current one: see
    `launch_device`); scalars: the int and float ones after them. maxnreg caps the registers a thread holds."""
    if not (_FAST_LAUNCH and fast):
        kernel[grid](*ptrs, *scalars, **consts, **_triton_options(num_warps, num_stages, maxnreg))
        return
    device = ptrs[0].device.index
    key = (id(kernel), device, num_warps, num_stages, maxnreg, *consts.values(), *scalars,
           *[(t.dtype, t.data_ptr() % 16 == 0) if isinstance(t, torch.Tensor) else None for t in ptrs])
    hit = _COMPILED.get(key)
    rt = triton.knobs.runtime
    if hit is None or _hooked(rt.launch_enter_hook) or _hooked(rt.launch_exit_hook):
        compiled = kernel[grid](*ptrs, *scalars, **consts, **_triton_options(num_warps, num_stages, maxnreg))
        if hit is None and len(_COMPILED) < 4096 and hasattr(compiled, "packed_metadata"):  # a few hundred bytes each
            _COMPILED[key] = (compiled, tuple(consts[n] for n in kernel.arg_names[len(ptrs) + len(scalars):]))
        return
    compiled, tail = hit
    compiled.run(grid[0], grid[1], 1, _current_stream(device), compiled.function, compiled.packed_metadata,
                 None, None, None, *ptrs, *scalars, *tail)


_FITTED: dict = {}  # (kernel name, device, dtype, constexprs, options) -> the first plan that fitted the GPU


def _launch_fitting(key, plans, launch):
    """launch(plan) with the first plan of `plans()` whose compiled kernel fits the GPU. Triton raises
    OutOfResources before it launches a kernel that asks for more shared memory than the GPU has.
    The plan that fitted is remembered per key (which holds everything the compiled kernel depends
    on but the plan), so later calls go straight to it."""
    plan = _FITTED.get(key)
    if plan is not None:
        return launch(plan)
    plans = plans()
    for i, plan in enumerate(plans):
        try:
            launch(plan)
        except triton.runtime.errors.OutOfResources as e:
            if i + 1 < len(plans):
                continue
            raise RuntimeError(f"fxsparse: no launch plan of {key[0]} fits this GPU "
                               f"({e}); try a smaller head dim or block size") from e
        _FITTED[key] = plan
        return


# ------------------------------------------------------------------------------------- tensor descriptors
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older triton: pointer loads only
    TensorDescriptor = None


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def _descriptors_fit(a, b) -> bool:
    """Whether two [B, H, N, D] tensors (each with its own D) can be read through tensor descriptors
    (TMA, Hopper and newer): 2-byte elements, unpadded head dims, unit stride along them, and 16-byte
    aligned base and strides."""
    if TensorDescriptor is None or a.dtype not in (torch.float16, torch.bfloat16):
        return False
    if any(t.shape[-1] != _pad_dim(t.shape[-1]) for t in (a, b)):
        return False
    if a.is_cuda and _capability(a.device.index)[0] < 9:
        return False
    return _descriptor_fits(a) and _descriptor_fits(b)


def _descriptor_fits(t) -> bool:
    """A [B, H, N, D] tensor of 2-byte elements: unit stride along D, the other strides positive
    multiples of 8 (16 bytes; a broadcast dim's 0 stride does not pass), a 16-byte aligned base."""
    sb, sh, sn, sd = t.stride()
    return (sd == 1 and sb > 0 and sh > 0 and sn > 0 and not (sb % 8 or sh % 8 or sn % 8 or t.data_ptr() % 16)
            and t.numel() > 0)


def _use_descriptors(a, b, setting) -> bool:
    """Tensor descriptors for two of a kernel's inputs. setting None: where both head dims are 128 (there
    they are faster; at D = 64 they cost registers and a program per SM: docs/performance.md); True:
    wherever they fit; False: never."""
    if setting is False or (setting is None and not a.shape[-1] == b.shape[-1] == 128):
        return False
    return _descriptors_fit(a, b)


def _tile_descriptors(a, b, rows: int):
    """Descriptors of two [B, H, N, D] tensors that load [1, 1, rows, D] tiles, D each tensor's own
    (unpadded: `_descriptors_fit`); about 2 µs of host time each, triton's constructor checks again
    what `_descriptors_fit` has checked."""
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]]) for t in (a, b)]


def _extra(split, tiles: int) -> int:
    """Programs a split launch appends to the grid: chunks 1 .. of each long block, each of its tiles."""
    return split[1] * (split[2] - 1) * tiles if split else 0


def _sum_chunks(dst, data, work, long_at: int, split, where, stride: int, offset: int, factor: float, block: int,
                rows: int, options):
    """dst's rows of the long blocks: factor times the sum of their chunks' partial gradients in work.
    where: (SLOT_B, SLOT_H, heads of dst, query heads per head of dst, blocks, length)."""
    slot_b, slot_h, heads, g, nb, n = where
    dim = dst.shape[-1]
    _launch(sum_chunks_kernel, (split[1] * (block // rows), dst.shape[0] * heads), (dst, data, work),
            (long_at, slot_b, slot_h, heads, g, nb, n, split[1], split[2], stride, offset, factor),
            dict(DIM=dim, DIM_PAD=_pad_dim(dim), BLOCK=block, ROWS=rows), 4, 1, None, options.fast_launch)


# ------------------------------------------------------------------------------------- entry points
def forward(q, k, v, tables, bias, scale, block, causal, out, options: KernelOptions = DEFAULT):
    """Writes softmax(q kᵀ scale + bias, restricted to the layout) v into `out` and returns the row
    statistics [B, H, 2, Nq] (float32, base 2) the backward needs. tables: (flat tables, layout
    batch, layout heads[, `Layout.split`]); with a split, long rows are walked in chunks by extra
    programs and merged by `combine_kernel`."""
    b, h, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    nqb, nkb = -(-nq // block), -(-nk // block)
    data, fwd_offsets, _, (slot_b, slot_h), (long_offsets, _) = _table_args(tables, nqb, nkb)
    split = _split(tables, options)[0]
    d_pad, dv_pad = _pad_dim(d), _pad_dim(dv)
    lse = torch.empty(b, h, 2, nq, dtype=torch.float32, device=q.device)
    bias_t, bstr, has_bias = _bias_args(bias, q, nk)
    tma = _use_descriptors(k, v, options.forward_descriptors)
    consts = dict(HEAD_DIM=d, D_PAD=d_pad, DV=dv, DV_PAD=dv_pad, BLOCK=block, HAS_BIAS=has_bias, IS_CAUSAL=causal,
                  PRECISION=_precision(q.dtype), PAD=_pad_blocks(nqb, nkb, causal), RAGGED=_ragged(nq, nk, block),
                  FOLD=scale > 0 and options.forward_fold, TMA=tma, SPLIT=split is not None)
    scalars = (*fwd_offsets, *long_offsets, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bstr, slot_b,
               slot_h, h, h // hkv, nq, nk, nqb, nkb, scale * LOG2E, *(split or (0, 0, 0)))
    work = _work(b * h, split, block, dv_pad + 2, lse)  # each row: its unnormalised output, max and sum

    def launch(plan: LaunchConfig):
        kd, vd = _tile_descriptors(k, v, plan.cols) if tma else (k, v)
        tiles = block // plan.rows
        _launch(forward_kernel, (nqb * tiles + _extra(split, tiles), b * h),
                (q, k, v, kd, vd, out, lse, bias_t, data, work),
                scalars, dict(consts, BLOCK_M=plan.rows, BLOCK_N=plan.cols, LOOK_AHEAD=plan.look_ahead),
                plan.num_warps, plan.num_stages, options.forward_max_registers, options.fast_launch)
        if split:
            _launch(combine_kernel, (split[1] * tiles, b * h), (out, lse, data, work),
                    (long_offsets[1], *out.stride(), slot_b, slot_h, h, nq, nqb, *split[1:]),
                    dict(DV=dv, DV_PAD=dv_pad, BLOCK=block, BLOCK_M=plan.rows), 4, 1, None, options.fast_launch)

    key = ("forward_kernel", q.device, q.dtype, *consts.values(), options.forward_config, options.forward_look_ahead,
           options.forward_max_registers)
    with launch_device(q):
        _launch_fitting(key, lambda: forward_plans(block, max(d_pad, dv_pad), q.dtype, options, INTERPRETED), launch)
    return lse


def backward(dout, q, k, v, out, lse, tables, bias, scale, block, causal, bias_grad, options: KernelOptions = DEFAULT):
    """(dq, dk, dv, dbias): the dq kernel (which also writes delta and, when bias_grad, the float32
    [B, H, Nq, Nk] bias gradient), then the dk/dv kernel."""
    b, h, nq, d = q.shape
    hkv, nk, d_v = k.shape[1], k.shape[2], v.shape[-1]
    nqb, nkb = -(-nq // block), -(-nk // block)
    data, fwd_offsets, bwd_offsets, (slot_b, slot_h), (long_offsets, t_long_offsets) = _table_args(tables, nqb, nkb)
    row_split, col_split = _split(tables, options)
    d_pad, dv_pad = _pad_dim(d), _pad_dim(d_v)
    delta = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)  # written by the dq kernel
    dq = torch.empty(b, h, nq, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(b, hkv, nk, d, dtype=k.dtype, device=q.device)
    dv = torch.empty(b, hkv, nk, d_v, dtype=v.dtype, device=q.device)
    dbias = torch.zeros(b, h, nq, nk, dtype=torch.float32, device=q.device) if bias_grad else None
    bias_t, bstr, has_bias = _bias_args(bias, q, nk)
    common = dict(HEAD_DIM=d, D_PAD=d_pad, DV=d_v, DV_PAD=dv_pad, BLOCK=block, HAS_BIAS=has_bias, IS_CAUSAL=causal,
                  PRECISION=_precision(q.dtype), PAD=_pad_blocks(nqb, nkb, causal), RAGGED=_ragged(nq, nk, block),
                  FOLD=not has_bias and options.backward_fold)
    io_strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    bias_slots = (*bstr, slot_b, slot_h)
    # descriptors: K and V for dq, q and dout for dk/dv
    dq_tma = _use_descriptors(k, v, options.backward_descriptors)
    dkdv_tma = _use_descriptors(q, dout, options.backward_descriptors)
    dq_scalars = (*fwd_offsets, *long_offsets, *io_strides, *out.stride(), *bias_slots, h, h // hkv, nq, nk, nqb,
                  nkb, scale, scale * LOG2E, *(row_split or (0, 0, 0)))
    dkdv_scalars = (*bwd_offsets, *t_long_offsets, *io_strides, *bias_slots, h, hkv, h // hkv, nq, nk, nqb, nkb, scale,
                    scale * LOG2E, *(col_split or (0, 0, 0)))
    dq_work = _work(b * h, row_split, block, d_pad, delta)  # each row: its partial dq
    dkdv_work = _work(b * hkv, col_split, block, d_pad + dv_pad, delta)  # each kv row: partial dk, dv

    def launch_dq(plan: LaunchConfig):  # rows: query rows, cols: kv rows
        kd, vd = _tile_descriptors(k, v, plan.cols) if dq_tma else (k, v)
        tiles = block // plan.rows
        _launch(dq_kernel, (nqb * tiles + _extra(row_split, tiles), b * h),
                (q, k, v, kd, vd, dout, out, lse, delta, dq, bias_t, dbias if bias_grad else q, data, dq_work),
                dq_scalars, dict(common, TMA=dq_tma, SPLIT=row_split is not None, BIAS_GRAD=bias_grad,
                                 BLOCK_M=plan.rows, BLOCK_N=plan.cols, LOOK_AHEAD=plan.look_ahead),
                plan.num_warps, plan.num_stages, None, options.fast_launch)
        if row_split:
            _sum_chunks(dq, data, dq_work, long_offsets[1], row_split, (slot_b, slot_h, h, 1, nqb, nq), d_pad, 0, scale,
                        block, plan.rows, options)

    def launch_dkdv(plan: LaunchConfig):  # rows: kv rows, cols: query rows
        qd, dod = _tile_descriptors(q, dout, plan.cols) if dkdv_tma else (q, dout)
        tiles = block // plan.rows
        _launch(dkdv_kernel, (nkb * tiles + _extra(col_split, tiles), b * hkv),
                (q, k, v, dout, qd, dod, lse, delta, dk, dv, bias_t, data, dkdv_work), dkdv_scalars,
                dict(common, TMA=dkdv_tma, SPLIT=col_split is not None, BLOCK_M=plan.cols, BLOCK_N=plan.rows,
                     LOOK_AHEAD=plan.look_ahead),
                plan.num_warps, plan.num_stages, options.dkdv_max_registers, options.fast_launch)
        if col_split:
            where = (slot_b, slot_h, hkv, h // hkv, nkb, nk)
            _sum_chunks(dk, data, dkdv_work, t_long_offsets[1], col_split, where, d_pad + dv_pad, 0, scale, block,
                        plan.rows, options)
            _sum_chunks(dv, data, dkdv_work, t_long_offsets[1], col_split, where, d_pad + dv_pad, d_pad, 1.0, block,
                        plan.rows, options)

    key = (q.device, q.dtype, bias_grad, dq_tma, dkdv_tma, row_split is not None, col_split is not None,
           *common.values())
    width = max(d_pad, dv_pad)  # the plans of the wider head dim (both dims' tiles sit in shared memory)
    with launch_device(q):
        _launch_fitting(("dq_kernel", *key, options.dq_config, options.dq_look_ahead),
                        lambda: dq_plans(block, width, q.dtype, options, INTERPRETED), launch_dq)
        _launch_fitting(("dkdv_kernel", *key, options.dkdv_config, options.dkdv_look_ahead, options.dkdv_max_registers),
                        lambda: dkdv_plans(block, width, q.dtype, options, INTERPRETED), launch_dkdv)
    return dq, dk, dv, dbias
