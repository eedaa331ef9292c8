"""Float64 oracles for sparse attention, and the one way fxsparse's tests compare outputs.

Everything here is written from the definition of attention and imports nothing else from fxsparse,
so it can judge fxsparse's answers (the tests and ``examples/`` use it):

- :func:`dense_attention` is ``softmax(q kᵀ · scale + bias, restricted to a mask) v`` in float64 for
  the op's arguments (``fxsparse.sparse_attention``).
- :class:`MaskedAttention` runs the *original* model with a mask applied at each of its attentions,
  recomputed in float64; :func:`masked_forward` wraps it for one call of a model.
- :func:`assert_close` and :func:`relative_error` compare a result with an oracle; :data:`TOLERANCES`
  holds the op's tolerances per dtype; :func:`compare_with_oracle` checks an attention function's
  output and gradients against :func:`dense_attention`.

Conventions shared with fxsparse: a mask's True means "may attend"; a query row left with no
allowed key (its mask all False, or every allowed score -inf) outputs 0 and passes no gradient;
``causal`` is top-left aligned as in ``scaled_dot_product_attention`` (``torch.ones(Nq, Nk).tril()``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module
from torch.overrides import TorchFunctionMode

__all__ = [
    "TOLERANCES", "MaskedAttention", "OracleSite", "assert_close", "compare_with_oracle", "dense_attention",
    "masked_forward", "relative_error",
]

# Tolerances of fxsparse.sparse_attention against dense_attention, as (output, gradients), in the
# measure of relative_error. float64 gradients are float32-accurate only: the op keeps the rows'
# log-sum-exp in float32.
TOLERANCES = {
    torch.float64: (1e-10, 1e-6),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}


# -- comparison -----------------------------------------------------------------------------------

def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got − want| / max |want|``, in float64 (the plain ``max |got − want|`` when want is all 0).

    Why this measure: the error is taken element by element, so a mistake confined to one block, one
    row or one head (what a block-sparse kernel or a wrong mask gets wrong) counts in full; a norm of
    the whole difference, ``‖got − want‖ / ‖want‖``, would dilute it by the square root of the
    tensor's size and let a small wrong block pass in a large output. Dividing by the output's
    largest magnitude, not by each element's, makes the tolerance independent of the inputs' scale
    while elements near zero (softmax tails, the zeros of rows with no allowed key) cannot blow the
    ratio up as an element-wise relative error would. A NaN anywhere gives NaN.
    """
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    return err / scale if scale > 0 else err


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5, what: str = "output") -> None:
    """Assert equal shapes, finite values and ``relative_error(got, want) <= tol``; ``what`` names the
    compared thing in the message."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values"
    err = relative_error(got, want)
    assert err <= tol, f"{what}: off by {err:.2e} of the largest magnitude (tolerance {tol:.1e})"


# -- the op's oracle ------------------------------------------------------------------------------

def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last axis with the False of ``mask`` excluded; rows whose scores are all -inf
    give 0 (and, differentiated, gradient 0)."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def dense_attention(q, k, v, mask=None, *, scale=None, bias=None, causal=False) -> torch.Tensor:
    """``softmax(q kᵀ · scale + bias, restricted to mask) v`` in float64: [B, H, Nq, Dv] float64.

    q [B, H, Nq, D], k [B, Hkv, Nk, D] and v [B, Hkv, Nk, Dv] (kv heads repeated for grouped-query
    attention; Dv may differ from D), ``mask`` bool and broadcastable to [B, H, Nq, Nk], ``bias``
    additive, ``scale`` 1/√D by default. It is differentiable: ``torch.autograd.grad`` through it
    gives gradients for the original q, k, v, bias.
    """
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.double()
    allowed = torch.ones(b, h, nq, nk, dtype=torch.bool, device=q.device)
    if mask is not None:
        allowed = allowed & mask.to(q.device)
    if causal:
        allowed = allowed & torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
    return torch.matmul(_masked_softmax(scores, allowed), v)


def compare_with_oracle(fn, q, k, v, mask=None, *, op_mask=None, scale=None, bias=None, causal=False, seed=0,
                        tols=None) -> torch.Tensor:
    """Run the attention function ``fn(q, k, v, mask, scale=, bias=, causal=)`` and :func:`dense_attention`
    on the same leaves; assert the output and the gradient of every leaf that requires one.

    ``mask`` is the bool token mask the oracle applies; ``fn`` gets ``op_mask`` when given (for
    example a Layout built from that mask), else ``mask``. ``tols`` = (output, gradients) replaces the
    dtype's :data:`TOLERANCES`. The output's gradient is random (seeded by ``seed``). Returns fn's output.
    """
    named = [(n, t) for n, t in zip(("q", "k", "v", "bias"), (q, k, v, bias)) if t is not None and t.requires_grad]
    out = fn(q, k, v, mask if op_mask is None else op_mask, scale=scale, bias=bias, causal=causal)
    want = dense_attention(q, k, v, mask, scale=scale, bias=bias, causal=causal)
    fwd_tol, grad_tol = tols or TOLERANCES[q.dtype]
    assert out.dtype == q.dtype, f"output: dtype {out.dtype}, expected {q.dtype}"
    assert_close(out, want, fwd_tol, "output")
    if not named:
        return out
    leaves = [t for _, t in named]
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    got_grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    want_grads = torch.autograd.grad(want, leaves, dout)
    for (name, leaf), g, w in zip(named, got_grads, want_grads):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, f"grad {name}: {tuple(g.shape)} {g.dtype}"
        assert_close(g, w, grad_tol, f"grad {name}")
    return out


# -- the model's oracle ---------------------------------------------------------------------------

_SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}


@dataclass
class OracleSite:
    """One attention the original model computed, as :class:`MaskedAttention` saw it."""
    index: int                # in call order
    name: str                 # the innermost running module (an nn.Softmax leaf is skipped)
    kind: str                 # "softmax", "sdpa" or "mha"
    num_heads: int | None     # None where the scores have no head axis
    q_len: int
    kv_len: int


class MaskedAttention(TorchFunctionMode):
    """While the original, unmodified model runs inside ``with MaskedAttention(mask_fn, model):``, every
    attention it computes is recomputed in float64 with ``mask_fn``'s mask applied, and its result is
    cast back to the model's dtype:

    - a softmax over the last axis of a tensor of 3 or more dims (``Tensor.softmax``, ``torch.softmax``,
      ``F.softmax``, ``nn.Softmax``) is taken to be an attention softmax over scores
      ``[..., q_len, kv_len]``: run it only on models that have no other such softmax;
    - ``F.scaled_dot_product_attention`` is computed from its definition (dropout refused: run in eval);
    - ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls) is computed from its
      definition, for the options ``nn.MultiheadAttention`` uses by default.

    ``mask_fn(site) -> None | bool [q_len, kv_len] | bool [H, q_len, kv_len]`` receives an
    :class:`OracleSite`; None leaves that attention as the model computes it (in float64). A returned
    object with a ``to_mask()`` method (a ``fxsparse.Layout``, what fxsparse's patterns return) stands
    for the token mask that method gives. A per-head
    mask needs scores with a head axis ([B, H, q, kv]); bmm-style [B*H, q, kv] scores take [q, kv]
    masks only. ``model`` (optional) names the sites; ``.sites`` lists every attention seen.
    """

    def __init__(self, mask_fn: Callable | None = None, model: torch.nn.Module | None = None):
        super().__init__()
        self.mask_fn = mask_fn
        self.sites: list[OracleSite] = []
        self._names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self._stack: list[torch.nn.Module] = []
        self._hooks = []

    def __enter__(self):
        # module names: a stack of the modules whose forward is running
        def enter(mod, args):
            self._stack.append(mod)

        def leave(mod, args, out):      # returns None: the output is left as it is
            self._stack.pop()
        self._hooks = [_module.register_module_forward_pre_hook(enter),
                       _module.register_module_forward_hook(leave)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def _current_name(self) -> str:
        for m in reversed(self._stack):
            if not isinstance(m, torch.nn.Softmax):
                return self._names.get(id(m), "?")
        return ""

    def _mask_for(self, kind, num_heads, q_len, kv_len, device):
        site = OracleSite(len(self.sites), self._current_name(), kind, num_heads, q_len, kv_len)
        self.sites.append(site)
        mask = self.mask_fn(site) if self.mask_fn is not None else None
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) and callable(getattr(mask, "to_mask", None)):
            mask = mask.to_mask()                  # a Layout: its exact token mask, [Bl, Hl, q_len, kv_len]
            while mask.dim() > 2 and mask.shape[0] == 1:
                mask = mask[0]
        if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape[-2:] == (q_len, kv_len)):
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{site.name}: mask_fn returned {got}; the oracle takes a bool tensor "
                             f"[..., {q_len}, {kv_len}], a Layout or None")
        return mask.to(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAXES:
            out = self._softmax(func, args, kwargs)
            if out is not None:
                return out
        elif func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        elif func is F.multi_head_attention_forward:
            return self._mha(*args, **kwargs)
        return func(*args, **kwargs)

    def _softmax(self, func, args, kwargs):
        x = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        dtype_pos = 3 if func is F.softmax else 2
        dtype = args[dtype_pos] if len(args) > dtype_pos else kwargs.get("dtype")
        if dim is None or x.dim() < 3 or dim not in (-1, x.dim() - 1):
            return None
        num_heads = x.shape[-3] if x.dim() == 4 else None
        mask = self._mask_for("softmax", num_heads, x.shape[-2], x.shape[-1], x.device)
        return _masked_softmax(x.double(), mask).to(dtype or x.dtype)

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p > 0:
            raise NotImplementedError("MaskedAttention: attention dropout is random; run the model in eval mode")
        q_len, kv_len = q.shape[-2], k.shape[-2]
        mask = self._mask_for("sdpa", q.shape[-3] if q.dim() >= 3 else None, q_len, kv_len, q.device)
        qd, kd, vd = q.double(), k.double(), v.double()
        if q.dim() >= 3 and kd.shape[-3] != qd.shape[-3]:         # grouped-query attention
            kd = kd.repeat_interleave(qd.shape[-3] // kd.shape[-3], dim=-3)
            vd = vd.repeat_interleave(qd.shape[-3] // vd.shape[-3], dim=-3)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = qd @ kd.transpose(-2, -1) * scale
        if is_causal:   # SDPA's alignment: query i sees keys j <= i
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        scores = _add_model_mask(scores, attn_mask)
        return (_masked_softmax(scores, mask) @ vd).to(q.dtype)

    def _mha(self, query, key, value, embed_dim_to_check, num_heads, in_proj_weight,
             in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight,
             out_proj_bias, training=True, key_padding_mask=None, need_weights=True,
             attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
             k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
             average_attn_weights=True, is_causal=False):
        # is_causal is only a hint in nn.MultiheadAttention: attn_mask holds the causal mask
        if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None \
                or static_v is not None or (training and dropout_p > 0) or query.dim() != 3:
            raise NotImplementedError("MaskedAttention: this nn.MultiheadAttention configuration (bias_k/v, "
                                      "add_zero_attn, static_k/v, dropout in training, or unbatched input)")
        L, N, E = query.shape
        S, H, hd = key.shape[0], num_heads, E // num_heads
        if use_separate_proj_weight:
            wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
        else:
            wq, wk, wv = in_proj_weight.chunk(3)
        bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None,) * 3

        def heads(x, w, b, n):      # [n, N, E] -> [N, H, n, hd]
            y = x.double() @ w.double().T + (0 if b is None else b.double())
            return y.reshape(n, N, H, hd).permute(1, 2, 0, 3)
        q, k, v = heads(query, wq, bq, L), heads(key, wk, bk, S), heads(value, wv, bv, S)
        mask = self._mask_for("mha", H, L, S, query.device)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        if attn_mask is not None:          # [L, S] or [N * H, L, S]; bool True = masked OUT
            am = attn_mask.reshape(N, H, L, S) if attn_mask.dim() == 3 else attn_mask
            am = ~am if am.dtype == torch.bool else am
            scores = _add_model_mask(scores, am)
        if key_padding_mask is not None:   # [N, S]; bool True = padding
            kpm = key_padding_mask[:, None, None, :]
            kpm = ~kpm if kpm.dtype == torch.bool else kpm
            scores = _add_model_mask(scores, kpm)
        p = _masked_softmax(scores, mask)
        out = (p @ v).permute(2, 0, 1, 3).reshape(L, N, E)
        out = out @ out_proj_weight.double().T
        if out_proj_bias is not None:
            out = out + out_proj_bias.double()
        weights = None
        if need_weights:
            weights = (p.mean(1) if average_attn_weights else p).to(query.dtype)
        return out.to(query.dtype), weights


def _add_model_mask(scores, model_mask):
    """The model's own mask: bool (True = may attend) or additive float."""
    if model_mask is None:
        return scores
    if model_mask.dtype == torch.bool:
        return scores.masked_fill(~model_mask, float("-inf"))
    return scores + model_mask.double()


def masked_forward(model: torch.nn.Module, args: tuple, mask_fn: Callable | None = None):
    """``model(*args)`` computed in float64 (a copy of the model and of its floating-point tensor
    arguments) under ``MaskedAttention(mask_fn)``, without gradients. Returns ``(output, sites)``: the
    model's output in float64 and the :class:`OracleSite` of each attention it ran. ``model`` is not
    changed."""
    m64 = copy.deepcopy(model).double()
    args64 = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    with torch.no_grad(), MaskedAttention(mask_fn, m64) as oracle:
        out = m64(*args64)
    return out, oracle.sites
