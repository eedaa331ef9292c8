"""Model -> fx.GraphModule that shares the model's parameters and keeps their names.

Symbolic tracing first, with a tracer that also proxies buffers (nanoGPT slices its causal
buffer with `self.bias[:, :, :T, :T]`) and honours timm's no-trace functions and modules. When
symbolic tracing fails and example inputs are given, ``torch.export`` (non-strict) captures an
aten-level graph instead. With example inputs, every node gets shape metadata (fake tensors),
so sites know their lengths at transform time.
"""
from __future__ import annotations

import copy
import inspect
import sys
from typing import Any, Optional

import torch
from torch import fx, nn


class CaptureError(RuntimeError):
    pass


class Tracer(fx.Tracer):
    """fx's tracer, proxying buffers too, with the leaf modules and functions libraries ask for."""

    proxy_buffer_attributes = True

    def __init__(self, leaf_types=(), autowrap_functions=()):
        super().__init__(autowrap_functions=tuple(autowrap_functions), param_shapes_constant=False)
        self.leaf_types = tuple(leaf_types)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def library_hints():
    """Leaf modules and no-trace functions that libraries registered for fx (timm)."""
    leaf, fns = [], []
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is not None:
        leaf += list(timm_fx.get_notrace_modules())
        fns += list(timm_fx.get_notrace_functions())
    return leaf, fns


def capture(model: nn.Module, example_inputs=None, concrete_args: Optional[dict] = None) -> fx.GraphModule:
    """The model's forward as a GraphModule; with example inputs, nodes carry shape metadata."""
    args, kwargs = split_inputs(example_inputs)
    try:
        gm = _symbolic(model, concrete_args)
    except Exception as err:  # tracing fails on data-dependent Python control flow
        if example_inputs is None:
            raise CaptureError(
                f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}). "
                "Pass `example_inputs=` so fxsparse can capture it with torch.export, or use "
                "`torch.compile(model, backend=fxsparse.backend(mask_fn))`."
            ) from err
        gm = _exported(clone_model(model), args, _without_cache(model, kwargs), err)  # runs modules: not the user's
        _clone_module_objects(gm, model)
        _keep_unused_state(gm, model)
        return gm
    _clone_module_objects(gm, model)
    _keep_unused_state(gm, model)
    if example_inputs is not None:
        _propagate_shapes(gm, args, kwargs)
    return gm


def split_inputs(example_inputs):
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def _symbolic(model: nn.Module, concrete_args) -> fx.GraphModule:
    leaf, fns = library_hints()
    tracer = Tracer(leaf, fns)
    graph = tracer.trace(model, concrete_args=concrete_args)
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


def _without_cache(model: nn.Module, kwargs: dict) -> dict:
    """The graph only shows where the attention is: a model that can return a KV cache object
    (HuggingFace's `use_cache`) is captured without it, since export cannot return such objects."""
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {**kwargs, "use_cache": False} if takes and "use_cache" not in kwargs else kwargs


def _exported(model: nn.Module, args, kwargs, trace_err) -> fx.GraphModule:
    """torch.export, non-strict; sizes left dynamic where the model allows (a new sequence length
    must not hit a shape guard), else specialised to the example."""
    try:
        try:
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=_auto_dynamic(args, kwargs))
        except Exception:
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:
        raise CaptureError(
            f"neither torch.fx ({type(trace_err).__name__}: {trace_err}) nor torch.export "
            f"({type(err).__name__}: {err}) could capture {type(model).__name__}; "
            "use `torch.compile(model, backend=fxsparse.backend(mask_fn))` instead."
        ) from err
    gm = ep.module()
    gm.meta["fxsparse_exported"] = True
    return gm


def _auto_dynamic(args, kwargs):
    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(x.dim())}
        return None

    return (tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}) if kwargs else \
        tuple(spec(a) for a in args)


def _propagate_shapes(gm: fx.GraphModule, args, kwargs):
    """Fake-tensor shapes on every node (cheap: no real compute); best effort."""
    inputs = _placeholder_values(gm, args, kwargs)
    if inputs is None:
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake)
    except Exception:
        for node in gm.graph.nodes:  # partial metadata would mislead the matcher
            node.meta.pop("val", None)


def _placeholder_values(gm: fx.GraphModule, args, kwargs) -> Optional[list]:
    values, pos = [], list(args)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        name = node.target.lstrip("*")
        if name in kwargs:
            values.append(kwargs[name])
        elif pos:
            values.append(pos.pop(0))
        elif node.args:
            values.append(node.args[0])
        else:
            return None
    return values


def _clone_module_objects(gm: fx.GraphModule, model: nn.Module):
    """GraphModule installs the model's own submodule objects; give it shallow copies whose
    parameters are new Parameter objects over the same storage (tied weights stay tied), so
    `sparse.eval()`, `sparse.half()` or a hook on `sparse` never reaches `model`. The weights'
    memory is shared, as with torch.compile: training `sparse` updates the values `model` sees."""
    originals = {id(m) for m in model.modules()}
    aliases: dict = {}
    for name, child in list(gm.named_children()):
        if id(child) in originals:
            setattr(gm, name, _shallow_copy(child, aliases))
        else:
            _clone_below(child, originals, aliases)
    # parameters the graph reads directly (get_attr) were installed as the model's own objects
    own = {id(p) for p in model.parameters()}
    for mod in gm.modules():
        for k, p in mod._parameters.items():
            if p is not None and id(p) in own:
                mod._parameters[k] = _alias(p, aliases)


def _clone_below(mod: nn.Module, originals: set, aliases: dict):
    for name, child in list(mod.named_children()):
        if id(child) in originals:
            setattr(mod, name, _shallow_copy(child, aliases))
        else:
            _clone_below(child, originals, aliases)


def _alias(p, aliases: dict):
    if p is None:
        return None
    if id(p) not in aliases:
        aliases[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return aliases[id(p)]


def clone_model(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares the weights' memory and nothing mutable: new module
    objects of the same classes, new Parameter objects over the same storage (tied weights stay
    tied), the same buffer tensors, and copies of the modules' Python containers (caches that a
    forward fills, such as timm's attention-bias dicts, must not be shared with the user's model)."""
    return _shallow_copy(model, {})


_REBUILT = ("_parameters", "_buffers", "_modules")


def _shallow_copy(mod: nn.Module, aliases: dict) -> nn.Module:
    new = object.__new__(type(mod))  # not copy.copy: parametrized modules refuse to be pickled or copied
    new.__dict__.update(mod.__dict__)
    for key, value in list(new.__dict__.items()):
        if key not in _REBUILT and isinstance(value, (dict, list, set)):
            new.__dict__[key] = copy.copy(value)
    new._parameters = type(mod._parameters)((k, _alias(p, aliases)) for k, p in mod._parameters.items())
    new._buffers = type(mod._buffers)(mod._buffers)
    new._non_persistent_buffers_set = set(mod._non_persistent_buffers_set)
    new._modules = type(mod._modules)(
        (k, None if v is None else _shallow_copy(v, aliases)) for k, v in mod._modules.items()
    )
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_state_dict_hooks", "_load_state_dict_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(mod, hooks):
            setattr(new, hooks, copy.copy(getattr(mod, hooks)))
    return new


def _keep_unused_state(gm: fx.GraphModule, model: nn.Module):
    """Install parameters and buffers that the forward never touches (an unused head, a
    persistent buffer read only at init), so the state_dict keys match the model's."""
    have = set(gm.state_dict().keys())
    persistent = set(model.state_dict().keys())
    for name, value in list(model.named_parameters()) + list(model.named_buffers()):
        if name in have or name not in persistent:
            continue
        *path, field = name.split(".")
        owner = gm
        for part in path:
            nxt = owner._modules.get(part)
            if nxt is None:
                nxt = nn.Module()
                owner.add_module(part, nxt)
            owner = nxt
        if isinstance(value, nn.Parameter):
            owner.register_parameter(field, nn.Parameter(value.detach(), requires_grad=value.requires_grad))
        else:
            owner.register_buffer(field, value)
    # a buffer the model keeps out of its state_dict stays out of ours
    for name in set(gm.state_dict().keys()) - persistent:
        *path, field = name.split(".")
        owner = gm.get_submodule(".".join(path)) if path else gm
        if field in owner._buffers:
            owner._non_persistent_buffers_set.add(field)


def example_device(example_inputs: Any) -> Optional[torch.device]:
    args, kwargs = split_inputs(example_inputs)
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, torch.Tensor):
            return x.device
    return None
