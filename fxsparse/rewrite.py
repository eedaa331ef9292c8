"""Rewrite matched attentions in a graph into calls of their site modules.

Each rewritten site becomes a call of a ``SiteAttention`` module (``site.py``) named
``fxsparse_site_<index>``: in a graph Dynamo hands ``fxsparse.backend``, or in an owner's own graph
(``owner.py``, whose generated code runs with the owner as ``self``). The site's own scale, bias,
masks and causality are computed in the graph by the small functions below, so the rewritten code
reads like the model's (``fxsparse.owner.rewritten_code(sparse)`` prints it).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx

from . import match
from .match import Match
from .site import SiteAttention, _to_bias, is_transformed, reuse_last, site_modules  # noqa: F401  (re-exported)


# ------------------------------------------------------------------------------ graph helpers
# Small functions the rewritten graph calls; each keeps `None` meaning "no bias yet".
def add_bias(bias, term):
    """bias + term (timm's `maybe_add_mask` may hand None)."""
    if term is None:
        return bias
    return term if bias is None else bias + term


def fill_bias(bias, mask, value, keep, like):
    """The additive form of `scores.masked_fill(mask, value)` (keep=False) or
    `torch.where(mask, scores, value)` (keep=True)."""
    masked = ~mask if keep else mask
    base = like.new_zeros(()) if bias is None else bias
    return torch.where(masked, torch.as_tensor(value, dtype=base.dtype, device=base.device), base)


def zero_scores(q, k, addend=None, beta=1, writable=False):
    """Zeros shaped like the scores q kᵀ, with no memory behind them (``writable``: a tensor of
    their own, for functions that write into the scores in place); plus ``beta * addend`` (the input
    of ``baddbmm``) when given."""
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    if writable:
        zeros = q.new_zeros(*lead, q.shape[-2], k.shape[-2])
    else:
        zeros = q.new_zeros(()).expand(*lead, q.shape[-2], k.shape[-2])
    return zeros if addend is None else zeros + (addend if beta == 1 else beta * addend)


def split_heads(x, heads):
    """bmm's [B*H, N, D] as [B, H, N, D] (a view); 4-D tensors as they are."""
    return x.unflatten(0, (-1, heads)) if x.dim() == 3 else x


def merge_heads(out, v):
    """The op's [B, H, N, D] output back to bmm's [B*H, N, D] when v came in that way."""
    return out.flatten(0, 1) if v.dim() == 3 and out.dim() == 4 else out


def broadcast_query(q, k):
    """Queries computed from parameters (a pooling head's probe) expanded to the keys' batch."""
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    return q.expand(*lead, *q.shape[-2:])


def scale_bias(bias, s, divide):
    if bias is None:
        return None
    return bias / s if divide else bias * s


def mha_heads(query, key, value, num_heads, batch_first, in_proj_weight, in_proj_bias,
              q_proj_weight=None, k_proj_weight=None, v_proj_weight=None):
    """nn.MultiheadAttention's input projections, as q, k, v of shape [B, H, N, D]."""
    if query.dim() != 3:
        raise ValueError("fxsparse: unbatched nn.MultiheadAttention inputs are not supported")
    if not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    if q_proj_weight is None:
        wq, wk, wv = in_proj_weight.chunk(3)
    else:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)

    def heads(x, w, b):
        y = F.linear(x, w, b)
        return y.unflatten(-1, (num_heads, -1)).transpose(1, 2)

    return heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv)


def mha_mask(key_padding_mask, attn_mask, like):
    """nn.MultiheadAttention's masks (bool: True = may NOT attend; or additive) as one mask as SDPA's
    ``attn_mask`` takes it: bool (True = may attend) where every mask given is bool, so the site can
    fold it into the exact layout of the padding (blocks of padded keys skipped, no bias), else
    additive. Every layer of a model gets the same object for the same masks (`site.reuse_last`), so
    the site folds it once."""
    B, H, nq, _ = like.shape
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.reshape(B, H, nq, -1)
    given = [m for m in (key_padding_mask, attn_mask) if m is not None]
    if not given:
        return None
    if all(m.dtype == torch.bool for m in given):
        return reuse_last(_LAST_KEEP, (key_padding_mask, attn_mask), lambda: _may_attend(key_padding_mask, attn_mask))
    bias = None
    if attn_mask is not None:
        bias = _not_attend_to_bias(attn_mask, like)
    if key_padding_mask is not None:
        kpm = _not_attend_to_bias(key_padding_mask, like)[:, None, None, :]
        bias = kpm if bias is None else bias + kpm
    return bias


_LAST_KEEP: dict = {}  # the last bool masks of nn.MultiheadAttention turned into one (`reuse_last`'s cache)


def _may_attend(key_padding_mask, attn_mask):
    keep = None if attn_mask is None else ~attn_mask
    if key_padding_mask is not None:
        keys = ~key_padding_mask[:, None, None, :]
        keep = keys if keep is None else keep & keys
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    return keep


def _not_attend_to_bias(mask, like):
    return mask.to(like.dtype) if mask.dtype != torch.bool else _to_bias(~mask, like)


def mha_output(out, batch_first, out_proj_weight, out_proj_bias):
    """[B, H, N, D] -> nn.MultiheadAttention's (output, None)."""
    y = F.linear(out.transpose(1, 2).flatten(-2), out_proj_weight, out_proj_bias)
    return (y if batch_first else y.transpose(0, 1)), None


# ------------------------------------------------------------------------------ the rewrite
def rewrite(gm: fx.GraphModule, matches: list[Match], mask_fn: Callable) -> list[Match]:
    """Replace every rewritable match by its site module; returns the skipped matches."""
    skipped = []
    for m in matches:
        if m.skip is not None:
            skipped.append(m)
            continue
        module = SiteAttention(m.site, mask_fn)
        name = f"fxsparse_site_{m.site.index}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(m.out):
            if m.mha is not None:
                new = _emit_mha(gm, m, name)
            elif m.mha_fn:
                new = _emit_mha_fn(gm, m, name)
            else:
                new = _emit_attention(gm, m, name)
        m.out.replace_all_uses_with(new)
        _erase(gm.graph, m)
    gm.graph.lint()
    gm.recompile()
    return skipped


def _emit_attention(gm: fx.GraphModule, m: Match, name: str) -> fx.Node:
    g = gm.graph
    q, k, v = m.q, m.k, m.v
    if m.einsum is not None:
        q_eq, k_eq, v_eq, out_eq = m.einsum
        q = g.call_function(torch.einsum, (q_eq, q))
        k = g.call_function(torch.einsum, (k_eq, k))
        v = g.call_function(torch.einsum, (v_eq, v))
    elif m.k_transposed:
        k = g.call_method("transpose", (k, -2, -1))
    if m.v_transposed:
        v = g.call_method("transpose", (v, -2, -1))
    q0, k0 = q, k  # the product's own operands: the replayed scores have its shape
    if m.broadcast_q:
        q = g.call_function(broadcast_query, (q, k))
    if m.split_heads is not None:
        q, k, v = (g.call_function(split_heads, (x, m.split_heads)) for x in (q, k, v))
    for s, divide in m.q_scales:
        q = g.call_function(operator.truediv if divide else operator.mul, (q, s))
    for helper, index in m.retarget:
        args = list(helper.args)
        args[index] = m.q
        helper.args = tuple(args)
    bias = None
    for step in m.bias_steps:
        if step[0] == "add":
            bias = g.call_function(add_bias, (bias, step[1]))
        elif step[0] == "fill":
            _, fill_mask, value, keep = step
            bias = g.call_function(fill_bias, (bias, fill_mask, value, keep, q))
        else:
            bias = g.call_function(scale_bias, (bias, step[1], step[2]))
    if m.replay is not None:
        bias = _emit_replay(g, m, q0, k0)
    kwargs = {"bias": bias, "scale": _emit_scale(g, m), "causal": m.causal}
    if m.sdpa_mask is not None:  # SDPA's attn_mask, bool or additive, as it is: the site takes either
        kwargs = dict(kwargs, bias=None, mask=m.sdpa_mask)
    out = g.call_module(name, (q, k, v), kwargs)
    if m.einsum is not None:
        out = g.call_function(torch.einsum, (out_eq, out))
    if m.split_heads is not None:
        out = g.call_function(merge_heads, (out, m.v))
    if m.v_transposed:
        out = g.call_method("transpose", (out, -2, -1))
    return out


def _emit_replay(g: fx.Graph, m: Match, q, k):
    """The score steps recomputed on zero scores: their result is the additive bias."""
    addend = m.addend or (None, 1)
    # functions known to add a bias, and slices assigned (`s[idx] = s[idx] + t`), write into the zeros
    writes = [n for n in m.replay if match.known_bias_function(n) is not None or n.target is operator.setitem]
    env = {m.scores: g.call_function(zero_scores, (q, k) + tuple(addend) + (bool(writes),))}
    for node in m.replay:
        env[node] = new = g.node_copy(node, lambda n: env.get(n, n))
        new.target = _OUT_OF_PLACE.get(new.target, new.target)  # the zeros are a broadcast view
    m.site.has_bias = True
    last = m.replay[-1] if m.replay else m.scores
    return env[m.scores if last.target is operator.setitem else last]


_aten = torch.ops.aten
_OUT_OF_PLACE = {
    operator.imul: operator.mul, operator.itruediv: operator.truediv, operator.iadd: operator.add,
    _aten.mul_.Tensor: _aten.mul.Tensor, _aten.mul_.Scalar: _aten.mul.Scalar,
    _aten.div_.Tensor: _aten.div.Tensor, _aten.div_.Scalar: _aten.div.Scalar,
    _aten.add_.Tensor: _aten.add.Tensor, _aten.add_.Scalar: _aten.add.Scalar,
    _aten.masked_fill_.Scalar: _aten.masked_fill.Scalar, _aten.masked_fill_.Tensor: _aten.masked_fill.Tensor,
    "mul_": "mul", "__imul__": "__mul__", "div_": "div", "__itruediv__": "__truediv__", "add_": "add", "__iadd__": "__add__",
    "masked_fill_": "masked_fill",
}


def _emit_scale(g: fx.Graph, m: Match):
    if m.default_scale:
        return None
    scale = 1.0
    for s, divide in m.scale_terms:
        if isinstance(s, (int, float)) and isinstance(scale, float):
            scale = scale / s if divide else scale * s
        else:
            scale = g.call_function(operator.truediv if divide else operator.mul, (scale, s))
    return scale


def _emit_mha(gm: fx.GraphModule, m: Match, name: str) -> fx.Node:
    g, n, mod = gm.graph, m.out, m.mha
    query, key, value = n.args[0], match.arg(n, 1, "key"), match.arg(n, 2, "value")
    key_padding_mask = match.arg(n, 3, "key_padding_mask")
    attn_mask = match.arg(n, 5, "attn_mask")

    def attr(field):
        return g.get_attr(f"{n.target}.{field}") if getattr(mod, field, None) is not None else None

    if mod._qkv_same_embed_dim:
        proj = (attr("in_proj_weight"), attr("in_proj_bias"))
    else:
        proj = (None, attr("in_proj_bias"), attr("q_proj_weight"), attr("k_proj_weight"), attr("v_proj_weight"))
    heads = g.call_function(mha_heads, (query, key, value, mod.num_heads, mod.batch_first) + proj)
    q, k, v = (g.call_function(operator.getitem, (heads, i)) for i in range(3))
    mask = None
    if key_padding_mask is not None or attn_mask is not None:
        mask = g.call_function(mha_mask, (key_padding_mask, attn_mask, q))
    out = g.call_module(name, (q, k, v), {"mask": mask})
    out_w, out_b = g.get_attr(f"{n.target}.out_proj.weight"), None
    if mod.out_proj.bias is not None:
        out_b = g.get_attr(f"{n.target}.out_proj.bias")
    return g.call_function(mha_output, (out, mod.batch_first, out_w, out_b))


def _emit_mha_fn(gm: fx.GraphModule, m: Match, name: str) -> fx.Node:
    """``F.multi_head_attention_forward`` (inputs and output (seq, batch, embed)) as the op."""
    g, a = gm.graph, match.mha_fn_args(m.out)
    if a["use_separate_proj_weight"]:
        proj = (None, a["in_proj_bias"], a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
    else:
        proj = (a["in_proj_weight"], a["in_proj_bias"])
    heads = g.call_function(mha_heads, (a["query"], a["key"], a["value"], a["num_heads"], False) + proj)
    q, k, v = (g.call_function(operator.getitem, (heads, i)) for i in range(3))
    mask = None
    if a["key_padding_mask"] is not None or a["attn_mask"] is not None:
        mask = g.call_function(mha_mask, (_bool_origin(a["key_padding_mask"]), _bool_origin(a["attn_mask"]), q))
    out = g.call_module(name, (q, k, v), {"mask": mask})
    return g.call_function(mha_output, (out, False, a["out_proj_weight"], a["out_proj_bias"]))


def _bool_origin(node):
    """The bool mask a float mask node was made from by F._canonical_mask (nn.MultiheadAttention's
    ``zeros_like(mask, dtype=float).masked_fill_(mask, -inf)``, which Dynamo's graph holds), so the
    site gets the bool one; any other node as it is."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "masked_fill_"
            and len(node.args) == 3 and not node.kwargs):
        return node
    zeros, source, value = node.args
    readers = (F.multi_head_attention_forward, mha_mask)  # nothing else reads it, or writes it after the fill
    only_read = all(u.op == "call_function" and u.target in readers for u in node.users)
    fresh_zeros = (isinstance(zeros, fx.Node) and zeros.op == "call_function" and zeros.target is torch.zeros_like
                   and zeros.args[:1] == (source,) and len(zeros.users) == 1)
    # masked_fill_ takes bool masks only; the fresh zeros of the source's shape are filled once, with -inf
    return source if only_read and fresh_zeros and value == float("-inf") else node


def _erase(graph: fx.Graph, m: Match):
    """Erase the attention's own nodes, and any of their inputs left unused."""
    todo = list(m.nodes | m.extra_nodes)
    candidates = set(todo)
    while todo:
        changed = False
        for node in list(todo):
            if not node.users:
                inputs = node.all_input_nodes
                graph.erase_node(node)
                todo.remove(node)
                changed = True
                for i in inputs:
                    if i not in candidates and _is_pure_view(i) and not i.users:
                        candidates.add(i)
                        todo.append(i)
        if not changed:
            break


def _is_pure_view(node: fx.Node) -> bool:
    return node.op in ("call_method", "call_function") and match.canon(node, {}) in (
        "transpose", "permute", "cast", "identity", "getitem", "expand", "reshape", "unsqueeze",
    )


# ------------------------------------------------------------------------------ layouts for the backend
def prepare_sites(gm: fx.GraphModule, matches: list[Match], device_of: Callable, *, static: bool = False):
    """Lengths are known (example inputs, or a Dynamo graph): call mask_fn now and build the Layouts.
    A site whose lengths are not known waits for its first forward; with ``static`` (the compiler
    backend, which cannot wait) lengths that are not plain ints are an error."""
    for m in matches:
        s = m.site
        if m.skip is not None:
            continue
        if m.mha is not None:
            _mha_shapes(m)
        values = (s.num_heads, s.num_kv_heads, s.q_len, s.kv_len, s.head_dim)
        if None in values:
            continue
        if not all(isinstance(v, int) for v in values):
            if static:
                raise ValueError(f"{s.where}: sequence lengths are dynamic in this graph; fxsparse builds one "
                                 "layout per length, so compile with `dynamic=False`")
            continue
        gm.get_submodule(f"fxsparse_site_{s.index}").prepare(*values, device_of(m))


def _mha_shapes(m: Match):
    n, mod = m.out, m.mha
    qs = match.node_shape(n.args[0])
    ks = match.node_shape(match.arg(n, 1, "key"))
    if qs is None or ks is None or len(qs) != 3:
        return
    seq = 1 if mod.batch_first else 0
    m.site.q_len, m.site.kv_len = qs[seq], ks[seq]

