"""``fxsparse.transform``: the user's model back, with each attention rewritten inside its owner.

1. capture: a graph of the whole model (torch.fx; torch.export with example inputs), used only
   to *find* sites; nothing of it is handed back;
2. match: the attention sites of that graph (``match.find``);
3. owners: each site goes to the smallest module whose forward computes all of its nodes (node
   metadata ``nn_module_stack`` says which module each node came from);
4. rewrite: a copy of the model (same classes, the weights' memory shared, nothing mutable shared)
   in which only the owners change (``owner.py``), each holding its sites' ``SiteAttention``
   modules; the report lists every site, rewritten, dense or skipped with its reason.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import fx, nn

from . import capture, match
from .options import KernelOptions
from .owner import OwnerState, make_owner
from .site import SiteAttention, is_transformed

_REDIRECTABLE = {"sdpa", "mha"}


def transform(model: nn.Module, mask_fn: Callable, *, example_inputs=None, concrete_args: Optional[dict] = None,
              options=None, verbose: bool = False) -> nn.Module:
    """Rewrite every attention of ``model`` to fxsparse's block-sparse op; ``model`` is untouched.

    Returns an object of the model's own class that shares its weights' memory: containers,
    methods, hooks, ``state_dict`` keys, checkpointing, FSDP2 and ``generate()`` work as on the
    original. Only the modules that hold an attention change (they keep their class as a base).

    ``mask_fn(site)`` returns None (keep the site dense), a bool token mask broadcastable to
    ``[H|1, site.q_len, site.kv_len]`` (True = may attend) or a ``fxsparse.Layout``. It is called
    once per site and per sequence length, at the first forward at that length. ``example_inputs``
    (a tensor, a tuple of positional arguments, or a dict of keyword arguments) are needed only for
    models torch.fx cannot trace (captured with torch.export); given, the model runs once on them
    in eval mode without gradients, so layouts are built and the report is complete at once.
    ``options``: a ``fxsparse.KernelOptions`` for every site's kernels (None: the defaults).
    """
    if is_transformed(model):
        raise ValueError("this module was already transformed by fxsparse; transform the original model instead")
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable (site -> None | bool mask | Layout), got {type(mask_fn).__name__}")
    if options is not None and not isinstance(options, KernelOptions):
        raise TypeError(f"options must be a fxsparse.KernelOptions, got {type(options).__name__}")
    gm = capture.capture(model, example_inputs, concrete_args)
    matches = match.find(gm)
    facts = match.GraphFacts(gm)
    sparse = capture.clone_model(model)
    by_owner: dict = {}
    opaque: dict = {}  # calls fx kept whole (a wrapped function, a no-trace module) that compute attention
    blocks = _torch_blocks(model)  # their attentions are found when they run, whatever the graph saw inside
    matches = [m for m in matches if not any(_within(facts.module_path(m.out), b) for b in blocks)]
    for i, m in enumerate(matches):
        m.site.index = i
    for m in matches:
        if m.site.kind == "opaque call":
            opaque.setdefault(m.out.target if m.out.op == "call_module" else facts.module_path(m.out), []).append(m)
        else:
            by_owner.setdefault(owner_path(m, facts), []).append(m)
    skipped = []
    calls = _calls_per_owner(gm, facts, set(by_owner))
    for path, owned in by_owner.items():
        n = calls.get(path, 1)
        if n > 1 and len(owned) % n == 0:  # one module called n times (ALBERT's shared layer): its sites, once
            owned = owned[:len(owned) // n]
        sites, kinds, modules = [], [], {}
        for k, m in enumerate(owned):
            kinds.append(m.site.kind)
            if m.skip is not None:
                skipped.append((m.site, m.skip, path))
                sites.append(None)
                continue
            name = f"fxsparse_site_{k}"
            site_module = SiteAttention(m.site, mask_fn)
            site_module.owner = path
            site_module.options = options
            modules[name] = site_module
            sites.append(name)
        if not modules:
            continue
        route = "redirect" if set(kinds) <= _REDIRECTABLE and not any(_graph_knows_more(m) for m in owned) else "graph"
        owner = sparse.get_submodule(path) if path else sparse
        make_owner(owner, OwnerState(path, sites, kinds, route), modules)
        for site_module in modules.values():
            site_module.training = owner.training
    counter = [len(matches)]
    owned = set(by_owner)
    for path, calls in opaque.items():
        if not path or _overlaps(path, owned):
            skipped.extend((m.site, m.skip, path) for m in calls)  # inside an owner: reported, not rewritten
            continue
        _discover(sparse, path, mask_fn, options, counter)
        owned.add(path)
        # reported until the module's attentions show at run time (the report drops these rows then)
        skipped.extend((m.site, m.skip, path) for m in calls)
    skipped.extend(_discover_inside_leaves(model, sparse, owned, blocks, mask_fn, options, counter))
    sparse.__dict__["fxsparse_skipped"] = skipped
    if example_inputs is not None:
        warm_up(sparse, example_inputs)
    if verbose:
        from .report import report

        print(report(sparse))
    return sparse


def _calls_per_owner(gm, facts: match.GraphFacts, paths: set) -> dict:
    """How many times the graph enters each owner's forward (a module shared by several layers)."""
    counts, inside = {}, set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        here = facts.module_path(node)
        now = {p for p in paths if p == "" or here == p or here.startswith(p + ".")}
        for p in now - inside:
            counts[p] = counts.get(p, 0) + 1
        inside = now
    return counts


def _graph_knows_more(m: match.Match) -> bool:
    """An SDPA site whose k/v the graph traced back before a head repeat (grouped-query attention
    written with `repeat_kv`): a rewrite of the owner's graph hands the op the un-repeated k/v."""
    return m.site.kind == "sdpa" and m.k is not match.arg(m.out, 1, "key")


def owner_path(m: match.Match, facts: match.GraphFacts) -> str:
    """The smallest module whose forward computes every node of the site."""
    if m.mha is not None:  # the module that calls nn.MultiheadAttention: its fast paths then stay off
        return facts.module_path(m.out)
    paths = [facts.module_path(n).split(".") for n in m.nodes]
    common = paths[0] if paths else [""]
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return ".".join(part for part in common if part)


def _discover(sparse: nn.Module, path: str, mask_fn, options, counter: list) -> None:
    """The module at ``path`` computes attention the graph could not look into: its attentions
    become sites at their first call (listed in the report once it ran)."""
    state = OwnerState(path, [], [], "discover")
    state.mask_fn, state.next_index, state.options = mask_fn, counter, options
    make_owner(sparse.get_submodule(path), state, {})


def _discover_inside_leaves(model: nn.Module, sparse: nn.Module, owned: set, blocks: list, mask_fn, options,
                            counter: list):
    """Modules that a library registers as not traceable (timm's attentions that cache biases per
    device, blocks that pad to windows) and torch.nn's Transformer modules were leaves of the graph:
    those that hold attention look for it at run time, and each attention they compute becomes a site.
    Returns a report row for each (the report drops it once the module has run and its sites show)."""
    leaf_types = tuple(capture.library_hints()[0])
    pending = []
    for path, module in model.named_modules():
        if path not in blocks and not (isinstance(module, leaf_types)
                                       and any(_mentions_attention(type(m)) for m in module.modules())):
            continue
        if _overlaps(path, owned):
            continue
        _discover(sparse, path, mask_fn, options, counter)
        owned.add(path)
        site = match.AttentionSite(index=counter[0], name=path, kind="opaque call")
        pending.append((site, f"not run yet: the module `{path}` ({type(module).__name__}) is one call of the graph "
                              "(torch.fx does not trace into it); its attentions become sites at its first call", path))
    return pending


def _torch_blocks(model: nn.Module) -> list:
    """The outermost modules torch.fx keeps whole (torch.nn's, nn.Sequential aside) with a forward of
    their own (nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.Transformer, ...) that hold an
    nn.MultiheadAttention, the model itself included. In eval mode they may take a fused fast path that
    calls no attention at all; as owners whose attentions are found when they run, under the redirect's
    torch function mode, they take their slow path, whose nn.MultiheadAttention calls become sites."""
    out = []
    for path, module in model.named_modules():
        if any(_within(path, b) for b in out):
            continue
        if (fx.Tracer().is_leaf_module(module, path) and not isinstance(module, nn.MultiheadAttention)
                and type(module).forward is not nn.Module.forward  # not a container (nn.ModuleList)
                and any(isinstance(m, nn.MultiheadAttention) for m in module.modules())):
            out.append(path)
    return out


def _within(path: str, block: str) -> bool:
    """Whether the module at ``path`` is or sits inside the module at ``block`` ("" is the model)."""
    return not block or path == block or path.startswith(block + ".")


def _overlaps(path: str, owned: set) -> bool:
    """Whether the module at ``path`` is, holds or sits inside an owner already."""
    return any(_within(path, o) or _within(o, path) for o in owned)


def _mentions_attention(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "softmax" in source or "scaled_dot_product_attention" in source


def warm_up(sparse: nn.Module, example_inputs) -> None:
    """One forward on the example inputs, in eval mode and without gradients: every owner traces
    its call signature and every site builds its layout for these lengths."""
    modes = {m: m.training for m in sparse.modules()}
    sparse.eval()
    try:
        args, kwargs = capture.split_inputs(example_inputs)
        with torch.no_grad():
            sparse(*args, **kwargs)
    finally:
        for m, mode in modes.items():
            m.training = mode
