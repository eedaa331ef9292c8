"""The block-sparse attention op: one torch.library op with a fake kernel and autograd.

``sparse_attention`` checks its arguments and turns the mask into a Layout; the op itself
(``torch.ops.fxsparse.sparse_attention``) takes the layout's tables as one flat int32 tensor so
that torch.compile and torch.export see one opaque op, and a call costs little on the host. CUDA tensors run the Triton kernels; CPU
tensors run the block-skipping path of ``cpu.py`` (``reference.py``, which computes every block, is
its oracle), or the Triton kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` is set.
"""
from __future__ import annotations

import collections
import math
import numbers
import os
from typing import Optional

import torch
from torch import Tensor

from . import cpu, reference
from .layout import Layout, resolve_mask
from .options import KernelOptions, decode, encode

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as triton does at import
_kernels = None  # fxsparse.kernels.launch, imported on first use: triton is not needed on CPU
DENSE_LAYOUT_CACHE_SIZE = 64  # dense Layouts kept for `mask=None` calls, one per (Nq, Nk, block, device), least recent out first
_dense_layouts: collections.OrderedDict = collections.OrderedDict()


def clear_layout_cache() -> None:
    """Forget the dense Layouts cached for ``mask=None`` calls (at most ``DENSE_LAYOUT_CACHE_SIZE``)."""
    _dense_layouts.clear()


def _use_triton(q: Tensor) -> bool:
    return q.is_cuda or (_INTERPRET and q.dtype != torch.float64)


def _impl(q: Tensor):
    """The Triton kernels (CUDA, or any device under TRITON_INTERPRET=1) or the block-skipping CPU path."""
    global _kernels
    if _use_triton(q):
        if _kernels is None:
            from .kernels import launch

            _kernels = launch
        return _kernels
    return cpu


def _new_out(q: Tensor, dv: int) -> Tensor:
    """Output [B, H, Nq, D] laid out as [B, Nq, H, D], so the usual `transpose(1, 2).reshape(B, N, C)` is a view."""
    b, h, nq, _ = q.shape
    # strided, not a transposed view: a view made inside the op could not be modified in place later
    return q.new_empty_strided((b, h, nq, dv), (nq * h * dv, dv, h * dv, 1))


# ------------------------------------------------------------------------------------- the op
def _launch_options(impl, options: str) -> dict:
    """The Triton kernels' KernelOptions, from the op's string argument; the CPU paths take none."""
    return {"options": decode(options)} if impl is _kernels else {}


def _forward(q, k, v, layout, layout_batch, layout_heads, layout_split, bias, scale, block_size, causal, options=""):
    impl = _impl(q)
    out = _new_out(q, v.shape[-1])
    lse = impl.forward(q, k, v, (layout, layout_batch, layout_heads, tuple(layout_split)), bias, scale, block_size,
                       causal, out,
                       **_launch_options(impl, options))
    return out, lse


def _backward_impl(dout, q, k, v, out, lse, layout, layout_batch, layout_heads, layout_split, bias, scale, block_size,
                   causal, bias_grad, options=""):
    impl = _impl(q)
    tables = (layout, layout_batch, layout_heads, tuple(layout_split))
    return impl.backward(dout, q, k, v, out, lse, tables, bias, scale, block_size, causal, bias_grad,
                         **_launch_options(impl, options))


@torch.library.custom_op("fxsparse::sparse_attention", mutates_args=())
def _sparse_attention_op(
    q: Tensor, k: Tensor, v: Tensor, layout: Tensor, layout_batch: int, layout_heads: int, layout_split: list[int],
    bias: Optional[Tensor], scale: float, block_size: int, causal: bool, options: str = "",
) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, layout, layout_batch, layout_heads, layout_split, bias, scale, block_size, causal, options)


@_sparse_attention_op.register_fake
def _(q, k, v, layout, layout_batch, layout_heads, layout_split, bias, scale, block_size, causal, options=""):
    b, h, nq, _ = q.shape
    return _new_out(q, v.shape[-1]), q.new_empty(b, h, 2, nq, dtype=reference.acc_dtype(q))


@torch.library.custom_op("fxsparse::sparse_attention_backward", mutates_args=())
def _sparse_attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, layout: Tensor, layout_batch: int,
    layout_heads: int, layout_split: list[int], bias: Optional[Tensor], scale: float, block_size: int, causal: bool,
    bias_grad: bool, options: str = "",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias = _backward_impl(dout, q, k, v, out, lse, layout, layout_batch, layout_heads, layout_split, bias,
                                       scale, block_size, causal, bias_grad, options)
    # contiguous, as the fake kernel promises (a compiled graph checks the strides); no copy where they already are
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    return dq, dk, dv, dbias.contiguous() if dbias is not None else q.new_empty(0, dtype=reference.acc_dtype(q))


@_sparse_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, layout, layout_batch, layout_heads, layout_split, bias, scale, block_size, causal,
      bias_grad, options=""):
    b, h, nq, _ = q.shape
    acc = reference.acc_dtype(q)
    dbias = q.new_empty(b, h, nq, k.shape[2], dtype=acc) if bias_grad else q.new_empty(0, dtype=acc)
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format), torch.empty_like(v, memory_format=torch.contiguous_format), dbias


DOUBLE_BACKWARD_ERROR = (
    "fxsparse: double backward (create_graph=True) is not supported by sparse_attention: its backward "
    "cannot itself be differentiated (gradient penalties, Hessians, torch.func.grad of a grad). Compute "
    "that term with a dense attention, or detach the first gradient if it is not meant to be differentiated"
)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _setup_backward_context(ctx, inputs, output):
    pass


# Differentiating the backward (create_graph=True) reaches this node, which raises: never a silently
# wrong second derivative (the saved row statistics would otherwise be treated as constants).
torch.library.register_autograd("fxsparse::sparse_attention_backward", _no_double_backward,
                                setup_context=_setup_backward_context)


def _setup_context(ctx, inputs, output):
    q, k, v, layout, layout_batch, layout_heads, layout_split, bias, scale, block_size, causal, *options = inputs
    out, lse = output
    ctx.options = options[0] if options else ""
    ctx.save_for_backward(q, k, v, out, lse, bias, layout)
    ctx.layout_batch, ctx.layout_heads, ctx.layout_split = layout_batch, layout_heads, layout_split
    ctx.scale, ctx.block_size, ctx.causal = scale, block_size, causal
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.bias_shape = None if bias is None else tuple(bias.shape)


def _backward(ctx, dout, dlse, backward_op=_sparse_attention_backward_op):
    q, k, v, out, lse, bias, layout = ctx.saved_tensors
    dq, dk, dv, dbias = backward_op(
        dout, q, k, v, out, lse, layout, ctx.layout_batch, ctx.layout_heads, ctx.layout_split, bias, ctx.scale,
        ctx.block_size, ctx.causal, ctx.bias_grad, ctx.options,
    )
    dbias_out = _reduce_to(dbias, ctx.bias_shape).to(bias.dtype) if ctx.bias_grad else None
    return dq, dk, dv, None, None, None, None, dbias_out, None, None, None, None


def _reduce_to(grad: Tensor, shape: tuple) -> Tensor:
    """Sum a [B, H, Nq, Nk] gradient down to the shape the bias was broadcast from."""
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1]
    return grad.sum(dims, keepdim=True).reshape(shape) if dims else grad.reshape(shape)


torch.library.register_autograd("fxsparse::sparse_attention", _backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The op's forward and backward without the dispatcher, for plain eager calls.

    At the sizes of one layer of a small model the host's cost of a call is the GPU's (a custom op
    call and its backward cost about as much again as the kernels' launches): this path runs the
    very same implementations with a fraction of that. Anything that traces (torch.compile,
    torch.export, make_fx, functorch transforms, tensor subclasses) goes through the op instead.
    """

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _forward(*inputs)
        _setup_context(ctx, inputs, (out, lse))
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ctx.saved_tensors):
            # create_graph=True: the backward op records a node whose own backward raises
            return _backward(ctx, dout, None)
        return _backward(ctx, dout, None, backward_op=_backward_impl)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(FORWARD_AD_ERROR)


FORWARD_AD_ERROR = ("fxsparse: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is not "
                    "supported by sparse_attention; use reverse mode (backward, torch.func.grad, jacrev)")


class _FunctorchAttention(torch.autograd.Function):
    """The op under functorch transforms (torch.func.grad, vjp, jacrev, vmap): the custom op's own
    autograd cannot run inside them, this Function (with setup_context) can. vmap runs the op per batch
    element."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        with torch.no_grad():  # this Function is the autograd; the op's own must not run again inside it
            return _sparse_attention_op(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse, backward_op=_FunctorchBackward.apply)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(FORWARD_AD_ERROR)


class _FunctorchBackward(torch.autograd.Function):
    """The backward op under functorch transforms, which always build a graph of the backward:
    differentiating it again (torch.func.grad of a grad) raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        with torch.no_grad():
            return _sparse_attention_backward_op(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


_TRACING_MODES = tuple(torch._C._TorchDispatchModeKey.__members__.values())  # fake, proxy, functional


def _plain_eager(tensors) -> bool:
    """True when no tracer, mode or transform can see this call (then the eager path is safe)."""
    if torch.compiler.is_compiling() or any(torch._C._get_dispatch_mode(m) is not None for m in _TRACING_MODES):
        return False
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return False
    return all(t is None or (type(t) in (Tensor, torch.nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t))
               for t in tensors)


def _functorch(tensors) -> bool:
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


# ------------------------------------------------------------------------------------- public
def sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, mask=None, *, scale: float | None = None, bias: Tensor | None = None,
    causal: bool = False, options: KernelOptions | None = None,
) -> Tensor:
    """Block-sparse attention: softmax(q kᵀ · scale + bias, restricted to ``mask``) v.

    q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv] with H % Hkv == 0 (grouped-query heads
    share kv heads, no copy). v may have its own head dim Dv (LeViT's keys have 16 channels a head,
    its values 32 or 64). Any strides. D and Dv up to 256 (padded inside the kernel to a power of two,
    at least 16). float16, bfloat16 or float32 (float32 matmuls follow
    ``torch.get_float32_matmul_precision()``); the output has q's dtype and shape [B, H, Nq, Dv].

    mask: a ``Layout`` (build it once and reuse it: the per-call cost is then nothing), a bool token
    mask broadcastable to [B|1, H|1, Nq, Nk] with True = may attend (compiled into a Layout on every
    call), a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (evaluated for every head and
    batch index on every call: build ``Layout.from_mask_mod`` once for repeated calls), a pattern from
    ``fxsparse.patterns`` (its layout cached), or None for dense attention.
    bias: additive float tensor broadcastable to [B, H, Nq, Nk] (padding masks, relative position
    bias, ALiBi); it receives a gradient when it requires one.
    causal: query i attends keys j <= i, top-left aligned as in ``scaled_dot_product_attention``
    (for Nq != Nk that is ``torch.ones(Nq, Nk).tril()``); blocks above the diagonal are skipped. With
    a Layout that already lies inside that triangle (``layout.causal``, e.g. ``layout.fold_causal()``)
    the flag costs nothing: the kernels' per-element causal test is left out.

    options: a ``fxsparse.KernelOptions``: how the Triton kernels are launched (None: the tuned
    defaults). The CPU path ignores it.

    A query row with no allowed key returns 0, with gradient 0.
    """
    _check_inputs(q, k, v)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    key = encode(options)  # checks the type; "" for the defaults
    refine = options is None or options.refine
    width = max(d, v.shape[-1])  # the kernels' tiles follow the wider of the two head dims
    layout = kernel_layout(_as_layout(mask, q, nq, nk, refine, width), width, refine)
    for what, got, want in (("batch", layout.batch, b), ("heads", layout.num_heads, h)):
        if got not in (1, want):
            raise ValueError(
                f"the mask's Layout has {what} {got} but q has {what} {want}: a Layout's {what} must be "
                f"{_one_or(want)} (1 = shared by all); build it from a mask of that shape"
            )
    if bias is not None:
        bias = _check_bias(bias, q, nk)
    scale = 1.0 / math.sqrt(d) if scale is None else _check_scale(scale)
    if isinstance(causal, Tensor) or not (isinstance(causal, (bool, numbers.Integral))
                                          or type(causal).__module__ == "numpy" and hasattr(causal, "__bool__")):
        raise TypeError(f"causal must be a bool, got {type(causal).__module__}.{type(causal).__qualname__}")
    causal = bool(causal) and not layout.causal  # a layout that holds causality needs no per-element test
    args = (q, k, v, layout.data, layout.batch, layout.num_heads, list(layout.split), bias, scale, layout.block_size,
            causal, key)
    tensors = (q, k, v, layout.data, bias)
    if q.numel() == 0:  # an empty batch or no heads: an empty output that autograd connects to q, k, v
        return q * 0 + (k.sum() + v.sum()).to(q.dtype) * 0
    if q.device.type == "meta":  # shapes only: the op's fake kernel
        return _sparse_attention_op(*args)[0]
    if _plain_eager(tensors):
        return _EagerAttention.apply(*args)
    if not torch.compiler.is_compiling() and _functorch(tensors):
        return _FunctorchAttention.apply(*args)[0]
    return _sparse_attention_op(*args)[0]


def _one_or(n: int) -> str:
    return "1" if n == 1 else f"1 or {n}"


def _check_scale(scale) -> float:
    if isinstance(scale, Tensor):
        if scale.requires_grad:
            raise TypeError(
                "scale is a tensor that requires grad, but sparse_attention takes scale as a number and passes "
                "it no gradient; fold a learned scale into q instead: sparse_attention(q * scale, k, v, scale=1.0)"
            )
        if scale.numel() != 1:
            raise ValueError(f"scale must be one number, got a tensor of shape {tuple(scale.shape)}")
    elif not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def _check_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = _FLOAT_DTYPES if q.is_cuda else _FLOAT_DTYPES + (torch.float64,)
    if q.dtype not in allowed:
        raise TypeError(f"dtype {q.dtype} is not supported on {q.device.type}; use one of {', '.join(map(str, allowed))}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, nq, d = q.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must have the same batch, heads and length [B, Hkv, Nk] (v may have its own head dim), got k "
            f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != b:
        raise ValueError(f"batch of k/v ({k.shape[0]}) differs from q's ({b})")
    if k.shape[3] != d:
        raise ValueError(f"head_dim of k ({k.shape[3]}) differs from q's ({d}): q and k must share one head dim")
    hkv = k.shape[1]
    if hkv == 0:
        raise ValueError(f"k/v have 0 heads (q has {h}); give them at least one head")
    if h % hkv != 0:
        raise ValueError(f"q has {h} heads, which is not a multiple of k/v's {hkv} heads")
    if not 1 <= d <= 256:
        raise ValueError(f"head_dim must be between 1 and 256, got {d}")
    if not 1 <= v.shape[3] <= 256:
        raise ValueError(f"head_dim of v must be between 1 and 256, got {v.shape[3]}")
    if nq == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequence: q has {nq} tokens, k has {k.shape[2]}")


KERNEL_BLOCK = 64  # the kernels' tile at head dims up to 64 (kernels/configs.py)


def _kernel_block(head_dim: int, refine: bool = True) -> int | None:
    """Block size of the tables the kernels walk best at this head dim: their tile, 64, for head
    dims up to 64 (None: the layout's own). refine=False (KernelOptions.refine) turns this off."""
    if head_dim <= KERNEL_BLOCK and refine:
        return KERNEL_BLOCK
    return None


def kernel_layout(layout: Layout, head_dim: int, refine: bool = True) -> Layout:
    """The layout the kernels walk: the same mask, in 64-blocks where the kernels' tiles are 64 wide
    (``Layout.refine``: the all-True and all-False parts of partial blocks become full and empty
    blocks, so the kernels skip their element masks or the whole tile). Built once, cached on the
    layout. Under torch.compile a layout that was never refined runs as it is (refining is
    data-dependent): call the op once eagerly first, or build the Layout in 64-blocks."""
    fine = _kernel_block(head_dim, refine)
    if fine is None or layout.block_size <= fine:
        return layout
    if fine in layout.refined or not torch.compiler.is_compiling():
        return layout.refine(fine)
    return layout


def _as_layout(mask, q: Tensor, nq: int, nk: int, refine: bool = True, head_dim: int | None = None) -> Layout:
    """The call's mask as a Layout; built ones in the blocks the kernels walk at `head_dim` (q's by default)."""
    block = _kernel_block(q.shape[-1] if head_dim is None else head_dim, refine)
    if mask is None:
        if not torch.compiler.is_dynamo_compiling() and not (type(nq) is int and type(nk) is int):
            raise ValueError(
                f"mask=None with symbolic sequence lengths ({nq}, {nk}; torch.export with dynamic shapes) is not "
                "supported: the dense layout's tables are sized by the lengths. Export with static lengths, or "
                "call PyTorch's scaled_dot_product_attention where no sparsity is wanted")
        if torch.compiler.is_compiling() or not _plain_eager((q,)):
            # traced (fake tensors, functorch transforms): built inside the graph, no cache mutated
            return Layout.dense(nq, nk, block, device=q.device)
        key = (nq, nk, block, str(q.device))
        layout = _dense_layouts.get(key)
        if layout is None:
            layout = _dense_layouts[key] = Layout.dense(nq, nk, block, device=q.device)
            if len(_dense_layouts) > DENSE_LAYOUT_CACHE_SIZE:
                _dense_layouts.popitem(last=False)
        else:
            _dense_layouts.move_to_end(key)
        return layout
    if isinstance(mask, Layout):
        if mask.shape != (nq, nk):
            raise ValueError(f"layout was built for (q_len, kv_len) = {mask.shape}, but the inputs have {(nq, nk)}")
        if mask.device != q.device:
            raise ValueError(
                f"layout is on {mask.device} but q is on {q.device}: move it once with layout.to({str(q.device)!r})"
            )
        return mask
    if isinstance(mask, Tensor):
        build = _token_mask_layout_outside_graph if torch.compiler.is_compiling() else _token_mask_layout
        return build(mask, tuple(q.shape[:2]), nq, nk, q.device, block)
    if callable(mask):  # a pattern (its layout cached) or a FlexAttention mask_mod (evaluated on every call)
        if torch.compiler.is_compiling():
            raise TypeError("a mask_mod or pattern cannot be built into a Layout inside torch.compile: build "
                            "`fxsparse.Layout.from_mask_mod(mask_mod, q_len, kv_len)` once outside and pass the Layout")
        return resolve_mask(mask, q_len=nq, kv_len=nk, num_heads=q.shape[1], batch=q.shape[0], device=q.device,
                            block_size=block, where="mask")
    raise TypeError(f"mask must be a fxsparse.Layout, a bool tensor, a mask_mod (b, h, q_idx, kv_idx) -> bool, a "
                    f"pattern or None, got {type(mask).__name__}")


def _token_mask_layout(mask: Tensor, lead: tuple, nq: int, nk: int, device, block) -> Layout:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = may attend) or a Layout, got a tensor of dtype {mask.dtype}")
    b, h = lead
    try:
        ok = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, (b, h, nq, nk)) == (b, h, nq, nk)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to [batch {_one_or(b)}, heads {_one_or(h)}, {nq}, {nk}]"
        )
    while mask.dim() < 2:
        mask = mask.unsqueeze(0)
    if torch.device(device).type == "meta":  # shapes only: no values to cut into blocks
        return Layout.dense(nq, nk, block, device=device)
    if mask.device.type == "meta":
        raise ValueError(f"mask is on the meta device (it has no values) but q is on {device}; pass a real mask")
    return Layout.from_mask(mask.expand(*mask.shape[:-2], nq, nk).to(device), block)


TOKEN_MASK_UNDER_COMPILE = (
    "fxsparse: a bool token mask is turned into a Layout outside the graph (its block tables depend on the "
    "mask's values), a graph break; with fullgraph=True build `fxsparse.Layout.from_mask(mask, block_size)` "
    "once outside the compiled function and pass the Layout"
)
# Under torch.compile the tables are built eagerly (a graph break); fullgraph=True shows the reason.
try:
    _token_mask_layout_outside_graph = torch.compiler.disable(_token_mask_layout, reason=TOKEN_MASK_UNDER_COMPILE)
except TypeError:  # a torch without disable(reason=): the same graph break, without the reason
    _token_mask_layout_outside_graph = torch.compiler.disable(_token_mask_layout)


def _check_bias(bias, q: Tensor, nk: int) -> Tensor:
    b, h, nq, _ = q.shape
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        got = bias.dtype if isinstance(bias, Tensor) else type(bias).__name__
        raise TypeError(f"bias must be an additive float tensor, got {got}; pass a bool mask as `mask=` instead")
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
    try:
        ok = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, (b, h, nq, nk)) == (b, h, nq, nk)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to [B, H, Nq, Nk] = {[b, h, nq, nk]}")
    return bias


# ------------------------------------------------------------------------------------- for fxsparse's site op
def is_traced(*tensors) -> bool:
    """True when a compiler, tracer or transform sees these tensors (the eager fast path is off)."""
    return torch.compiler.is_compiling() or not _plain_eager(tensors)


def layout_forward(q: Tensor, k: Tensor, v: Tensor, layout: Layout, *, scale: float, bias: Optional[Tensor],
                   causal: bool, options: Optional[KernelOptions] = None) -> tuple[Tensor, Tensor]:
    """The op's forward on a kernel Layout (``kernel_layout``), outside autograd: (out, lse)."""
    causal = bool(causal) and not layout.causal
    return _forward(q, k, v, layout.data, layout.batch, layout.num_heads, layout.split, bias, float(scale),
                    layout.block_size, causal, encode(options))


def layout_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, layout: Layout, *,
                    scale: float, bias: Optional[Tensor], causal: bool, bias_grad: bool,
                    options: Optional[KernelOptions] = None) -> tuple:
    """The op's backward for ``layout_forward``: (dq, dk, dv, dbias or None, dbias reduced to bias's shape)."""
    causal = bool(causal) and not layout.causal
    dq, dk, dv, dbias = _backward_impl(dout, q, k, v, out, lse, layout.data, layout.batch, layout.num_heads,
                                       layout.split, bias, float(scale), layout.block_size, causal, bias_grad,
                                       encode(options))
    return dq, dk, dv, (_reduce_to(dbias, tuple(bias.shape)).to(bias.dtype) if bias_grad else None)
