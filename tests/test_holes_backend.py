"""fxsparse.backend where a compiled model could silently run dense or with the wrong mask: site names
and indices across the graphs Dynamo hands over, a dropout whose p Dynamo lifts into a graph input, and
Dynamo's recompile limit. Outputs are checked against the original model masked in float64."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse import patterns
from fxsparse.testing import assert_close, masked_forward, relative_error

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("backend tests run on the CPU path, without TRITON_INTERPRET", allow_module_level=True)

NAMES = ["model.layers.0", "model.layers.1", "model.layers.2"]


class Attention(nn.Module):
    """q·kᵀ → scale → softmax → dropout → ·v over a fused qkv projection."""

    def __init__(self, dim=16, heads=2, p=0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = self.drop(((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1))
        return (a @ v).transpose(1, 2).reshape(b, n, c)


class Stack(nn.Module):
    def __init__(self, depth=3, p=0.0):
        super().__init__()
        self.layers = nn.ModuleList(Attention(p=p) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class Outer(nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
        self.model = Stack(p=p)

    def forward(self, x):
        return self.model(x)


def window(site):
    """Each query sees the keys at most 2 positions away."""
    i, j = torch.arange(site.q_len)[:, None], torch.arange(site.kv_len)[None, :]
    return (i - j).abs() <= 2


def _model(p=0.0):
    torch.manual_seed(0)
    return Outer(p).eval()


def _rows(be):
    return [(r.index, r.name, r.status) for r in fxsparse.report(be).rows]


@pytest.mark.parametrize("entry", ["module", "closure", "argument", "varargs"])
def test_site_names_are_the_model_paths(entry):
    """Names are paths inside the model (as transform gives them), however the model reaches Dynamo."""
    torch._dynamo.reset()
    model, x = _model(), torch.randn(2, 12, 16)
    mask_fn = patterns.only(window, names="model.layers.1")
    be = fxsparse.backend(mask_fn, compiler="eager")
    compiled = {
        "module": lambda: torch.compile(model, backend=be)(x),
        "closure": lambda: torch.compile(lambda x: model(x), backend=be)(x),
        "argument": lambda: torch.compile(lambda m, x: m(x), backend=be)(model, x),
        "varargs": lambda: torch.compile(lambda *a: a[0](a[1]), backend=be)(model, x),
    }[entry]
    with torch.no_grad():
        got = compiled()
    want, _ = masked_forward(model, (x,), mask_fn)
    assert_close(got, want, 1e-5)
    assert relative_error(want, masked_forward(model, (x,), None)[0]) > 1e-3  # the mask changed the answer
    assert [r.name for r in fxsparse.report(fxsparse.transform(model, mask_fn)).rows] == NAMES
    assert _rows(be) == [(0, NAMES[0], "dense"), (1, NAMES[1], "rewritten"), (2, NAMES[2], "dense")]


def test_site_indices_survive_a_recompile():
    """patterns.only(layers=...) selects the same sites in the graph Dynamo compiles for a new length."""
    torch._dynamo.reset()
    model = _model()
    mask_fn = patterns.only(window, layers=[0, 2])
    be = fxsparse.backend(mask_fn, compiler="eager")
    compiled = torch.compile(model, backend=be, dynamic=False)
    with torch.no_grad():
        for n in (12, 20):
            x = torch.randn(2, n, 16)
            assert_close(compiled(x), masked_forward(model, (x,), mask_fn)[0], 1e-5, f"length {n}")
    assert len(be.graphs) == 2
    rows = sorted(_rows(be))
    assert rows == sorted([(i, NAMES[i], "dense" if i == 1 else "rewritten") for i in range(3)] * 2)


def test_dropout_p_lifted_by_dynamic_true_never_skips_the_mask_silently():
    """dynamic=True: Dynamo lifts nn.Dropout's p into a graph input. In eval mode the dropout drops
    nothing and the site is rewritten; the answer is the masked one or a clear error, never dense."""
    torch._dynamo.reset()
    model, x = _model(), torch.randn(2, 12, 16)
    be = fxsparse.backend(window, compiler="eager")
    try:
        with torch.no_grad():
            got = torch.compile(model, backend=be, dynamic=True)(x)
    except Exception as err:  # the backend refuses symbolic lengths, with a message that says so
        assert "dynamic" in str(err)
        assert all(r.status != "skipped" for r in fxsparse.report(be).rows)
    else:
        assert_close(got, masked_forward(model, (x,), window)[0], 1e-5)


def test_dropout_p_lifted_in_training_is_reported_with_its_cause():
    torch._dynamo.reset()
    model, x = _model(p=0.0).train(), torch.randn(2, 12, 16)
    be = fxsparse.backend(window, compiler="eager")
    got = torch.compile(model, backend=be, dynamic=True)(x)
    assert_close(got, model(x), 1e-6)  # kept as it was: the original attention with its dropout
    rows = fxsparse.report(be).rows
    assert rows and all(r.status == "skipped" and "graph input" in r.reason for r in rows)


def test_recompile_limit_warns_that_the_model_now_runs_dense():
    torch._dynamo.reset()
    model = _model()
    be = fxsparse.backend(window, compiler="eager")
    compiled = torch.compile(model, backend=be, dynamic=False)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch.no_grad(), torch._dynamo.config.patch(**{limit: 2}):
        for n in (10, 11):
            x = torch.randn(1, n, 16)
            assert_close(compiled(x), masked_forward(model, (x,), window)[0], 1e-5, f"length {n}")
        with pytest.warns(RuntimeWarning, match="fxsparse: Dynamo hit .*runs dense"):
            compiled(torch.randn(1, 12, 16))
    assert len(be.recompile_limit_hits) == 1


def test_sites_without_a_module_path_warn_when_only_selects():
    """A graph break inside the loop over layers: Dynamo compiles each layer's forward as a frame of
    its own, one graph for every layer, so a mask_fn selecting by name or index cannot tell the
    layers apart. The backend says so instead of leaving the selection silently wrong."""
    import warnings

    import torch.nn.functional as F
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
                torch._dynamo.graph_break()
            return x

    torch._dynamo.reset()
    mask_fn = fxsparse.patterns.only(fxsparse.patterns.sliding_window(2), layers=[1])
    compiled = torch.compile(Stack(), backend=fxsparse.backend(mask_fn, compiler="eager"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(1, 10, 16))
    assert any("without a module path" in str(w.message) for w in caught)
