"""Find the attentions in an fx graph by their shape.

Every node is first seen through a canonical view (``canon``): ``@``, ``torch.matmul``,
``Tensor.matmul``, ``bmm`` and ``aten.matmul`` are all "matmul"; ``F.softmax``, ``Tensor.softmax``,
an ``nn.Softmax`` module and ``aten._softmax`` are all "softmax"; and so on. A new spelling costs
a line in ``_FUNCTIONS``, ``_METHODS`` or ``_MODULES``.

The walk then starts at each softmax over the key axis (``_match_softmax``):

* back through casts, scale (mul/div by a scalar), additive biases and ``-inf`` fills to a
  product of two activations: the score matmul ``q @ kᵀ`` (or an attention-shaped einsum);
* forward through casts and dropout to the product of the probabilities with a third
  activation ``v``.

Fused attentions are matched directly: ``F.scaled_dot_product_attention`` (``_match_sdpa``) and
``nn.MultiheadAttention`` modules (``_match_mha``).

The result of a match is an ``AttentionSite`` (what mask_fn and the report see) and a ``Match``
(the graph nodes rewrite.py needs). A site that is attention but cannot be rewritten faithfully
gets ``Match.skip`` set to the reason; it is left as it was.
"""
from __future__ import annotations

import operator
import re
import types
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten


# ------------------------------------------------------------------------------ public site
@dataclass
class AttentionSite:
    """One attention found in the graph; what ``mask_fn(site)`` receives.

    Lengths, heads and head_dim are concrete ints once known (at transform time with
    ``example_inputs``, else at the first forward); None before that.
    """

    index: int
    name: str
    kind: str  # how it is spelled: "matmul-softmax", "einsum", "sdpa" or "mha"
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    q_len: Optional[int] = None
    kv_len: Optional[int] = None
    causal: bool = False
    has_bias: bool = False
    projection: str = "?"  # where q, k, v come from: "fused qkv", "separate linears", ...
    dropout: float = 0.0
    # What it attends: "self" (queries and keys from the same tokens), "cross" (keys from other
    # tokens: an encoder's output, another tower), "window" (self-attention within windows or
    # groups folded into the batch: Swin), "learned-query" (queries are parameters: pooling heads,
    # Perceiver latents), "pooled" (keys, and maybe queries, are the same tokens pooled to another
    # length: MViTv2, PVT's spatial reduction), "channel" (the softmax runs over feature channels,
    # not tokens: XCiT, DaViT; the head dim is the token count and a token mask means nothing there)
    # or "?" when the graph does not tell. The patterns (patterns.py) apply to "self", "window" and
    # "?" sites and keep the others dense.
    role: str = "?"

    @property
    def where(self) -> str:
        """The site's module path for messages ("(root)" for attention in the model's own forward)."""
        return self.name or "(root)"

    @property
    def pattern(self) -> str:
        gqa = ", gqa" if self.num_kv_heads and self.num_heads and self.num_kv_heads < self.num_heads else ""
        return f"{self.kind} ({self.projection}{gqa})" if self.projection != "?" else f"{self.kind}{gqa}"


@dataclass
class Match:
    """The graph side of a site: what rewrite.py replaces and with what."""

    site: AttentionSite
    out: fx.Node  # the node whose value the sparse op replaces
    scores: Optional[fx.Node] = None  # q kᵀ, for the walk from a softmax
    q: Any = None  # graph values, each [..., seq, head_dim]
    k: Any = None
    v: Any = None
    k_transposed: bool = False  # k above is kᵀ: transpose it back in the rewrite
    einsum: Optional[tuple] = None  # (q_eq, k_eq, v_eq, out_eq) single-operand einsums into/out of [b,h,n,d]
    scale_terms: list = field(default_factory=list)  # (scalar, divide): scale = 1 * s0 / s1 ...
    default_scale: bool = False  # no scale given: the op's 1/sqrt(head_dim), as SDPA
    q_scales: list = field(default_factory=list)  # (tensor, divide) multiplied into q (learned temperatures)
    bias_steps: list = field(default_factory=list)  # ("add", node) / ("fill", mask, value, keep) / ("scale", s)
    causal: Any = False  # bool or a graph value
    sdpa_mask: Any = None  # SDPA's attn_mask (bool True = attend, or additive)
    mha: Optional[nn.Module] = None
    nodes: set = field(default_factory=set)  # nodes of the attention itself, erased after the rewrite
    extra_nodes: set = field(default_factory=set)  # erased too when nothing else uses them (a causal mask)
    replay: Optional[list] = None  # score-side nodes, innermost first, to recompute on zero scores
    retarget: list = field(default_factory=list)  # (node, arg index): bias helpers that read the scores' dtype
    addend: Optional[tuple] = None  # baddbmm's (input, beta): beta * input added to the scores
    split_heads: Optional[int] = None  # heads: rank-3 [B*H, N, D] operands viewed as [B, H, N, D]
    mha_fn: bool = False  # F.multi_head_attention_forward (nn.MultiheadAttention inlined by Dynamo)
    broadcast_q: bool = False  # q is computed from parameters only: expanded to k's batch
    v_transposed: bool = False  # v above is vᵀ ([.., Dv, Nk]) and the output (p @ vᵀ)ᵀ: `v @ pᵀ`
    skip: Optional[str] = None


# ------------------------------------------------------------------------------ canonical view
_FUNCTIONS = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul",
    aten.matmul.default: "matmul", aten.bmm.default: "matmul",
    torch.baddbmm: "baddbmm", aten.baddbmm.default: "baddbmm",
    F.multi_head_attention_forward: "mha_fn",
    torch.einsum: "einsum", torch.functional.einsum: "einsum", aten.einsum.default: "einsum",
    F.softmax: "softmax", torch.softmax: "softmax", torch.special.softmax: "softmax",
    aten.softmax.int: "softmax", aten._softmax.default: "softmax", aten._safe_softmax.default: "softmax",
    operator.mul: "mul", torch.mul: "mul", aten.mul.Tensor: "mul", aten.mul.Scalar: "mul",
    operator.truediv: "div", torch.div: "div", aten.div.Tensor: "div", aten.div.Scalar: "div",
    operator.add: "add", torch.add: "add", aten.add.Tensor: "add", aten.add.Scalar: "add",
    torch.masked_fill: "masked_fill", aten.masked_fill.Scalar: "masked_fill", aten.masked_fill.Tensor: "masked_fill",
    # in-place spellings (`scores /= math.sqrt(d)`: Dynamo's operator.itruediv, export's aten.div_)
    operator.imul: "mul", aten.mul_.Tensor: "mul", aten.mul_.Scalar: "mul",
    operator.itruediv: "div", aten.div_.Tensor: "div", aten.div_.Scalar: "div",
    operator.iadd: "add", aten.add_.Tensor: "add", aten.add_.Scalar: "add",
    aten.masked_fill_.Scalar: "masked_fill", aten.masked_fill_.Tensor: "masked_fill",
    torch.where: "where", aten.where.self: "where", aten.where.ScalarOther: "where", aten.where.ScalarSelf: "where",
    torch.transpose: "transpose", aten.transpose.int: "transpose",
    torch.permute: "permute", aten.permute.default: "permute",
    F.dropout: "dropout", torch.dropout: "dropout", aten.dropout.default: "dropout",
    aten._to_copy.default: "cast", aten.to.dtype: "cast", aten.to.dtype_layout: "cast", aten.type_as.default: "cast",
    aten.clone.default: "identity", aten.contiguous.default: "identity", aten.alias.default: "identity",
    F.scaled_dot_product_attention: "sdpa", aten.scaled_dot_product_attention.default: "sdpa",
    F.linear: "linear", aten.linear.default: "linear",
    torch.repeat_interleave: "repeat_interleave", aten.repeat_interleave.self_int: "repeat_interleave",
    operator.getitem: "getitem", aten.expand.default: "expand",
    aten.reshape.default: "reshape", aten.view.default: "reshape", torch.reshape: "reshape",
    aten.unsqueeze.default: "unsqueeze", torch.unsqueeze: "unsqueeze",
}
_METHODS = {
    "matmul": "matmul", "bmm": "matmul", "__matmul__": "matmul",
    "softmax": "softmax",
    "mul": "mul", "__mul__": "mul", "div": "div", "__truediv__": "div", "add": "add", "__add__": "add",
    "masked_fill": "masked_fill", "baddbmm": "baddbmm",
    "mul_": "mul", "__imul__": "mul", "div_": "div", "__itruediv__": "div", "add_": "add", "__iadd__": "add",
    "masked_fill_": "masked_fill",
    "transpose": "transpose", "permute": "permute",
    "to": "cast", "float": "cast", "half": "cast", "bfloat16": "cast", "double": "cast", "type_as": "cast",
    "type": "cast", "contiguous": "identity", "clone": "identity",
    "repeat_interleave": "repeat_interleave", "expand": "expand",
    "reshape": "reshape", "view": "reshape", "unsqueeze": "unsqueeze",
}
_MODULES = {
    nn.Softmax: "softmax", nn.Dropout: "dropout", nn.Identity: "identity",
    nn.MultiheadAttention: "mha", nn.Linear: "linear",
}
# Checks torch.export leaves on intermediates (`_assert_tensor_metadata`): not real uses.
_ASSERTIONS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, torch._assert}


def _is_assertion(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ASSERTIONS


# Functions that read only the dtype / device of the scores they are given (timm builds its
# causal bias with `attn.new_full(...)`): the rewrite hands them q instead. name -> argument index.
_READS_SCORES_DTYPE_ONLY = {"resolve_self_attn_mask": 1}
# Functions that add their second argument (which may be None at run time) to the first.
_ADDS_BIAS = {"maybe_add_mask"}
# Functions known, from reading their code, to return the scores they are given plus a term that does
# not depend on the scores' values (an additive bias, possibly written into a slice in place), by
# qualified name -> the index of the scores argument. For these alone f(scores) = scores + f(zeros):
# the rewrite calls f on zeros of the scores' shape and hands the result to the op as its bias. Any
# other function between q kᵀ and the softmax is reported, never assumed additive.
KNOWN_BIAS_FUNCTIONS = {
    # MViTv2's decomposed relative positions: einsums of q with the tables, added into the patch rows
    # and columns of the scores (`attn[:, :, sp:, sp:] = attn[...].view(...) + rel_h + rel_w`)
    "timm.models.mvitv2.cal_rel_pos_type": 0,
}


def known_bias_function(node) -> Optional[int]:
    """The scores argument's index when ``node`` calls a function of ``KNOWN_BIAS_FUNCTIONS``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    fn = node.target
    return KNOWN_BIAS_FUNCTIONS.get(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}")


def canon(node, modules: dict) -> Optional[str]:
    """The canonical name of what a node computes, or None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        name = _FUNCTIONS.get(node.target)
        if name is None and getattr(node.target, "__name__", "") in _ADDS_BIAS:
            return "add"
        return name
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op == "call_module":
        mod = modules.get(node.target)
        for cls, name in _MODULES.items():
            if type(mod) is cls:
                return name
    return None


def _arg(node: fx.Node, index: int, name: str, default=None):
    """Argument of a call, by position (counting the tensor itself as 0) or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


arg = _arg  # the public name, for the modules that rewrite what a match found


def _first_arg(node: fx.Node):
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


# ------------------------------------------------------------------------------ graph facts
class GraphFacts:
    """What the walk asks of the graph: modules, shapes, which values are activations."""

    def __init__(self, gm: fx.GraphModule, constants: Optional[dict] = None):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.constants = constants or {}  # placeholder name -> real tensor (Dynamo's parameters)
        self.activations = set()  # nodes whose value depends on a model input
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if node.name not in self.constants and not _is_param_placeholder(node):
                    self.activations.add(node)
            elif node.op != "get_attr" and any(a in self.activations for a in node.all_input_nodes):
                self.activations.add(node)

    def canon(self, node) -> Optional[str]:
        return canon(node, self.modules)

    def is_activation(self, x) -> bool:
        return isinstance(x, fx.Node) and x in self.activations

    def rank(self, x, depth: int = 8) -> Optional[int]:
        """The rank of x: from its shape metadata, else (graphs traced without shapes) from what
        computes it: bmm is rank 3, a view has its target's rank, elementwise ops keep it."""
        shape = node_shape(x)
        if shape is not None:
            return len(shape)
        if not isinstance(x, fx.Node) or depth == 0:
            return None
        if x.target in (torch.bmm, aten.bmm.default, torch.baddbmm, aten.baddbmm.default) or (
                x.op == "call_method" and x.target in ("bmm", "baddbmm")):
            return 3
        c = self.canon(x)
        if c == "reshape" and x.op == "call_method" and x.target in ("view", "reshape"):
            return len(_reshape_target(x))
        if c in ("cast", "identity", "mul", "div", "add", "masked_fill", "dropout", "softmax") and x.args:
            return self.rank(x.args[0], depth - 1)
        return None

    @staticmethod
    def shape(x) -> Optional[tuple]:
        return node_shape(x)

    def value(self, x):
        """The concrete tensor behind a get_attr (or a Dynamo parameter placeholder), else None."""
        if not isinstance(x, fx.Node):
            return None
        if x.op == "get_attr":
            obj = self.gm
            for part in x.target.split("."):
                obj = getattr(obj, part, None)
            return obj if isinstance(obj, torch.Tensor) else None
        if x.op == "placeholder":
            return self.constants.get(x.name)
        return None

    def is_scalar(self, x) -> bool:
        """A Python number, or a node computing one (`math.sqrt(k.size(-1))`, `head_dim ** -0.5`)."""
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return True
        if not isinstance(x, fx.Node):
            return False
        val = x.meta.get("val", x.meta.get("example_value"))
        if val is not None:
            return isinstance(val, (int, float, torch.SymInt, torch.SymFloat))
        if x.op == "call_method" and x.target == "size":
            return len(x.args) > 1
        if x.op == "call_function":
            if getattr(x.target, "__module__", None) == "math" or x.target in (
                operator.getitem, operator.mul, operator.truediv, operator.pow, operator.floordiv,
                operator.add, operator.sub, operator.neg,
            ):
                if x.target is operator.getitem:
                    src = x.args[0]
                    return isinstance(src, fx.Node) and (
                        (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
                        or (src.op == "call_method" and src.target == "size")
                    )
                return all(self.is_scalar(a) for a in x.args if isinstance(a, fx.Node))
        return False

    def module_path(self, node: fx.Node) -> str:
        """Qualified name of the module whose forward computes `node` (leaf modules excluded)."""
        stack = node.meta.get("nn_module_stack") or {}
        paths = [_dotted(v[0] if isinstance(v, tuple) else v) for v in stack.values()]
        if node.op == "call_module" and paths and paths[-1] == node.target:
            paths = paths[:-1]
        return paths[-1] if paths else ""


def node_shape(x) -> Optional[tuple]:
    """Shape of a node's value from its metadata (fake tensors or ShapeProp), else None."""
    if not isinstance(x, fx.Node):
        return None
    val = x.meta.get("val", x.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    tm = x.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape)
    return None


def _is_param_placeholder(node: fx.Node) -> bool:
    return "_parameters_" in node.name or "_buffers_" in node.name


def _dotted(path: str) -> str:
    """Dynamo's `L['self'].blocks[0].attn` and export's `blocks.0.attn` to `blocks.0.attn`. Dynamo names a
    module from the frame's local or global that holds the model (`L['self']`, `L['model']`, `L['args'][0]`,
    `G['model']`): that root is dropped, so names are paths inside the model, as in ``transform``."""
    path = re.sub(r"^[LG]\[['\"][^'\"]+['\"]\](\[\d+\]|\[['\"][^'\"]+['\"]\])*\.?", "", path)
    path = re.sub(r"^L__self___?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


# ------------------------------------------------------------------------------ small predicates
def _softmax_parts(n: fx.Node, facts: GraphFacts):
    """(input, dim) of a softmax node."""
    if n.op == "call_module":
        return n.args[0], facts.modules[n.target].dim
    return n.args[0], _arg(n, 1, "dim")


def _is_last_axis(dim, x, facts: GraphFacts) -> bool:
    if dim == -1:
        return True
    rank = facts.rank(x)
    return isinstance(dim, int) and rank is not None and dim == rank - 1


def _is_last_two_transpose(n, facts: GraphFacts) -> bool:
    """`x.transpose(-2, -1)`, `x.transpose(2, 3)` on 4-D, `x.permute(0, 1, 3, 2)`, `x.mT`."""
    c = facts.canon(n)
    if c == "transpose":
        dims = sorted(_normalise_dims(n.args[1:3], facts.rank(n.args[0])))
        rank = facts.rank(n.args[0])
        return dims == [-2, -1] or (rank is not None and dims == [rank - 2, rank - 1]) or (
            rank is None and dims in ([2, 3],)
        )
    if c == "permute":
        perm = n.args[1:] if len(n.args) > 2 else n.args[1]
        perm = list(perm)
        ident = list(range(len(perm)))
        return perm[:-2] == ident[:-2] and perm[-2:] == [len(perm) - 1, len(perm) - 2]
    if n.op == "call_function" and n.target is getattr and n.args[1] == "mT":
        return True
    return False


def _normalise_dims(dims, rank):
    out = []
    for d in dims:
        if isinstance(d, int) and d >= 0 and rank is not None:
            d -= rank
        out.append(d)
    return out


def _is_very_negative(value) -> bool:
    """-inf, finfo.min or a large negative constant: a masked-out score."""
    if isinstance(value, fx.Node):
        return True  # computed fill values (`torch.finfo(dtype).min`) are masks in practice
    return isinstance(value, (int, float)) and value <= -1e4


def _dropout_p(n: fx.Node, facts: GraphFacts) -> tuple:
    """(p as configured, whether it drops now) of a dropout node; p is nan when computed."""
    if n.op == "call_module":
        mod = facts.modules[n.target]
        return mod.p, mod.training and mod.p > 0
    p = _arg(n, 1, "p", 0.5)
    train = _arg(n, 2, "train" if n.target is aten.dropout.default else "training", True)
    if isinstance(train, fx.Node):
        return float("nan"), True
    if not train:  # drops nothing, whatever p is (Dynamo lifts a module's p into a graph input under dynamic=True)
        return 0.0, False
    if isinstance(p, fx.Node):
        return float("nan"), True
    return float(p), p > 0


# ------------------------------------------------------------------------------ products
@dataclass
class _Product:
    """A product over the last two axes: q @ kᵀ for scores, p @ v for the output."""

    node: fx.Node
    left: Any
    right: Any
    einsum: Optional[tuple] = None  # (left letters, right letters, out letters)
    addend: Optional[tuple] = None  # baddbmm: (input, beta, alpha)
    transposed: bool = False  # the output product is vᵀ-major: `v @ pᵀ` (EfficientViT's channels-first v)


def _product(n, facts: GraphFacts) -> Optional[_Product]:
    c = facts.canon(n)
    if c == "matmul":
        return _Product(n, n.args[0], n.args[1])
    if c == "baddbmm":  # beta * input + alpha * (batch1 @ batch2): BLOOM's ALiBi scores
        b1, b2 = _arg(n, 1, "batch1"), _arg(n, 2, "batch2")
        return _Product(n, b1, b2, addend=(n.args[0], n.kwargs.get("beta", 1), n.kwargs.get("alpha", 1)))
    if c == "einsum":
        eq, *ops = n.args
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if not isinstance(eq, str) or len(ops) != 2 or "..." in eq:
            return None
        lhs, out = eq.replace(" ", "").split("->") if "->" in eq else (eq.replace(" ", ""), None)
        a, b = lhs.split(",")
        if out is None:
            return None
        return _Product(n, ops[0], ops[1], (a, b, out))
    return None


def _score_einsum(p: _Product):
    """For scores `einsum("bhid,bhjd->bhij", q, k)`: the single-operand einsums that bring q and
    k to [batch..., seq, d] and the letters of the scores, or None if it is not attention-shaped."""
    a, b, out = p.einsum
    if len(out) < 2 or len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    *batch, i, j = out
    contracted = (set(a) & set(b)) - set(out)
    if len(contracted) != 1 or i not in a or i in b or j not in b or j in a:
        return None
    (d,) = contracted
    if set(a) != set(batch) | {i, d} or set(b) != set(batch) | {j, d}:
        return None
    batch = "".join(batch)
    return f"{a}->{batch}{i}{d}", f"{b}->{batch}{j}{d}", out


def _value_einsum(p: _Product, probs: fx.Node):
    """For the output `einsum("bhij,bhjd->bhid", p, v)`: (v's einsum to [batch..., seq, d], the
    einsum from [batch..., q, d] to the output), or None if it does not contract over the keys."""
    a, b, out = p.einsum
    if p.right is probs:
        a, b = b, a
    elif p.left is not probs:
        return None
    if len(a) < 2:
        return None
    *batch, i, j = a
    batch = "".join(batch)
    extra = set(b) - set(a)
    if len(extra) != 1 or set(b) != set(batch) | {j} | extra or j in out:
        return None
    (e,) = extra
    if set(out) != set(batch) | {i, e} or len(out) != len(batch) + 2:
        return None
    return f"{b}->{batch}{j}{e}", f"{batch}{i}{e}->{out}"


# ------------------------------------------------------------------------------ the walk
def find(gm: fx.GraphModule, constants: Optional[dict] = None) -> list[Match]:
    """Every attention in the graph, in graph order."""
    facts = GraphFacts(gm, constants)
    matches = []
    claimed = set()
    for node in list(gm.graph.nodes):
        if node in claimed:
            continue
        c = facts.canon(node)
        m = None
        if c == "softmax":
            m = _match_softmax(node, facts) or _unrewritable(node, facts)
        elif c == "sdpa":
            m = _match_sdpa(node, facts)
        elif c == "mha":
            m = _match_mha(node, facts)
        elif c == "mha_fn":
            m = _match_mha_fn(node, facts)
        elif node.op == "call_function" and node.target in _FUSED_ATTENTION:
            m = _fused_fast_path(node, facts)
        elif c is None and node.op in ("call_function", "call_module"):
            m = _opaque(node, facts)
        if m is not None:
            m.site.index = len(matches)
            if m.q is not None:
                m.site.projection = _projection(m.q, m.k, m.v, facts)
            _fill_shapes(m, facts)
            _set_role(m, facts)
            claimed |= m.nodes
            matches.append(m)
    return matches


def _match_softmax(sm: fx.Node, facts: GraphFacts) -> Optional[Match]:
    x, dim = _softmax_parts(sm, facts)
    if not _is_last_axis(dim, x, facts):
        return None  # e.g. a softmax over the query axis: not an attention over keys
    back = _walk_to_scores(x, facts)
    if back is None:
        return None
    scores, steps, nodes = back
    fwd = _walk_to_output(sm, facts)
    if fwd is None:
        return None
    out_product, dropout_p, fwd_nodes = fwd
    if out_product.addend is not None:
        return None  # baddbmm of the probabilities: not p @ v
    kind = "einsum" if scores.einsum else "matmul-softmax"
    site = AttentionSite(index=-1, name=facts.module_path(scores.node), kind=kind)
    m = Match(site=site, out=out_product.node, scores=scores.node)
    m.nodes = {sm, scores.node, out_product.node} | nodes | fwd_nodes
    m.q = scores.left
    m.broadcast_q = not facts.is_activation(scores.left)
    if scores.addend is not None:
        m.addend = scores.addend[:2]
    reshapes = [n for n in nodes | fwd_nodes if facts.canon(n) == "reshape"]
    if reshapes and scores.einsum is None:
        m.split_heads = _heads(x, reshapes, facts)
        if m.split_heads is None and _rank_changes(reshapes, facts):
            site.kind = kind
            m.skip = "the scores are reshaped between [B*H, N, N] and [B, H, N, N] with a head count the graph does not give"
    if scores.einsum:
        eqs = _score_einsum(scores)
        veqs = _value_einsum(out_product, fwd_nodes_probs(out_product, m.nodes))
        if eqs is None or veqs is None:
            return None
        m.k = scores.right
        m.v = out_product.right if out_product.left in m.nodes else out_product.left
        m.einsum = (eqs[0], eqs[1], veqs[0], veqs[1])
    else:
        right = scores.right
        if _is_last_two_transpose(right, facts) and len(right.users) == 1:
            m.k = right.args[0]
            m.nodes.add(right)
        else:
            m.k, m.k_transposed = right, True
        m.v = out_product.left if out_product.transposed else out_product.right
        m.v_transposed = out_product.transposed
    _apply_steps(m, steps, facts)
    _unrepeat_kv(m, facts)
    p, active = dropout_p
    site.dropout = p
    _check_scores_users(m, scores.node)
    if active and m.skip is None:
        m.skip = (
            f"attention dropout p={p} is active (training mode): kept as it was"
            if p == p else "attention dropout in training mode with a p computed in the graph (under dynamic=True "
            "Dynamo lifts a module's p into a graph input): kept as it was"
        )
    return m


# ------------------------------------------------------------------------------ what is not rewritten
_REASONS = [  # (ops seen between the product and the softmax, reason), first match wins
    ({"tanh"}, "a soft cap (tanh) on the scores: not a scale, bias or mask the op can apply"),
    ({"amax", "max", "sub"}, "a max subtracted from the scores by hand: the softmax input is not scale * q kᵀ + bias"),
    ({"linear", "module", "conv2d"}, "talking heads: the scores are mixed across heads by a linear layer"),
]


def _op_name(n: fx.Node, facts: GraphFacts) -> str:
    if n.op == "call_module":
        mod = facts.modules.get(n.target)
        return "linear" if isinstance(mod, nn.Linear) else "module"
    if n.op == "call_method":
        return n.target
    name = getattr(n.target, "__name__", str(n.target))
    return name.split(".")[0]


def _unrewritable(sm: fx.Node, facts: GraphFacts) -> Optional[Match]:
    """A softmax over the keys of a product of two activations, feeding a product with a third,
    that the walk could not prove to be scale * q kᵀ + bias: reported skipped with the reason."""
    x, dim = _softmax_parts(sm, facts)
    over_keys = _is_last_axis(dim, x, facts)
    scores, parent = None, {x: None}
    todo = [(x, 0)]
    while todo and scores is None:
        n, depth = todo.pop(0)
        if not isinstance(n, fx.Node) or depth > 10 or not facts.is_activation(n):
            continue
        prod = _product(n, facts)
        if prod is not None and _score_like(prod, x, facts):
            scores = prod
            break
        if prod is not None:
            continue
        for a in n.all_input_nodes:
            if a not in parent:
                parent[a] = n
                todo.append((a, depth + 1))
    if scores is None:
        return None
    back_ops = _path_ops(scores.node, parent, facts) + [_op_name(x, facts)]  # between q kᵀ and the softmax
    out, parent = None, {sm: None}
    todo = [(sm, 0)]
    while todo and out is None:
        n, depth = todo.pop(0)
        for user in n.users:
            prod = _product(user, facts)
            if prod is not None and (prod.left is n or prod.einsum is not None):
                other = prod.right if prod.left is n else prod.left
                if facts.is_activation(other) and other is not n:
                    out = prod
                    parent[user] = n
                    break
            if user not in parent and depth < 8 and prod is None:
                parent[user] = n
                todo.append((user, depth + 1))
    if out is None:
        return None
    fwd_ops = _path_ops(out.node, parent, facts)
    ops = set(back_ops)
    reason = next((r for names, r in _REASONS if names & ops), None)
    if not over_keys:
        reason = f"the softmax runs over axis {dim} of the scores, not over the keys (the last axis)"
    elif {"transpose", "permute", "mT"} & set(fwd_ops) and not {"linear", "module"} & set(fwd_ops):
        reason = reason or "the probabilities are transposed before the product with v: it contracts over the queries"
    if reason is None and {"linear", "module", "conv2d"} & set(fwd_ops):
        reason = "talking heads: the probabilities are mixed across heads by a linear layer"
    odd_back = [o for o in back_ops if o not in _PLAIN_OPS]
    odd_fwd = [o for o in fwd_ops if o not in _FORWARD_OPS]
    if reason is None and odd_back:
        reason = f"the scores pass through `{odd_back[0]}`, which is not a scale, bias or mask the op can apply"
    if reason is None and odd_fwd:
        reason = (f"the probabilities are mixed with other values (`{'`, `'.join(dict.fromkeys(odd_fwd))}`) before "
                  "the product with v")
    reason = reason or "the graph between q kᵀ, the softmax and ·v is not one the walk can prove"
    site = AttentionSite(index=-1, name=facts.module_path(scores.node), kind="matmul-softmax")
    m = Match(site=site, out=out.node, scores=scores.node, q=scores.left, skip=reason)
    if scores.einsum is None and _is_last_two_transpose(scores.right, facts):
        m.k = scores.right.args[0]
    else:
        m.k, m.k_transposed = scores.right, True
    m.v = out.right if out.left is not None and out.right is not None else None
    m.nodes = {sm}
    return m


def _path_ops(end: fx.Node, parent: dict, facts: GraphFacts) -> list:
    ops, n = [], parent.get(end)
    while n is not None:
        ops.append(_op_name(n, facts))
        n = parent.get(n)
    return ops[:-1]  # the softmax's input / the softmax itself ends the path


_PLAIN_OPS = {"mul", "div", "add", "truediv", "to", "float", "type_as", "contiguous", "clone", "view", "reshape",
              "permute", "transpose", "dropout", "masked_fill", "where", "getitem", "softmax", "_softmax",
              "__mul__", "__truediv__", "__add__", "_to_copy"}


# PyTorch's fused fast paths of nn.TransformerEncoderLayer and nn.MultiheadAttention (eval mode, no
# gradients), as torch functions (Dynamo's graphs) and as aten ops (torch.export's)
_FUSED_ATTENTION = {f for f in (getattr(torch, "_transformer_encoder_layer_fwd", None),
                                getattr(torch, "_native_multi_head_attention", None),
                                getattr(getattr(torch.ops.aten, "_transformer_encoder_layer_fwd", None), "default", None),
                                getattr(getattr(torch.ops.aten, "_native_multi_head_attention", None), "default", None))
                    if f is not None}


def _fused_fast_path(n: fx.Node, facts: GraphFacts) -> Match:
    """A fused fast path in the graph: its attention is inside one kernel, reported rather than missed."""
    site = AttentionSite(index=-1, name=facts.module_path(n), kind="fused fast path")
    return Match(site=site, out=n, nodes={n}, skip=(
        "inside PyTorch's fused fast path of nn.TransformerEncoderLayer / nn.MultiheadAttention (taken in eval "
        "mode without gradients), one kernel whose attention cannot be rewritten; call "
        "`torch.backends.mha.set_fastpath_enabled(False)` before compiling, or use `fxsparse.transform(model, "
        "mask_fn)`, whose model keeps that path off"))


def _opaque(n: fx.Node, facts: GraphFacts) -> Optional[Match]:
    """A call the trace kept whole (a `torch.fx.wrap`ped function such as torchvision's
    `shifted_window_attention`, a module a library marks as not traceable) whose name says it
    computes attention: its inside is never seen, so it is reported rather than silently missed."""
    if n.op == "call_function":
        fn = n.target
        if not isinstance(fn, types.FunctionType) or fn.__module__.startswith("torch."):
            return None
        what, name = f"the function `{fn.__name__}`", fn.__name__
    else:
        mod = facts.modules.get(n.target)
        if mod is None or len(mod._modules) == 0 and not any(True for _ in mod.parameters(recurse=False)):
            return None
        what, name = f"the module `{n.target}` ({type(mod).__name__})", type(mod).__name__
    if not re.search(r"(attention|attn)$", name, re.IGNORECASE) and not _source_has_attention(
            fn if n.op == "call_function" else type(mod)):  # not `resolve_self_attn_mask`
        return None
    site = AttentionSite(index=-1, name=facts.module_path(n) if n.op == "call_function" else n.target,
                         kind="opaque call")
    return Match(site=site, out=n, nodes={n}, skip=(
        f"inside {what}, which torch.fx keeps as one call (not traced into), so its attention is not seen; "
        "`torch.compile(model, backend=fxsparse.backend(mask_fn))` traces into it"))


def _source_has_attention(obj) -> bool:
    """Whether the Python source of a function or class computes a softmax and a matrix product
    (ConViT's GPSA, a module timm keeps whole)."""
    import inspect

    try:
        src = inspect.getsource(obj)
    except (OSError, TypeError):
        return False
    return "softmax(" in src and ("@" in src or "matmul(" in src or "einsum(" in src or "bmm(" in src)


_FORWARD_OPS = {"to", "float", "type_as", "contiguous", "clone", "view", "reshape", "dropout", "_to_copy", "module"}


def _score_like(prod: _Product, x, facts: GraphFacts) -> bool:
    """Whether a product looks like scores q kᵀ for a softmax whose input is x."""
    if not facts.is_activation(prod.right):
        return False
    if prod.einsum is not None:
        return _score_einsum(prod) is not None
    ps, xs = facts.shape(prod.node), facts.shape(x)
    if ps is not None and xs is not None:
        return ps[-1] == xs[-1]
    return _is_last_two_transpose(prod.right, facts)


# ------------------------------------------------------------------------------ roles
def _set_role(m: Match, facts: GraphFacts):
    site = m.site
    if m.mha is not None or m.mha_fn:
        n = m.out
        q, k = n.args[0], _arg(n, 1, "key")
        site.role = "learned-query" if not _from_inputs(q, facts) else ("self" if q is k else "cross")
        return
    if m.q is None or m.k is None:
        return
    if not _from_inputs(m.q, facts):
        site.role = "learned-query"
        return
    if _is_channel_attention(m, facts):
        site.role = "channel"
        d = site.head_dim
        if isinstance(d, int) and d > MAX_HEAD_DIM and m.skip is None:
            m.skip = (f"channel attention over {d} tokens (the softmax runs over feature channels, the head dim is "
                      f"the token count): more than the op's head dim limit of {MAX_HEAD_DIM}; kept as it was")
        return
    q_src, k_src = _token_source(m.q, facts), _token_source(m.k, facts)
    if q_src is None or k_src is None:
        src = _split_source(m.q, facts)
        if src is not None and src is _split_source(m.k, facts):
            # one fused projection (a module of the model's own, or a decomposed linear) split into q and k
            inputs = [a for a in src.all_input_nodes if facts.is_activation(a)]
            site.role = "window" if inputs and _windowed(inputs[0], facts) else "self"
        _pooled(m, facts, same=True)
        return
    if q_src is not k_src:
        site.role = "cross"
        _pooled(m, facts, same=False, q_src=q_src, k_src=k_src)
    else:
        site.role = "window" if _windowed(q_src, facts) else "self"
        _pooled(m, facts, same=True)


MAX_HEAD_DIM = 256  # the op's largest head dim (op.py)


def _pooled(m: Match, facts: GraphFacts, same: bool, q_src=None, k_src=None):
    """Pooled attention: keys (and maybe queries) are the same tokens pooled to another length (MViTv2,
    PVT's and Twins' spatial reduction, EfficientViT's, NextViT's): q_len != kv_len, and the keys are
    computed from the tokens the queries came from."""
    site = m.site
    if not (isinstance(site.q_len, int) and isinstance(site.kv_len, int)) or site.q_len == site.kv_len:
        return
    if (same and (_pools(m.q, facts) or _pools(m.k, facts))) or (
            not same and _derives_from(k_src, q_src, facts) and _pools(k_src, facts, stop=q_src)):
        site.role = "pooled"  # not a KV cache (keys concatenated to past keys): that stays "self"


_POOLING = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d,
            nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _strided(stride) -> bool:
    strides = stride if isinstance(stride, (tuple, list)) else (stride,)
    return any(not isinstance(t, int) or t > 1 for t in strides)


def _pools(x, facts: GraphFacts, stop=None, limit: int = 40) -> bool:
    """Whether x passes a pooling (a strided convolution, a pooling, a max over a window) on its way
    back to the projection that made it (a linear or an unstrided convolution) or to ``stop``."""
    todo, seen = [x], set()
    while todo and len(seen) < limit:
        n = todo.pop(0)
        if not isinstance(n, fx.Node) or n in seen or n is stop or n.op == "placeholder" or \
                facts.canon(n) == "linear":
            continue
        seen.add(n)
        mod = facts.modules.get(n.target) if n.op == "call_module" else None
        name = _op_name(n, facts) if n.op != "call_module" else ""
        if isinstance(mod, nn.Linear):
            continue
        if isinstance(mod, _POOLING) or name.startswith("conv"):
            stride = getattr(mod, "stride", 2) if mod is not None else _arg(n, 3, "stride", 1)
            if isinstance(mod, _POOLING[3:]) or _strided(stride):
                return True
            continue  # an unstrided convolution: a projection
        if re.search(r"pool|interpolate|^a?max$", name):
            return True
        todo.extend(a for a in n.all_input_nodes if facts.is_activation(a) and not facts.is_scalar(a))
    return False


def _derives_from(x, src, facts: GraphFacts, limit: int = 60) -> bool:
    """Whether x is computed from src within a few ops (a pooling, a strided conv, a norm, views)."""
    todo, seen = [x], set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if n is src:
            return True
        if not isinstance(n, fx.Node) or n in seen or n.op == "placeholder":
            continue
        seen.add(n)
        todo.extend(a for a in n.all_input_nodes if facts.is_activation(a))
    return False


def _from_inputs(x, facts: GraphFacts, limit: int = 200) -> bool:
    """Whether x is computed from a model input's values (not only from parameters and sizes)."""
    todo, seen = [x], set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen or not facts.is_activation(n):
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        if facts.is_scalar(n) or (n.op == "call_function" and n.target is getattr):
            continue  # sizes: `probe.expand(x.shape[0], ...)` is still the probe
        todo.extend(n.all_input_nodes)
    return len(seen) >= limit


def _split_source(x, facts: GraphFacts, depth: int = 20):
    """The first node above x that is not a view, a split or a scalar scale."""
    for _ in range(depth):
        if not isinstance(x, fx.Node):
            return None
        c = facts.canon(x)
        if c in _VIEWS or (c in ("mul", "div") and facts.is_scalar(x.args[1])) or _op_name(x, facts) in (
                "unbind", "split", "chunk", "split_with_sizes", "tensor_split", "flatten", "squeeze", "select"):
            x = x.args[0]
        else:
            return x
    return None


def _token_source(x, facts: GraphFacts):
    """The input of the projection that made x (a Linear's input), or None."""
    lin = _source_linear(x, facts)
    if lin is None:
        return None
    return lin.args[0] if lin.args else None


def _windowed(x, facts: GraphFacts, depth: int = 12) -> bool:
    """Tokens regrouped into windows folded into the batch (Swin): a view that changes the
    leading size on the way back from the projection's input."""
    for _ in range(depth):
        if not isinstance(x, fx.Node):
            return False
        c = facts.canon(x)
        if c == "reshape":
            a, b = facts.shape(x.args[0]), facts.shape(x)
            if a is not None and b is not None and a[0] != b[0]:
                return True
        if c not in _VIEWS and not (x.op in ("call_method", "call_function") and _op_name(x, facts) in (
                "roll", "pad", "contiguous", "flatten", "view")):
            return False
        x = x.args[0]
    return False


def _is_channel_attention(m: Match, facts: GraphFacts) -> bool:
    """q's contracted axis is the tokens of the tensor its projection read: XCiT, DaViT."""
    lin, x = None, m.q
    for _ in range(40):  # back through views and one-input ops (F.normalize, a scale) to the projection
        if not isinstance(x, fx.Node):
            break
        if facts.canon(x) == "linear" or (x.op == "call_module" and isinstance(facts.modules.get(x.target), nn.Linear)):
            lin = x
            break
        acts = [a for a in x.all_input_nodes if facts.is_activation(a) and not facts.is_scalar(a)]
        if len(acts) != 1 or x.op == "placeholder":
            break
        x = acts[0]
    qs, ls = facts.shape(m.q), facts.shape(lin) if lin is not None else None
    if qs is None or ls is None or len(ls) < 3 or m.einsum is not None:
        return False
    tokens = ls[-2]
    return qs[-1] == tokens and qs[-2] != tokens


def fwd_nodes_probs(out_product: _Product, nodes: set):
    """The probabilities operand of the output product."""
    return out_product.left if out_product.left in nodes else out_product.right


def _walk_to_scores(x, facts: GraphFacts):
    """Back from the softmax input to the score product. Returns (product, steps, nodes) where
    steps (innermost first) say how the scores were scaled, biased and masked."""
    steps, chain = [], []
    cur = x
    for _ in range(64):
        if not isinstance(cur, fx.Node):
            return None
        prod = _product(cur, facts)
        if prod is not None:
            if not facts.is_activation(prod.right):
                return None  # keys from parameters: a gate or a classifier, not q kᵀ
            if prod.einsum is not None and _score_einsum(prod) is None:
                return None
            steps.reverse()
            chain.reverse()
            if prod.addend is not None:
                _, beta, alpha = prod.addend
                if not (facts.is_scalar(beta) and facts.is_scalar(alpha)):
                    return None
                if alpha != 1:
                    steps.insert(0, ("scale", alpha, False))
            if any(step[0] in ("reshape", "known") for step in steps) or prod.addend is not None:
                steps.append(("replay", chain))
            return prod, steps, set(chain)
        c = facts.canon(cur)
        chain.append(cur)
        known = known_bias_function(cur)
        if known is not None and len(cur.args) > known:
            steps.append(("known", cur))  # replayed on zero scores (rewrite.py)
            cur = cur.args[known]
        elif c in ("cast", "identity"):
            cur = _first_arg(cur)
        elif c in ("mul", "div"):
            a, b = cur.args[0], cur.args[1]
            if c == "mul" and not _leads_to_scores(a, facts):
                a, b = b, a
            if facts.is_activation(b) and not facts.is_scalar(b):
                return None  # multiplied by another activation: a gate, not a scale
            steps.append(("scale", b, c == "div"))
            cur = a
        elif c == "add":
            a, b = cur.args[0], cur.args[1]
            if not _leads_to_scores(a, facts):
                a, b = b, a
            if not (isinstance(b, (int, float)) and not isinstance(b, bool)):
                steps.append(("add", b))  # a Python number added to every score does nothing under softmax
            cur = a
        elif c == "masked_fill":
            fill_mask, value = _arg(cur, 1, "mask"), _arg(cur, 2, "value")
            steps.append(("fill", fill_mask, value, False))
            cur = cur.args[0]
        elif c == "where":
            cond, a, b = cur.args[0], cur.args[1], cur.args[2]
            if _leads_to_scores(a, facts):
                steps.append(("fill", cond, b, True))
                cur = a
            else:
                steps.append(("fill", cond, a, False))
                cur = b
        elif c == "reshape" and _regroups_leading_axes(cur, facts):
            steps.append(("reshape",))  # Swin's shifted windows: `attn.view(-1, nW, H, N, N) + mask`
            cur = cur.args[0]
        else:
            return None
    return None


def _regroups_leading_axes(n: fx.Node, facts: GraphFacts) -> bool:
    """A reshape of the scores that keeps the (query, key) axes and regroups the ones before."""
    shape = _reshape_target(n)
    src, out = node_shape(n.args[0]), node_shape(n)
    if src is not None and out is not None:
        return len(out) >= 3 and src[-2:] == out[-2:]
    # without shapes: a view that names its last two sizes, or leaves only the last one to infer
    # (`view(B, self.num_heads, q_len, -1)` of bmm's [B*H, q_len, kv_len])
    return len(shape) >= 3 and not (isinstance(shape[-2], int) and shape[-2] == -1)


def _reshape_target(n: fx.Node) -> tuple:
    return tuple(n.args[1:] if len(n.args) > 2 or not isinstance(n.args[1], (list, tuple)) else n.args[1])


def _heads(x, reshapes: list, facts: GraphFacts) -> Optional[int]:
    """The head count H of scores viewed as [B, H, N, N]: from the softmax input's shape, else from
    a 4-D view among the reshapes whose head entry is a plain int (`view(B, self.num_heads, N, N)`)."""
    shape = facts.shape(x)
    if shape is not None:
        return int(shape[-3]) if len(shape) == 4 and isinstance(shape[-3], int) else None
    for n in reshapes:
        target = _reshape_target(n)
        if len(target) == 4 and isinstance(target[1], int) and target[1] > 0:
            return target[1]
    return None


def _rank_changes(reshapes: list, facts: GraphFacts) -> bool:
    for n in reshapes:
        rank = facts.rank(n.args[0])
        if rank is None or rank != len(_reshape_target(n)):
            return True
    return False


def _leads_to_scores(x, facts: GraphFacts, depth: int = 16) -> bool:
    """Whether walking back through score-side ops from x reaches a product of two activations."""
    for _ in range(depth):
        if not isinstance(x, fx.Node):
            return False
        prod = _product(x, facts)
        if prod is not None:
            return facts.is_activation(prod.right)
        c = facts.canon(x)
        if known_bias_function(x) is not None:
            x = x.args[known_bias_function(x)]
        elif c in ("cast", "identity", "mul", "div", "masked_fill", "reshape"):
            x = x.args[0]
        elif c == "add":
            return _leads_to_scores(x.args[0], facts, depth - 1) or _leads_to_scores(x.args[1], facts, depth - 1)
        elif c == "where":
            return _leads_to_scores(x.args[1], facts, depth - 1) or _leads_to_scores(x.args[2], facts, depth - 1)
        else:
            return False
    return False


def _walk_to_output(sm: fx.Node, facts: GraphFacts):
    """Forward from the softmax through casts and dropout to `probs @ v`.
    Returns (product, (dropout p, active), nodes) or None. Other uses of the probabilities
    (returned as attention weights) do not stop the walk: the site is then reported skipped."""
    nodes, p = set(), (0.0, False)
    cur = sm
    for _ in range(16):
        step = None
        for user in cur.users:
            prod = _product(user, facts)
            if prod is not None and (prod.einsum is not None or prod.left is cur):
                other = prod.right if prod.left is cur else prod.left
                if not facts.is_activation(other):
                    return None  # probabilities times a parameter: a gate (mixture of experts)
                if prod.einsum is not None and _value_einsum(prod, cur) is None:
                    return None  # contracts over the queries: transposed probabilities
                return prod, p, nodes
            if step is None and (facts.canon(user) in ("cast", "identity", "dropout") or (
                    facts.canon(user) == "reshape" and _regroups_leading_axes(user, facts))):
                step = user  # a view to bmm's [B*H, N, N] (DeBERTa, BLOOM) keeps the (query, key) axes
            if _is_last_two_transpose(user, facts) and len(user.users) == 1:
                prod = _product(next(iter(user.users)), facts)
                if prod is not None and prod.einsum is None and prod.right is user and prod.left is not cur \
                        and facts.is_activation(prod.left):
                    prod.transposed = True  # v [.., Dv, Nk] @ pᵀ [.., Nk, Nq]: (p @ vᵀ)ᵀ, over the keys
                    return prod, p, nodes | {user}
        if step is None:
            return None  # v @ p, pᵀ @ v, ...: not an attention over keys
        if facts.canon(step) == "dropout":
            p = _dropout_p(step, facts)
        nodes.add(step)
        cur = step
    return None


def _apply_steps(m: Match, steps: list, facts: GraphFacts):
    """Turn the score steps (innermost first) into the op's scale, bias and causal arguments:
    scores = scale * (q kᵀ) + bias, where a scale applied after a bias scales the bias too."""
    for step in steps:
        if step[0] == "scale":
            _, s, divide = step
            if facts.is_scalar(s):
                m.scale_terms.append((s, divide))
            else:
                m.q_scales.append((s, divide))  # a tensor (learned temperature): folded into q
            if m.bias_steps:
                m.bias_steps.append(step)
        elif step[0] == "add":
            m.bias_steps.append(step)
            m.site.has_bias = True
            fn_name = getattr(step[1].target, "__name__", "") if isinstance(step[1], fx.Node) else ""
            if fn_name in _READS_SCORES_DTYPE_ONLY:
                m.retarget.append((step[1], _READS_SCORES_DTYPE_ONLY[fn_name]))
        elif step[0] == "replay":
            # reshapes among the steps: rewrite.py recomputes the steps on zero scores instead
            m.replay = step[1]
            m.bias_steps = []
            m.causal = m.site.causal = False
            m.site.has_bias = True
        elif step[0] == "fill":
            _, fill_mask, value, keep = step
            if not _is_very_negative(value):
                m.skip = m.skip or f"scores filled with {value!r}, which is not a mask value"
            elif not keep and _is_causal_tril_mask(fill_mask, facts):
                m.causal = m.site.causal = True
                m.extra_nodes |= _mask_expression_nodes(fill_mask)
            else:
                m.bias_steps.append(step)
                m.site.has_bias = True


def _is_causal_tril_mask(mask, facts: GraphFacts) -> bool:
    """`buf[:, :, :T, :T] == 0` (or `~buf.bool()`) where buf holds a lower-triangular block of ones:
    nanoGPT's causal mask, which the op's `causal=True` replaces."""
    if not isinstance(mask, fx.Node):
        return False
    c = mask.target
    if mask.op == "call_function" and c in (operator.eq, torch.eq, aten.eq.Scalar) or (
        mask.op == "call_method" and c == "eq"
    ):
        if mask.args[1] != 0:
            return False
        src = mask.args[0]
    elif (mask.op == "call_function" and c in (operator.invert, torch.logical_not, aten.logical_not.default)) or (
        mask.op == "call_method" and c in ("logical_not", "__invert__")
    ):
        src = mask.args[0]
        if isinstance(src, fx.Node) and src.op == "call_method" and src.target == "bool":
            src = src.args[0]
    else:
        return False
    index = ()
    if isinstance(src, fx.Node) and (
        (src.op == "call_function" and src.target is operator.getitem)
    ):
        src, index = src.args
        index = index if isinstance(index, tuple) else (index,)
    buf = facts.value(src)
    if buf is None or buf.dim() < 2:
        return False
    if not all(isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1) for s in index):
        return False
    if len(index) > buf.dim() or any(s != slice(None) for s in index[: max(0, len(index) - 2)]):
        return False
    tail = index[-2:] if len(index) >= 2 else (slice(None),) * 2
    if len(index) >= 2 and (tail[0].stop is None) != (tail[1].stop is None):
        return False
    mat = buf.reshape(-1, *buf.shape[-2:])
    ones = torch.ones_like(mat[0], dtype=torch.bool).tril()
    return bool(((mat != 0) == ones).all())


def _mask_expression_nodes(mask: fx.Node) -> set:
    nodes, todo = set(), [mask]
    while todo:
        n = todo.pop()
        if isinstance(n, fx.Node) and n.op != "placeholder" and n not in nodes:
            nodes.add(n)
            todo.extend(a for a in n.args if isinstance(a, fx.Node))
    return {n for n in nodes if n.op in ("call_function", "call_method", "get_attr") and n.target != "size"}


def _check_scores_users(m: Match, scores: fx.Node):
    """The scores and probabilities may feed only the walk itself (and helpers that read just
    the scores' dtype): otherwise removing them would change the model."""
    retarget = {n for n, _ in m.retarget}
    if m.replay is None and not m.bias_steps:
        for user in list(scores.users):
            chain = _slice_add(user, scores)
            if chain is not None:  # replayed on zero scores (rewrite.py): the bias it adds
                m.replay = chain
                m.nodes |= set(chain)
                m.site.has_bias = True
                break
    for n in list(m.nodes - {m.out}):
        writer = next((u for u in n.users if u not in m.nodes and _writes_into(u, n)), None)
        if writer is not None:
            m.skip = m.skip or (f"the scores are written into in place (`{writer.name}`: a slice assigned, as "
                                "MViTv2 adds its relative positions); the walk cannot turn that into a bias")
        for user in list(n.users):
            dead = _dead_nodes(user)
            if _is_assertion(user):
                m.nodes.add(user)  # erased with the attention
            elif dead:
                m.nodes |= dead  # e.g. nn.MultiheadAttention's averaged weights when nothing reads them
            elif user not in m.nodes and user not in retarget:
                m.skip = m.skip or f"an intermediate of the attention (`{n.name}`) is also used by `{user.name}`"


def _slice_add(writer: fx.Node, scores: fx.Node) -> Optional[list]:
    """`s[idx] = (s[idx].view(...) + t + ...).view(...)` with no t computed from s: a term added into a
    slice of the scores (MViTv2's relative positions, as Dynamo traces timm's `cal_rel_pos_type`). The
    nodes of the write in graph order (the write last), or None when it is anything else."""
    if writer.op != "call_function" or writer.target is not operator.setitem or len(writer.args) != 3 \
            or writer.args[0] is not scores:
        return None
    idx, x = writer.args[1], writer.args[2]
    chain = [writer]
    order = {n: i for i, n in enumerate(scores.graph.nodes)}
    for _ in range(16):
        if not isinstance(x, fx.Node) or (chain[-1] is not writer and len(x.users) != 1):
            return None
        chain.append(x)
        if x.op == "call_function" and x.target is operator.getitem and x.args[0] is scores:
            if x.args[1] != idx:
                return None
            return sorted(chain, key=order.__getitem__)
        name = x.target if x.op == "call_method" else getattr(x.target, "__name__", "")
        if name in ("view", "reshape"):
            x = x.args[0]
        elif name in ("add", "__add__") and len(x.args) == 2 and not x.kwargs:
            a, b = x.args
            if _computed_from(b, scores, order):
                a, b = b, a
            if _computed_from(b, scores, order):
                return None
            x = a
        else:
            return None
    return None


def _computed_from(x, node: fx.Node, order: dict, limit: int = 400) -> bool:
    """Whether x depends on node (nodes before node in the graph cannot: the search stops there)."""
    todo, seen = [x], set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if n is node:
            return True
        if isinstance(n, fx.Node) and n not in seen and order.get(n, -1) > order[node]:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return len(seen) >= limit


def _dead_nodes(node: fx.Node, depth: int = 8) -> set:
    """The node and everything computed from it, if none of it reaches the output or mutates
    anything; else the empty set."""
    if depth == 0 or node.op not in ("call_function", "call_method") or _mutates(node):
        return set()
    out = {node}
    for user in node.users:
        dead = _dead_nodes(user, depth - 1)
        if not dead:
            return set()
        out |= dead
    return out


def _writes_into(user: fx.Node, n: fx.Node) -> bool:
    """Whether user (or a view of n it starts) assigns into n's memory."""
    todo, seen = [user], 0
    while todo and seen < 16:
        u = todo.pop()
        seen += 1
        if _mutates(u) and not _is_assertion(u) and u.args and u.args[0] is not None:
            return True
        name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "").split(".")[0]
        if u.op in ("call_function", "call_method") and name in ("getitem", "view", "slice", "narrow"):
            todo.extend(u.users)
    return False


def _mutates(node: fx.Node) -> bool:
    t = node.target
    if node.op == "call_method":
        return t.endswith("_") and not t.endswith("__") or t in ("__setitem__", "__iadd__", "__imul__", "__itruediv__")
    if t in (operator.setitem, operator.iadd, operator.imul, operator.itruediv) or _is_assertion(node):
        return True
    schema = getattr(t, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _unrepeat_kv(m: Match, facts: GraphFacts):
    """Pass GQA's un-repeated k and v: the op shares kv heads itself."""
    if m.einsum is not None:
        return
    k0, k_nodes = _unrepeat(m.k, facts)
    v0, v_nodes = _unrepeat(m.v, facts)
    if k0 is not None and v0 is not None and not m.k_transposed:
        m.k, m.v = k0, v0
        m.nodes |= k_nodes | v_nodes


def _unrepeat(x, facts: GraphFacts):
    """`x[:, :, None].expand(B, Hkv, n, N, D).reshape(B, Hkv * n, N, D)` or
    `x.repeat_interleave(n, dim=1)` -> (x, nodes); else (None, None)."""
    if not isinstance(x, fx.Node) or len(x.users) != 1:
        return None, None
    c = facts.canon(x)
    if c == "repeat_interleave":
        dim = _arg(x, 2, "dim")
        if dim in (1, -3):
            return x.args[0], {x}
        return None, None
    if c != "reshape":
        return None, None
    shape = x.args[1:] if len(x.args) > 2 or not isinstance(x.args[1], (list, tuple)) else x.args[1]
    if len(shape) != 4:
        return None, None
    ex = x.args[0]
    if facts.canon(ex) != "expand" or len(ex.users) != 1:
        return None, None
    src = ex.args[0]
    if isinstance(src, fx.Node) and facts.canon(src) == "getitem" and len(src.users) == 1:
        idx = src.args[1]
        if isinstance(idx, tuple) and len(idx) >= 3 and idx[0] == slice(None) and idx[1] == slice(None) and idx[2] is None:
            return src.args[0], {x, ex, src}
    if isinstance(src, fx.Node) and facts.canon(src) == "unsqueeze" and len(src.users) == 1 and _arg(src, 1, "dim") == 2:
        return src.args[0], {x, ex, src}
    return None, None


def _match_sdpa(n: fx.Node, facts: GraphFacts) -> Match:
    q, k, v = n.args[0], _arg(n, 1, "key"), _arg(n, 2, "value")
    attn_mask = _arg(n, 3, "attn_mask")
    dropout_p = _arg(n, 4, "dropout_p", 0.0)
    is_causal = _arg(n, 5, "is_causal", False)
    scale = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
    site = AttentionSite(index=-1, name=facts.module_path(n), kind="sdpa")
    m = Match(site=site, out=n, q=q, k=k, v=v, causal=is_causal, sdpa_mask=attn_mask)
    if scale is None:
        m.default_scale = True
    else:
        m.scale_terms.append((scale, False))
    m.nodes = {n}
    site.causal = is_causal is True
    site.has_bias = attn_mask is not None
    if isinstance(dropout_p, fx.Node):
        m.skip = "attention dropout with a computed p: kept as it was"
    elif dropout_p > 0:
        site.dropout = float(dropout_p)
        m.skip = f"attention dropout p={dropout_p} is active (training mode): kept as it was"
    _unrepeat_kv(m, facts)
    return m


def _match_mha(n: fx.Node, facts: GraphFacts) -> Match:
    mod = facts.modules[n.target]
    site = AttentionSite(index=-1, name=n.target, kind="mha", num_heads=mod.num_heads,
                         num_kv_heads=mod.num_heads, head_dim=mod.head_dim)
    site.projection = "fused qkv" if mod._qkv_same_embed_dim else "separate linears"
    m = Match(site=site, out=n, mha=mod, default_scale=True)
    m.nodes = {n}
    key_padding_mask = _arg(n, 3, "key_padding_mask")
    attn_mask = _arg(n, 5, "attn_mask")
    site.has_bias = key_padding_mask is not None or attn_mask is not None
    site.causal = _arg(n, 7, "is_causal", False) is True and attn_mask is None
    for user in n.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0):
            if user.op == "call_function" and user.target is operator.getitem and not user.users:
                continue
            m.skip = "the attention weights it returns are used"
    if mod.bias_k is not None or mod.add_zero_attn:
        m.skip = m.skip or "add_bias_kv / add_zero_attn is not supported"
    site.dropout = mod.dropout
    if mod.training and mod.dropout > 0:
        m.skip = m.skip or f"attention dropout p={mod.dropout} is active (training mode): kept as it was"
    return m


def mha_fn_args(n: fx.Node) -> dict:
    """The arguments of a ``F.multi_head_attention_forward`` call, by name (defaults filled in)."""
    import inspect

    bound = inspect.signature(F.multi_head_attention_forward).bind(*n.args, **n.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _match_mha_fn(n: fx.Node, facts: GraphFacts) -> Match:
    """``F.multi_head_attention_forward``: what Dynamo leaves of ``nn.MultiheadAttention``."""
    a = mha_fn_args(n)
    heads = a["num_heads"]
    embed = a["embed_dim_to_check"]
    site = AttentionSite(index=-1, name=facts.module_path(n), kind="mha", num_heads=heads, num_kv_heads=heads,
                         head_dim=embed // heads if isinstance(embed, int) and isinstance(heads, int) else None)
    site.projection = "separate linears" if a["use_separate_proj_weight"] else "fused qkv"
    m = Match(site=site, out=n, default_scale=True, mha_fn=True)
    m.nodes = {n}
    site.has_bias = a["key_padding_mask"] is not None or a["attn_mask"] is not None
    site.causal = a["is_causal"] is True and a["attn_mask"] is None
    for user in n.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0) \
                and not _dead_nodes(user):
            m.skip = "the attention weights it returns are used"
    if a["bias_k"] is not None or a["add_zero_attn"] is True or a["static_k"] is not None:
        m.skip = m.skip or "add_bias_kv / add_zero_attn / static k, v is not supported"
    p, training = a["dropout_p"], a["training"]
    if not isinstance(p, (int, float)) or not isinstance(training, bool):
        m.skip = m.skip or "attention dropout with a computed p or mode: kept as it was"
    elif training and p > 0:
        site.dropout = float(p)
        m.skip = m.skip or f"attention dropout p={p} is active (training mode): kept as it was"
    q_shape, k_shape = facts.shape(a["query"]), facts.shape(a["key"])
    if q_shape is not None and k_shape is not None and len(q_shape) == 3:  # (seq, batch, embed)
        site.q_len, site.kv_len = _hinted(q_shape)[0], _hinted(k_shape)[0]
    return m


# ------------------------------------------------------------------------------ report facts
def _projection(q, k, v, facts: GraphFacts) -> str:
    """Where q, k and v come from, for the report."""
    srcs = [_source_linear(x, facts) for x in (q, k, v)]
    if any(s is None for s in srcs):
        return "?"
    kinds = {facts.canon(s) for s in srcs}
    if srcs[0] is srcs[1] is srcs[2]:
        return "fused qkv"
    if srcs[1] is srcs[2]:
        return "q + fused kv"
    return "functional linears" if kinds == {"linear"} and srcs[0].op == "call_function" else "separate linears"


_VIEWS = {"reshape", "permute", "transpose", "getitem", "cast", "identity", "expand", "unsqueeze", "repeat_interleave"}


def _source_linear(x, facts: GraphFacts, depth: int = 40):
    """Walk back from q/k/v through views, splits, norms and RoPE to the projection."""
    for _ in range(depth):
        if not isinstance(x, fx.Node):
            return None
        c = facts.canon(x)
        if c == "linear":
            return x
        if x.op == "call_method" and x.target in ("unbind", "split", "chunk", "tensor_split", "flatten", "squeeze"):
            x = x.args[0]
        elif x.op == "call_function" and getattr(x.target, "__name__", "") in ("unbind", "split", "chunk"):
            x = x.args[0]
        elif c in _VIEWS or c in ("mul", "div", "add") or x.op == "call_module":
            acts = [a for a in x.all_input_nodes if facts.is_activation(a)]
            if not acts:
                return None
            x = acts[0]
        else:
            return None
    return None


def _fill_shapes(m: Match, facts: GraphFacts):
    """Heads, head_dim and lengths from shape metadata, when the graph has it."""
    site = m.site
    if m.mha is not None:
        return
    q_shape, k_shape = facts.shape(m.q), facts.shape(m.k)
    if q_shape is None or k_shape is None:
        return
    if m.einsum is not None:
        q_shape = _einsum_shape(m.einsum[0], q_shape)
        k_shape = _einsum_shape(m.einsum[1], k_shape)
    elif m.k_transposed:
        k_shape = k_shape[:-2] + (k_shape[-1], k_shape[-2])
    q_shape, k_shape = _hinted(q_shape), _hinted(k_shape)
    if not all(isinstance(s, int) for s in q_shape + k_shape):
        return
    site.q_len, site.head_dim = q_shape[-2], q_shape[-1]
    site.kv_len = k_shape[-2]
    site.num_heads = q_shape[-3] if len(q_shape) >= 4 else 1
    site.num_kv_heads = k_shape[-3] if len(k_shape) >= 4 else 1


def _hinted(shape: tuple) -> tuple:
    """Dynamic sizes (torch.export with automatic dynamic shapes) as the example's values."""
    out = []
    for s in shape:
        if isinstance(s, torch.SymInt):
            hint = getattr(s.node, "hint", None)
            s = int(hint) if hint is not None else s
        out.append(s)
    return tuple(out)


def _einsum_shape(eq: str, shape: tuple) -> tuple:
    src, dst = eq.split("->")
    sizes = dict(zip(src, shape))
    return tuple(sizes[c] for c in dst)


def flops(site: AttentionSite) -> Optional[float]:
    """Dense attention FLOPs of one sample: q kᵀ and p v, 2 * 2 * H * Nq * Nk * D."""
    if None in (site.num_heads, site.q_len, site.kv_len, site.head_dim):
        return None
    return 4.0 * site.num_heads * site.q_len * site.kv_len * site.head_dim


__all__ = ["AttentionSite", "Match", "find", "canon", "flops"]
