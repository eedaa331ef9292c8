"""The modules that hold attention sites, rewritten in place of the user's own.

``transform`` finds sites in a graph of the whole model, then gives each site to the smallest
module whose forward computes all of it: its *owner* (timm's ``Attention``, HF's
``LlamaAttention``, a user's block). Only owners change; every other module stays the user's
object and Python code. An owner keeps its class as a base (``isinstance`` holds, attributes and
methods stay) and gains the site modules as children ``fxsparse_site_<k>``; its forward runs
the original code with the attention redirected to those site modules, by one of three routes:

* **redirect** (sites that are ``scaled_dot_product_attention`` or ``nn.MultiheadAttention``):
  the original forward runs under a ``TorchFunctionMode`` that hands the k-th SDPA (or
  ``multi_head_attention_forward``) call of that forward to the k-th site module. Nothing is
  traced, so any argument works: KV caches, optional masks, any shape.
* **discover** (modules a library marks as not traceable, such as timm's cached-bias attention):
  the graph never looked inside them, so their attentions become sites at their first call, by
  the run-time rules of the other two routes.
* **graph** (matmul-softmax and einsum sites): the owner's forward is traced with torch.fx once
  per *call signature* (which arguments are tensors, the values of the others, train/eval), the
  attention in that graph is rewritten, and the generated code runs with ``self`` being the
  owner, so parameters are looked up at call time (FSDP2 swaps them in and out). Where fx cannot
  trace the forward (data-dependent Python, cache objects among the arguments), the original code
  runs with the scores deferred (``deferred.py``): ``q @ kᵀ`` is held, not computed, until the
  product with ``v`` hands all of it to the site.

Both routes are plain Python that Dynamo inlines: ``torch.compile(sparse)`` sees the op.
"""
from __future__ import annotations

import functools
import operator
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from . import capture, deferred, match, rewrite
from .site import SiteAttention, SiteError

_REDIRECTED = {F.scaled_dot_product_attention: "sdpa", F.multi_head_attention_forward: "mha"}
_MASK_STEPS = (torch.zeros_like, torch.Tensor.masked_fill_)  # F._canonical_mask's, watched by the redirect


class OwnerState:
    """What an owner keeps besides its own attributes: its path, sites, route and traced graphs."""

    def __init__(self, path: str, sites: list, kinds: list, route: str):
        self.path = path
        self.sites = sites  # per match of this owner, in graph order: site module name, or None (skipped)
        self.kinds = kinds  # per match: "sdpa", "mha", "matmul-softmax", "einsum"
        self.route = route  # "redirect", "graph" or "discover"
        self.mask_fn = None  # "discover": sites are made at their first call, with this mask_fn
        self.next_index = None  # "discover": a shared counter [n] for the report's site numbers
        self.options = None  # "discover": the KernelOptions of the sites it makes
        self.graphs: dict = {}  # call signature -> generated forward function
        self.code: dict = {}  # call signature -> the rewritten forward's Python source

    def __getstate__(self):  # traced graphs are rebuilt on first use (deepcopy, pickle)
        state = dict(self.__dict__)
        state["graphs"], state["code"] = {}, {}
        return state


# ------------------------------------------------------------------------------ owner classes
_CLASSES: dict = {}


def owner_class(base: type) -> type:
    """``base`` with its forward redirected to the sites; one class per base, so pickling works."""
    if base in _CLASSES:
        return _CLASSES[base]

    @functools.wraps(base.forward)
    def forward(self, *args, **kwargs):
        return _owner_forward(self, base, args, kwargs)

    def __reduce_ex__(self, protocol):
        return _rebuild_owner, (base, self.__dict__)

    cls = type(base.__name__, (base,), {
        "forward": forward, "__reduce_ex__": __reduce_ex__, "__module__": base.__module__,
        "__qualname__": base.__qualname__, "_fxsparse_base": base,
    })
    _CLASSES[base] = cls
    return cls


def _rebuild_owner(base: type, state: dict):
    obj = object.__new__(owner_class(base))
    obj.__dict__.update(state)
    return obj


def make_owner(module: nn.Module, state: OwnerState, site_modules: dict) -> None:
    """Turn ``module`` (already the transform's own copy) into an owner of ``site_modules``."""
    for name, site in site_modules.items():
        module.add_module(name, site)
    module.__dict__["_fxsparse_owner"] = state
    module.__class__ = owner_class(type(module))


def owner_state(module: nn.Module) -> Optional[OwnerState]:
    return module.__dict__.get("_fxsparse_owner")


def _owner_forward(self, base: type, args, kwargs):
    state = self.__dict__["_fxsparse_owner"]
    if state.route == "discover":
        return _deferred_forward(self, base, state, args, kwargs)
    if state.route == "redirect":
        return _redirected_forward(self, base, state, args, kwargs)
    return _graph_forward(self, base, state, args, kwargs)


def _redirected_forward(self, base: type, state: OwnerState, args, kwargs, defer: bool = False):
    """The owner's own forward with its attentions handed to its sites (scores deferred or not)."""
    mode = _Redirect(self, state, defer)  # not `with ... as mode`: Dynamo binds `as` to another object
    with mode:
        out = base.forward(self, *args, **kwargs)
    _check_all_ran(state, mode)
    return out


def _check_all_ran(state: OwnerState, mode: "_Redirect"):
    """Every site of the owner must have run through its site module: a mask silently not
    applied is the one thing this library must never do."""
    if mode.counter[0] == len(state.sites) or state.route == "discover":
        return
    why = f" ({', '.join(sorted(set(mode.materialized)))} used the attention scores)" if mode.materialized else ""
    raise SiteError(
        f"{state.path or '(root)'}: this forward computed {mode.counter[0]} of the {len(state.sites)} attention(s) that the "
        f"model's graph showed through fxsparse{why}, so mask_fn would not be applied; this call takes another path "
        "through the module's code than the one fxsparse captured (for example another attention implementation or "
        "a fused fast path). Transform the model as it is called, or keep these sites dense (mask_fn returns None)")


# ------------------------------------------------------------------------------ redirect route
class _Redirect(TorchFunctionMode):
    """Hands the k-th SDPA / multi-head attention call of one owner's forward to its k-th site."""

    def __init__(self, owner: nn.Module, state: OwnerState, defer: bool = False):
        super().__init__()
        # counts live in a list: Dynamo traces this mode, and follows mutation of a list it was given
        self.owner = owner
        self.state = state
        self.counter = [0]
        self.defer = defer
        self.materialized: list = []  # functions that needed deferred scores for real
        self.zeros: dict = {}  # id -> (float zeros made like a bool mask, its version)
        self.made_from: dict = {}  # id -> (float mask, its version, the bool mask it was made from, that one's version)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.defer:
            try:
                result = deferred.handle(func, args, kwargs, self._attention)
            except deferred.DropoutActive as err:
                raise SiteError(
                    f"{self.state.path or '(root)'}: attention dropout p={err.args[0]} is active in training mode; "
                    "the sparse op has no dropout: set the attention dropout to 0, or call `.eval()`") from None
            if result is not NotImplemented:
                if deferred.has_scores(args, kwargs) and not isinstance(result, deferred.Scores) and \
                        func not in deferred.MATMUL:
                    self.materialized.append(getattr(func, "__name__", str(func)))
                return result
        if func in _MASK_STEPS and not torch.compiler.is_compiling():
            return self._mask_step(func, args, kwargs)
        kind = _REDIRECTED.get(func)
        if kind is None:
            return func(*args, **kwargs)
        k = self.counter[0]
        self.counter[0] += 1
        sites = self.state.sites
        if k >= len(sites) and self.state.route == "discover":
            # nn.MultiheadAttention's inputs come before its projections: one tensor for query and key is
            # self-attention, two are cross-attention (which patterns keep dense)
            role = ("self" if args[0] is args[1] else "cross") if kind == "mha" and len(args) > 1 else "?"
            self._discover(kind, role, self._mha_name(args, kwargs) if kind == "mha" else None)
        if k >= len(sites) or sites[k] is None or self.state.kinds[k] != kind:
            return func(*args, **kwargs)
        site = getattr(self.owner, sites[k])
        if kind == "sdpa":
            return _sdpa_to_site(site, *args, **kwargs)
        return _mha_to_site(site, *args, bool_mask=self._bool_source, **kwargs)

    def _mask_step(self, func, args, kwargs):
        """Runs one step of F._canonical_mask, which nn.MultiheadAttention (and nn.TransformerEncoder
        before it) applies to a bool mask: ``zeros_like(mask, dtype=float).masked_fill_(mask, -inf)``,
        noting the float mask it makes, so the site can be given the bool mask back (`_bool_source`)."""
        if func is torch.zeros_like:
            out = func(*args, **kwargs)
            src = args[0] if args else kwargs.get("input")
            if isinstance(src, torch.Tensor) and src.dtype == torch.bool and out.is_floating_point() \
                    and out.shape == src.shape:
                self.zeros[id(out)] = (out, out._version)
            return out
        t = args[0]
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        value = args[2] if len(args) > 2 else kwargs.get("value")
        zeros = self.zeros.pop(id(t), None)
        fresh = zeros is not None and zeros[0] is t and zeros[1] == t._version
        out = func(*args, **kwargs)
        if (fresh and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == t.shape
                and isinstance(value, float) and value == float("-inf")):
            self.made_from[id(t)] = (t, t._version, mask, mask._version)
        return out

    def _bool_source(self, mask):
        """The bool mask (True = may not attend) a float mask was made from in this forward, where it and
        that mask are unchanged since; else the mask as it is (always while traced: the conversions were
        not watched then, and id() of a traced tensor would break the graph)."""
        if torch.compiler.is_compiling():
            return mask
        entry = None if mask is None else self.made_from.get(id(mask))
        if entry is not None and entry[0] is mask and entry[1] == mask._version and entry[2]._version == entry[3]:
            return entry[2]
        return mask

    def _attention(self, q, k, v, bias, scale):
        """A product of deferred probabilities with v: the next site of the owner computes it."""
        n = self.counter[0]
        self.counter[0] += 1
        sites, kinds = self.state.sites, self.state.kinds
        if n >= len(sites) and self.state.route == "discover":
            self._discover("matmul-softmax")
        if n >= len(sites) or sites[n] is None or kinds[n] not in ("matmul-softmax", "einsum"):
            probs = deferred.Scores(q, k, scale=scale, bias=bias, probs=True).compute()
            return torch.matmul(probs.to(v.dtype), v)
        return getattr(self.owner, sites[n])(q, k, v, bias=bias, scale=scale)


    @torch.compiler.disable
    def _mha_name(self, args, kwargs) -> Optional[str]:
        """The path of the nn.MultiheadAttention below the owner whose output projection this call of
        F.multi_head_attention_forward uses (None when none is)."""
        weight = args[11] if len(args) > 11 else kwargs.get("out_proj_weight")
        for path, mod in self.owner.named_modules():
            if isinstance(mod, nn.MultiheadAttention) and mod.out_proj.weight is weight:
                return ".".join(p for p in (self.state.path, path) if p)
        return None

    @torch.compiler.disable
    def _discover(self, kind: str, role: str = "?", name: Optional[str] = None):
        """A module the graph could not look into computed an attention: it becomes a site, named after
        the module that computes it where that is known (else after the owner)."""
        state = self.state
        index = state.next_index[0]
        state.next_index[0] += 1
        site = SiteAttention(match.AttentionSite(index=index, name=name or state.path, kind=kind, role=role),
                             state.mask_fn)
        site.owner = state.path
        site.options = state.options
        site.training = self.owner.training
        name = f"fxsparse_site_{len(state.sites)}"
        self.owner.add_module(name, site)
        state.sites.append(name)
        state.kinds.append(kind)


def _sdpa_to_site(site: SiteAttention, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                  scale=None, enable_gqa=False):
    if dropout_p:
        raise SiteError(
            f"{site.site.where}: attention dropout p={dropout_p} is active (training mode); the sparse op has no "
            "dropout: set the model's attention dropout to 0 (HF: `attention_dropout=0.0`), or call `.eval()`")
    return site(query, key, value, scale=scale, causal=bool(is_causal), mask=attn_mask)


def _mha_to_site(site: SiteAttention, query, key, value, embed_dim_to_check, num_heads, in_proj_weight,
                 in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
                 training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                 use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None, v_proj_weight=None,
                 static_k=None, static_v=None, average_attn_weights=True, is_causal=False, bool_mask=None):
    where = site.site.where
    if bias_k is not None or add_zero_attn or static_k is not None or static_v is not None:
        raise SiteError(f"{where}: nn.MultiheadAttention with add_bias_kv / add_zero_attn / static k, v is not "
                        "supported by the rewrite; keep this site dense (mask_fn returns None for it)")
    if training and dropout_p:
        raise SiteError(f"{where}: attention dropout p={dropout_p} is active (training mode); the sparse op has no "
                        "dropout: set the module's dropout to 0, or call `.eval()`")
    # nn.MultiheadAttention.forward hands this function (seq, batch, embed) inputs
    if not use_separate_proj_weight:
        q, k, v = rewrite.mha_heads(query, key, value, num_heads, False, in_proj_weight, in_proj_bias)
    else:
        q, k, v = rewrite.mha_heads(query, key, value, num_heads, False, None, in_proj_bias,
                                    q_proj_weight, k_proj_weight, v_proj_weight)
    if bool_mask is not None:  # a float mask made from a bool one: the bool one, whose exact layout can be folded
        key_padding_mask, attn_mask = bool_mask(key_padding_mask), bool_mask(attn_mask)
    out = site(q, k, v, mask=rewrite.mha_mask(key_padding_mask, attn_mask, q))
    y, _ = rewrite.mha_output(out, False, out_proj_weight, out_proj_bias)
    return y, None


# ------------------------------------------------------------------------------ graph route
class _Slot:
    """Where a tensor argument goes in a call signature."""

    __slots__ = ("i",)

    def __init__(self, i):
        self.i = i

    def __eq__(self, other):
        return isinstance(other, _Slot) and other.i == self.i

    def __hash__(self):
        return hash(("slot", self.i))


def _split(obj, tensors: list):
    """obj with its tensors replaced by slots (hashable), and the tensors in order; _UNTRACEABLE if an
    argument is neither a tensor nor a plain value (a cache object: the signature is not traceable)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1)
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, (tuple, list)):
        parts = tuple(_split(x, tensors) for x in obj)
        return _UNTRACEABLE if any(p is _UNTRACEABLE for p in parts) else (type(obj), parts)
    if isinstance(obj, dict):
        items = tuple((k, _split(v, tensors)) for k, v in obj.items())
        return _UNTRACEABLE if any(p is _UNTRACEABLE for _, p in items) else (dict, items)
    return _UNTRACEABLE


_UNTRACEABLE = object()


def _fill(template, tensors):
    if isinstance(template, _Slot):
        return tensors[template.i]
    if isinstance(template, tuple) and len(template) == 2 and template[0] in (tuple, list, torch.Size):
        return template[0]([_fill(x, tensors) for x in template[1]])  # torch.Size: a feature map's size
    if isinstance(template, tuple) and len(template) == 2 and template[0] is dict:
        return {k: _fill(v, tensors) for k, v in template[1]}
    return template


def _graph_forward(self, base: type, state: OwnerState, args, kwargs):
    tensors: list = []
    arg_t = tuple(_split(a, tensors) for a in args)
    kw_t = tuple((k, _split(v, tensors)) for k, v in kwargs.items())
    if any(a is _UNTRACEABLE for a in arg_t) or any(v is _UNTRACEABLE for _, v in kw_t):
        return _deferred_forward(self, base, state, args, kwargs)  # a cache object: not traceable
    key = (arg_t, kw_t, self.training)
    fn = state.graphs.get(key)
    if fn is None:
        fn = _trace_signature(self, base, state, arg_t, kw_t, len(tensors))
        state.graphs[key] = fn
    if fn is _DEFERRED:
        return _deferred_forward(self, base, state, args, kwargs)
    return fn(self, *tensors)


_DEFERRED = object()  # a signature torch.fx cannot trace: the scores are deferred at run time instead


@torch.compiler.disable
def _deferred_forward(self, base: type, state: OwnerState, args, kwargs):
    return _redirected_forward(self, base, state, args, kwargs, defer=True)


@torch.compiler.disable
def _trace_signature(owner: nn.Module, base: type, state: OwnerState, arg_t, kw_t, n: int):
    """Trace the owner's forward for one call signature and rewrite its sites; returns the
    generated function, to be called as ``fn(owner, *tensors)``."""
    where = state.path or "(root)"

    def body(self, *tensors):
        return base.forward(self, *(_fill(a, tensors) for a in arg_t), **{k: _fill(v, tensors) for k, v in kw_t})

    names = ", ".join(f"t{i}" for i in range(n))
    make = eval(f"lambda body: lambda self{', ' if n else ''}{names}: body(self{', ' if n else ''}{names})")
    fwd = make(body)
    # run in the globals of the owner's own module (body is a closure), so that the tracer keeps the
    # functions a library marks as not traceable (timm's `cal_rel_pos_type`) whole, as the whole model's trace does
    fwd = types.FunctionType(fwd.__code__, getattr(base.forward, "__globals__", {}), fwd.__name__, None,
                             fwd.__closure__)
    shim = object.__new__(type(base.__name__, (base,), {"forward": fwd}))
    shim.__dict__.update(owner.__dict__)
    leaf, fns = capture.library_hints()
    tracer = capture.Tracer(leaf, fns)
    try:
        graph = tracer.trace(shim)
    except Exception as err:  # data-dependent Python: run the code itself, with the scores deferred
        return _deferred(state, arg_t, kw_t, owner, f"{type(err).__name__}: {err}")
    gm = fx.GraphModule(shim, graph, class_name=base.__name__)
    found = match.find(gm)
    if len(found) != len(state.sites) or any(
            k != m.site.kind and not (k == "mha" and m.mha is not None) for k, m in zip(state.kinds, found)):
        return _deferred(state, arg_t, kw_t, owner, f"traced on its own it shows {len(found)} attention(s), not "
                         f"{len(state.sites)}")
    todo = []
    for k, (m, name) in enumerate(zip(found, state.sites)):
        if name is None:
            continue
        if m.skip is not None:  # e.g. the owner returns the probabilities: run its code, scores deferred
            return _deferred(state, arg_t, kw_t, owner, m.skip)
        m.site.index = int(name.rsplit("_", 1)[1])
        todo.append(m)
    rewrite.rewrite(gm, todo, _unused_mask_fn)
    _check_resolvable(gm, owner, where)
    state.code[(arg_t, kw_t, owner.training)] = gm.code
    return type(gm).forward


def _deferred(state: OwnerState, arg_t, kw_t, owner: nn.Module, why: str):
    """This signature runs the owner's own code with the scores deferred (why: for reading)."""
    state.code[(arg_t, kw_t, owner.training)] = f"# not rewritten as a graph ({why}); scores deferred at run time"
    return _DEFERRED


def _unused_mask_fn(site):  # the owner's own site modules (with the user's mask_fn) run, not these
    raise AssertionError("unreachable")


def _check_resolvable(gm: fx.GraphModule, owner: nn.Module, where: str):
    """The generated code looks its attributes up on the owner: tensor constants the trace made
    become non-persistent buffers of the owner."""
    changed = False
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        if _resolves(owner, node.target):
            continue
        if node.op == "call_module":
            raise SiteError(f"{where}: the traced forward calls a module {node.target!r} the owner does not have")
        value = operator.attrgetter(node.target)(gm)
        name = f"_fxsparse_const_{len(owner._buffers)}"
        owner.register_buffer(name, value, persistent=False)
        node.target = name
        changed = True
    if changed:
        gm.recompile()


def _resolves(obj, target: str) -> bool:
    try:
        operator.attrgetter(target)(obj)
    except AttributeError:
        return False
    return True


def rewritten_code(module: nn.Module) -> str:
    """The Python source of every owner's rewritten forward traced so far (graph route), for reading."""
    parts = []
    for path, mod in owners(module):
        for code in owner_state(mod).code.values():
            parts.append(f"# {path or '(root)'}\n{code}")
    return "\n".join(parts)


def owners(module: nn.Module) -> list:
    """(path, module) of every owner in ``module``."""
    return [(p, m) for p, m in module.named_modules() if owner_state(m) is not None]


__all__ = ["OwnerState", "make_owner", "owner_class", "owner_state", "owners", "rewritten_code"]
