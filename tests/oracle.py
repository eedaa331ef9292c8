"""An oracle for "the original model with a token mask applied to each attention".

While the ORIGINAL, unmodified model runs inside ``MaskedAttention(mask_fn, model)``, every
attention it computes is recomputed here in float64 with the mask applied:

- a softmax over the last axis of a tensor of 3 or more dims (``Tensor.softmax``, ``torch.softmax``,
  ``F.softmax``, ``nn.Softmax``) is taken to be an attention softmax over scores
  ``[..., q_len, kv_len]``: the models the tests run it on have no other such softmax;
- ``F.scaled_dot_product_attention`` is computed from its definition;
- ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls) is computed from its
  definition, for the options ``nn.MultiheadAttention`` uses by default.

The mask's True means "may attend": False scores become -inf before the softmax. A query row
left with no attendable key (all its scores -inf) outputs 0, as fxsparse's op does.

``mask_fn(site) -> None | bool [q_len, kv_len] | bool [H, q_len, kv_len]`` gets an
``OracleSite`` (index in call order, name of the innermost running module, kind, num_heads,
q_len, kv_len); None leaves that attention as the model computes it (still in float64).
``oracle.sites`` lists every attention seen. A per-head mask needs scores with a head axis
(``[B, H, q, kv]``); bmm-style ``[B*H, q, kv]`` scores take ``[q, kv]`` masks only.
This file does not import fxsparse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module
from torch.overrides import TorchFunctionMode

_SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}


@dataclass
class OracleSite:
    index: int
    name: str
    kind: str            # "softmax", "sdpa" or "mha"
    num_heads: int | None
    q_len: int
    kv_len: int


class MaskedAttention(TorchFunctionMode):
    def __init__(self, mask_fn=None, model: torch.nn.Module | None = None):
        super().__init__()
        self.mask_fn = mask_fn
        self.sites: list[OracleSite] = []
        self._names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self._stack: list[torch.nn.Module] = []
        self._hooks = []

    # -- module names: a stack of the modules whose forward is running --------------------------
    def __enter__(self):
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
        # the module whose forward holds the attention; an nn.Softmax leaf is not that module
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
        assert mask.dtype == torch.bool and mask.shape[-2:] == (q_len, kv_len), \
            f"{site.name}: mask {tuple(mask.shape)} {mask.dtype}, want bool [..., {q_len}, {kv_len}]"
        return mask.to(device)

    # -- interception -----------------------------------------------------------------------------
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

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        if dropout_p > 0:
            raise NotImplementedError("oracle: attention dropout is random; run in eval mode")
        q_len, kv_len = q.shape[-2], k.shape[-2]
        mask = self._mask_for("sdpa", q.shape[-3] if q.dim() >= 3 else None, q_len, kv_len,
                              q.device)
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
            raise NotImplementedError("oracle: this nn.MultiheadAttention configuration")
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


def _masked_softmax(scores, mask):
    """Softmax over the last axis of float64 ``scores`` with False of ``mask`` excluded; rows
    with every score -inf output 0."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1)
    return p.masked_fill(empty, 0.0)
