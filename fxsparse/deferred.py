"""Attention scores computed only when someone needs them: the run-time route for owners that
torch.fx cannot trace on their own (HuggingFace's eager attention, forwards that take cache
objects).

Inside such an owner's forward, a product ``q @ kᵀ`` returns a ``Scores`` tensor that holds q and
k instead of the product. The steps attention applies to scores are recorded on it (a scale, an
additive bias, a ``-inf`` fill, the softmax, casts, dropout in eval mode) and the product of the
probabilities with ``v`` becomes one call of the site module. Any other use of a ``Scores``
computes the real tensor first, so the result is always what the original code computes: a
matmul that was not attention costs one product, as before.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MATMUL = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm}
_MUL = {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__, Tensor.mul_, operator.mul}
_DIV = {torch.div, Tensor.div, Tensor.__truediv__, Tensor.__itruediv__, Tensor.div_, torch.true_divide}
_ADD = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__, Tensor.add_}
_FILL = {torch.masked_fill, Tensor.masked_fill, Tensor.masked_fill_}
# in place on the scores: the Scores object itself takes the step (`s.div_(c)` with no assignment)
_INPLACE = {Tensor.__imul__, Tensor.mul_, Tensor.__itruediv__, Tensor.div_, Tensor.__iadd__, Tensor.add_,
            Tensor.masked_fill_}
_BADDBMM = {torch.baddbmm, Tensor.baddbmm}
# properties that return tensors (the others, shape, dtype, device, ..., are metadata)
_TENSOR_PROPERTIES = {"T", "mT", "H", "mH", "data", "grad", "real", "imag"}
_SOFTMAX = {F.softmax, torch.softmax, Tensor.softmax, torch.special.softmax}
_CAST = {Tensor.to, Tensor.type, Tensor.type_as, Tensor.float, Tensor.half, Tensor.bfloat16, Tensor.contiguous}
_DROPOUT = {F.dropout, torch.dropout}
_RESHAPE = {Tensor.view, Tensor.reshape, torch.reshape, Tensor.flatten, torch.flatten, Tensor.unflatten}
# what asks only for the scores' metadata: answered without computing them
_METADATA = {Tensor.size, Tensor.dim, Tensor.numel, Tensor.is_floating_point, Tensor.shape.__get__,
             Tensor.dtype.__get__, Tensor.device.__get__, Tensor.ndim.__get__, Tensor.is_cuda.__get__,
             Tensor.requires_grad.__get__}


class DropoutActive(RuntimeError):
    """Dropout with p > 0 in training mode on the probabilities: the sparse op cannot do it."""


class Scores(Tensor):
    """``scale * (q @ kᵀ) + bias``, softmaxed or not, not yet computed."""

    @staticmethod
    def __new__(cls, q, k, *, scale=1.0, bias=None, probs=False, dtype=None, transposed=False):
        lengths = (k.shape[-2], q.shape[-2]) if transposed else (q.shape[-2], k.shape[-2])
        shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + lengths
        return Tensor._make_wrapper_subclass(cls, shape, dtype=dtype or q.dtype, device=q.device)

    def __init__(self, q, k, *, scale=1.0, bias=None, probs=False, dtype=None, transposed=False):
        self.q, self.k, self.scale, self.bias, self.probs = q, k, scale, bias, probs
        self.transposed = transposed  # probabilities viewed as [.., keys, queries], for `v @ pᵀ`

    def but(self, **changes) -> "Scores":
        fields = dict(scale=self.scale, bias=self.bias, probs=self.probs, dtype=self.dtype, transposed=self.transposed)
        fields.update(changes)
        return Scores(self.q, self.k, **fields)

    def compute(self) -> Tensor:
        """The real tensor, as the original code would have computed it."""
        with torch._C.DisableTorchFunctionSubclass():
            s = torch.matmul(self.q, self.k.transpose(-2, -1))
            if self.scale != 1.0:
                s = s * self.scale
            if self.bias is not None:
                s = s + self.bias
            if self.probs:
                s = torch.softmax(s.float(), dim=-1)
            return s.to(self.dtype).transpose(-2, -1) if self.transposed else s.to(self.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*real(args), **real(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return func(*real(args), **real(kwargs or {}))

    def __repr__(self):
        return f"Scores(shape={tuple(self.shape)}, probs={self.probs})"


def real(tree):
    """Any Scores inside args / kwargs replaced by its real tensor."""
    if isinstance(tree, Scores):
        return tree.compute()
    if isinstance(tree, (list, tuple)):
        return type(tree)(real(x) for x in tree)
    if isinstance(tree, dict):
        return {k: real(v) for k, v in tree.items()}
    return tree


def has_scores(args, kwargs) -> bool:
    return any(isinstance(a, Scores) for a in args) or any(isinstance(a, Scores) for a in kwargs.values())


def _scalar(x) -> Optional[float]:
    """A number the scores are multiplied or divided by, or None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, Tensor) and x.numel() == 1 and not x.requires_grad and not isinstance(x, Scores):
        return float(x)
    return None


def _very_negative(value) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and bool(value.float() <= -1e4)
    return isinstance(value, (int, float)) and value <= -1e4


def _fill(bias, mask, value, like: Tensor, keep: bool) -> Tensor:
    masked = ~mask if keep else mask
    base = like.new_zeros((), dtype=like.dtype if bias is None else bias.dtype) if bias is None else bias
    return torch.where(masked, torch.as_tensor(value, dtype=base.dtype, device=base.device), base)


def handle(func, args, kwargs, on_attention: Callable) -> object:
    """One torch function call inside a deferring owner: returns its result, or NotImplemented
    when the call does not involve deferred scores and is not a product to defer.

    ``on_attention(q, k, v, bias, scale, out_dtype)`` computes a recognised attention."""
    if func in _BADDBMM and not has_scores(args, kwargs):
        product = _baddbmm(args, kwargs)
        if product is not None:
            return product
    if func in MATMUL and not kwargs and len(args) == 2:
        a, b = args
        if isinstance(a, Scores) and a.probs and not a.transposed and isinstance(b, Tensor) and \
                not isinstance(b, Scores):
            out = on_attention(a.q, a.k, b, a.bias, a.scale)
            return out.to(torch.promote_types(a.dtype, b.dtype))
        if isinstance(b, Scores) and b.probs and b.transposed and isinstance(a, Tensor) and \
                not isinstance(a, Scores):  # v [.., Dv, Nk] @ pᵀ: (p @ vᵀ)ᵀ (EfficientViT)
            out = on_attention(b.q, b.k, a.transpose(-2, -1), b.bias, b.scale).transpose(-2, -1)
            return out.to(torch.promote_types(a.dtype, b.dtype))
        if (not has_scores(args, kwargs) and isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() >= 3
                and b.dim() >= 3 and a.is_floating_point() and a.shape[-1] == b.shape[-2]):
            return Scores(a, b.transpose(-2, -1))
    if not has_scores(args, kwargs):
        return NotImplemented
    if func in _METADATA or (getattr(func, "__name__", "") == "__get__"
                             and getattr(getattr(func, "__self__", None), "__name__", "") not in _TENSOR_PROPERTIES):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    s = next(x for x in list(args) + list(kwargs.values()) if isinstance(x, Scores))
    step = _step(func, args, kwargs, s)
    if step is not None and func in _INPLACE and args and args[0] is s:
        s.scale, s.bias, s.probs = step.scale, step.bias, step.probs
        return s
    if step is None and args and args[0] is s and _writes_in_place(func):
        return _write(func, args, kwargs, s)
    return step if step is not None else func(*real(args), **real(kwargs))


def _writes_in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return func is Tensor.__setitem__ or (name.endswith("_") and not name.startswith("_")) or name.startswith("__i")


def _write(func, args, kwargs, s: Scores):
    """An in-place write into deferred scores that is not a step of their own (MViTv2's
    `attn[:, :, 1:, 1:] = ...` when its helper is not seen as one call): done on the real scores, and
    what the scores became kept as their bias, so that they stay exactly what the code computed."""
    if s.probs:
        raise RuntimeError(f"fxsparse: `{getattr(func, '__name__', func)}` writes into attention probabilities in place; "
                           "keep this site dense or report the model")
    with torch._C.DisableTorchFunctionSubclass():
        new = s.compute()
        func(new, *real(args[1:]), **real(kwargs))
        product = torch.matmul(s.q, s.k.transpose(-2, -1))
        s.bias = new - (product * s.scale if s.scale != 1.0 else product)
    return None if func is Tensor.__setitem__ else s


def _baddbmm(args, kwargs):
    """``beta * input + alpha * (batch1 @ batch2)`` as deferred scores (BLOOM's ALiBi scores)."""
    names = ("input", "batch1", "batch2")
    given = dict(zip(names, args[:3]), **{k: v for k, v in kwargs.items() if k in names})
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if len(given) != 3 or len(args) > 3 or not all(isinstance(t, Tensor) for t in given.values()):
        return None
    a, b, c = given["batch1"], given["batch2"], given["input"]
    if _scalar(alpha) is None or _scalar(beta) is None or a.dim() != 3 or not a.is_floating_point():
        return None
    bias = None if _scalar(beta) == 0 else c * _scalar(beta)
    return Scores(a, b.transpose(-2, -1), scale=_scalar(alpha), bias=bias)


def _step(func, args, kwargs, s: Scores):
    """The recorded step for ``func`` applied to scores ``s``, or None (then computed for real)."""
    others = [x for x in args if x is not s]
    if s.transposed:
        return None  # only a product with v takes transposed probabilities
    if not s.probs:
        if func in _MUL and len(args) == 2 and not kwargs:
            c = _scalar(others[0]) if others else None
            if c is not None:
                return s.but(scale=s.scale * c, bias=None if s.bias is None else s.bias * c)
        if func in _DIV and len(args) == 2 and not kwargs and args[0] is s:
            c = _scalar(args[1])
            if c is not None and c != 0:
                return s.but(scale=s.scale / c, bias=None if s.bias is None else s.bias / c)
        if func in _ADD and len(args) == 2 and not kwargs.get("alpha", 1) != 1:
            term = others[0] if others else None
            if isinstance(term, Tensor) and not isinstance(term, Scores) and term.is_floating_point():
                return s.but(bias=term if s.bias is None else s.bias + term)
            c = _scalar(term)
            if c is not None:  # a constant added to every score changes nothing under softmax
                return s
        if func in _FILL:
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            value = args[2] if len(args) > 2 else kwargs.get("value")
            if args[0] is s and isinstance(mask, Tensor) and _very_negative(value):
                return s.but(bias=_fill(s.bias, mask, value, s.q, keep=False))
        if func is torch.where and len(args) == 3 and args[1] is s and isinstance(args[0], Tensor):
            if _very_negative(args[2]):
                return s.but(bias=_fill(s.bias, args[0], args[2], s.q, keep=True))
        if func in _SOFTMAX:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            dtype = kwargs.get("dtype", args[3] if len(args) > 3 and func is F.softmax else None)
            if args[0] is s and dim in (-1, s.dim() - 1):
                return s.but(probs=True, dtype=dtype or s.dtype)
    else:
        if func in (Tensor.transpose, torch.transpose) and args[0] is s and len(args) == 3 and \
                {d % s.dim() for d in args[1:3] if isinstance(d, int)} == {s.dim() - 2, s.dim() - 1}:
            return s.but(transposed=True)
        if func in _DROPOUT:
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train", True))
            if args[0] is s and (not training or p == 0):
                return s
            if args[0] is s:
                raise DropoutActive(p)
    if func in _RESHAPE and args[0] is s:
        return _reshaped(func, args, kwargs, s)
    if func in _CAST and args[0] is s:
        dtype = _cast_dtype(func, args, kwargs, s)
        if dtype is not None:
            return s.but(dtype=dtype)
    return None


def _reshaped(func, args, kwargs, s: Scores):
    """A view that regroups the leading (batch, head) axes of the scores and keeps the last two
    (``[B*H, N, N]`` viewed as ``[B, H, N, N]``): the same view of q, k and the bias."""
    with torch._C.DisableTorchFunctionSubclass():
        shape = func(torch.empty(s.shape, device="meta"), *args[1:], **kwargs).shape
    if shape[-2:] != s.shape[-2:]:
        return None
    lead = tuple(shape[:-2])

    def regroup(t):
        return t.expand(*s.shape[:-2], *t.shape[-2:]).reshape(*lead, *t.shape[-2:])

    bias = None if s.bias is None else s.bias.expand(s.shape).reshape(shape)
    return Scores(regroup(s.q), regroup(s.k), scale=s.scale, bias=bias, probs=s.probs, dtype=s.dtype)


def _cast_dtype(func, args, kwargs, s: Scores):
    if func is Tensor.contiguous:
        return s.dtype
    if func is Tensor.float:
        return torch.float32
    if func is Tensor.half:
        return torch.float16
    if func is Tensor.bfloat16:
        return torch.bfloat16
    if func is Tensor.type_as and len(args) == 2 and isinstance(args[1], Tensor):
        return args[1].dtype
    if func is Tensor.type and len(args) == 2 and isinstance(args[1], torch.dtype) and not kwargs:
        return args[1]
    if func is Tensor.to:
        rest = list(args[1:]) + [v for k, v in kwargs.items() if k == "dtype"]
        dtypes = [x for x in rest if isinstance(x, torch.dtype)]
        tensors = [x for x in rest if isinstance(x, Tensor)]
        devices = [x for x in rest if isinstance(x, (str, torch.device))]
        if devices or kwargs.keys() - {"dtype", "copy", "non_blocking"}:
            return None
        if dtypes:
            return dtypes[0]
        if tensors:
            return tensors[0].dtype
        if not rest:
            return s.dtype
    return None


__all__ = ["MATMUL", "DropoutActive", "Scores", "handle", "has_scores", "real"]
