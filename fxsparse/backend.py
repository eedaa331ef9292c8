"""``torch.compile(model, backend=fxsparse.backend(mask_fn))``: the same match and rewrite over
the graphs Dynamo captures, then inductor (or eager).

Dynamo hands over torch-level graphs whose parameters and buffers are placeholders; their real
values come in ``example_inputs``, so constant masks (nanoGPT's tril buffer) are still seen.
Shapes are static in these graphs, so mask_fn runs and Layouts are built here, before inductor
traces the site modules.
"""
from __future__ import annotations

import collections
import logging
import warnings
import weakref
from typing import Callable

import torch
from torch import fx

from . import match, patterns, rewrite
from .options import KernelOptions
from .rewrite import prepare_sites
from .site import site_modules


class Backend:
    """A torch.compile backend; ``fxsparse.report(backend)`` lists the sites of every graph it compiled."""

    def __init__(self, mask_fn: Callable, compiler: str = "inductor", options=None):
        if compiler not in ("inductor", "eager"):
            raise ValueError(f"compiler must be 'inductor' or 'eager', got {compiler!r}")
        self.mask_fn = mask_fn
        self.options = options
        self.compiler = compiler
        self.graphs: list[fx.GraphModule] = []
        self._indices: dict = {}  # (site name, its ordinal among the graph's sites of that name) -> index
        self._codes: set = set()  # the functions whose frames this backend compiled, as Dynamo's log names them
        self.recompile_limit_hits: list[str] = []  # Dynamo's limit messages for those functions
        self._warned = False  # the warning about sites without a module path, given once
        _LIMIT_WATCH.backends.add(self)

    def __call__(self, gm: fx.GraphModule, example_inputs):
        self._codes.update(_traced_functions())
        constants = _parameter_values(gm, example_inputs)
        matches = match.find(gm, constants)
        ordinal = collections.Counter()
        for m in sorted(matches, key=lambda m: m.site.index):
            # a site keeps its index in every graph Dynamo hands over (a recompile at another shape, a
            # graph break), so mask_fns that select by index (patterns.only(layers=...)) stay put
            key = (m.site.name, ordinal[m.site.name])
            ordinal[m.site.name] += 1
            m.site.index = self._indices.setdefault(key, len(self._indices))
        if any(m.site.name == "" for m in matches) and isinstance(self.mask_fn, patterns.Only) and not self._warned:
            self._warned = True
            warnings.warn(
                "fxsparse.backend: a graph holds attention sites without a module path: Dynamo compiled the "
                "function computing them as a frame of its own (often after a graph break inside a loop over "
                "layers), and that graph is reused for every module running the same code, so "
                f"{self.mask_fn.__name__} cannot tell those modules apart by name or index. "
                "fxsparse.transform(model, mask_fn) keeps each module's identity", RuntimeWarning, stacklevel=2)
        skipped = rewrite.rewrite(gm, matches, self.mask_fn)
        for site in site_modules(gm):
            site.options = self.options
        gm.fxsparse_skipped = [(m.site, m.skip) for m in skipped]
        _prepare(gm, matches)
        self.graphs.append(gm)
        if self.compiler == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        # The layout tables are module buffers Dynamo never saw: without this map AOTAutograd
        # treats every buffer as a static module input (as for graphs from torch.export).
        if hasattr(gm, "_param_name_to_source"):
            del gm._param_name_to_source
        return compile_fx(gm, example_inputs)

    def _limit_hit(self, message: str):
        self.recompile_limit_hits.append(message)
        warnings.warn(
            f"fxsparse: {message}. From now on Dynamo runs that function eagerly, without this backend: its "
            "attention runs dense, without the sparse mask. Compile with fewer distinct shapes (dynamic=False "
            "compiles one graph per sequence length) or raise the limit named above", RuntimeWarning, stacklevel=2)

    def site_modules(self):
        return [mod for gm in self.graphs for mod in site_modules(gm)]

    @property
    def fxsparse_skipped(self):
        return [pair for gm in self.graphs for pair in gm.fxsparse_skipped]

    def __repr__(self):
        return f"fxsparse.backend({getattr(self.mask_fn, '__name__', self.mask_fn)!r}, compiler={self.compiler!r})"


def backend(mask_fn: Callable, *, compiler: str = "inductor", options=None) -> Backend:
    """A torch.compile backend that rewrites every attention Dynamo captures to the sparse op.

    ``compiler="inductor"`` compiles the rewritten graph with inductor; ``"eager"`` runs it as is.
    ``options``: a ``fxsparse.KernelOptions`` for every site's kernels (None: the defaults).
    """
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable (site -> None | bool mask | Layout), got {type(mask_fn).__name__}")
    if options is not None and not isinstance(options, KernelOptions):
        raise TypeError(f"options must be a fxsparse.KernelOptions, got {type(options).__name__}")
    return Backend(mask_fn, compiler, options)


def _function_info(code) -> str:
    return f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"  # as Dynamo's limit warning prints it


def _traced_functions() -> set:
    context = torch._guards.TracingContext.try_get()
    return {_function_info(code) for code in getattr(context, "traced_code", None) or ()}


class _RecompileLimitWatch(logging.Filter):
    """Past Dynamo's recompile limit a frame runs eagerly from then on, which for a model compiled with
    this backend means dense attention with no error: Dynamo only logs a warning. This filter on that
    log tells the backend whose function it was, which warns in fxsparse's name."""

    def __init__(self):
        super().__init__()
        self.backends = weakref.WeakSet()

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("torch._dynamo hit config.") and record.args:
            args = tuple(record.args)
            if len(args) >= 3:
                for backend in list(self.backends):
                    if str(args[2]) in backend._codes:
                        backend._limit_hit(f"Dynamo hit torch._dynamo.config.{args[0]} ({args[1]}) for {args[2]}")
        return True


_LIMIT_WATCH = _RecompileLimitWatch()
logging.getLogger("torch._dynamo.convert_frame").addFilter(_LIMIT_WATCH)


def _parameter_values(gm: fx.GraphModule, example_inputs) -> dict:
    """Placeholder name -> real tensor, for the model's parameters and buffers."""
    values = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.nn.Parameter) or "_parameters_" in node.name or "_buffers_" in node.name:
            if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
                values[node.name] = value
    return values


def _prepare(gm: fx.GraphModule, matches):
    """Where this graph's lengths are static, ask mask_fn and build each Layout now (the report then
    shows them); sites with symbolic lengths (Dynamo's dynamic shapes) find their layout when they
    run, as one opaque op (``fxsparse::site_attention``), so one graph serves every length."""
    static = [m for m in matches if not any(_has_symbolic_size(n) for n in (m.q, m.k, m.out.args[0] if m.out.args
                                                                                else None))]
    prepare_sites(gm, static, lambda m: _device_of(m.q if m.q is not None else m.out.args[0]))


def _has_symbolic_size(node) -> bool:
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape)


def _device_of(node) -> torch.device:
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return val.device if isinstance(val, torch.Tensor) else torch.device("cpu")
