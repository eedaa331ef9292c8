"""Checks shared by the transform tests: exactness, the oracle, the report, no mutation."""
from __future__ import annotations

import copy

import torch

import fxsparse
from oracle import MaskedAttention

TOL = 1e-5  # relative to the largest magnitude of the output


def assert_close(got, want, tol=TOL, what="output"):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().double().clamp_min(1e-12)
    err = (got.double() - want.double()).abs().max()
    assert err <= tol * scale, f"{what}: off by {err:.3g} (scale {scale:.3g})"


def oracle(model, args, mask_fn):
    """The original model in float64 with mask_fn applied to each attention."""
    m64 = copy.deepcopy(model).double()
    args64 = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    with torch.no_grad(), MaskedAttention(mask_fn, m64):
        return m64(*args64)


def snapshot(model):
    return dict(
        state={k: v.clone() for k, v in model.state_dict().items()},
        ids=[(n, id(t)) for n, t in list(model.named_parameters()) + list(model.named_buffers())],
        modules=[(n, type(m), id(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
                 for n, m in model.named_modules()],
        attrs=[(n, sorted(k for k in vars(m) if not k.startswith("_"))) for n, m in model.named_modules()],
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    for key in ("ids", "modules", "attrs"):
        assert after[key] == before[key], f"transform changed the model's {key}"
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"transform changed {k}"


def check_model(model, args, sparse_fn, *, kinds, names=None, example_inputs=False, concrete_args=None):
    """The whole contract on one model: sites, dense exactness, sparse vs oracle, report, no
    mutation, state_dict names. Returns the sparse-mask module."""
    before = snapshot(model)
    with torch.no_grad():
        want = model(*args)
    kw = dict(concrete_args=concrete_args)
    if example_inputs:
        kw["example_inputs"] = args
    seen = []

    def dense(site):
        seen.append(site)
        return torch.ones(site.q_len, site.kv_len, dtype=torch.bool)

    sparse = fxsparse.transform(model, dense, **kw)
    with torch.no_grad():
        assert_close(sparse(*args), want, what="all-True mask")
    assert [s.kind for s in seen] == kinds
    if names is not None:
        assert [s.name for s in seen] == names
    rows = fxsparse.report(sparse).rows
    assert [r.status for r in rows] == ["rewritten"] * len(kinds)
    assert all(r.density == 1.0 for r in rows)
    sparse.load_state_dict(model.state_dict(), strict=True)

    masked = fxsparse.transform(model, sparse_fn, **kw)
    with torch.no_grad():
        got = masked(*args)
    want_sparse = oracle(model, args, sparse_fn)
    assert_close(got, want_sparse, what="sparse mask vs oracle")
    assert (want_sparse.double() - want.double()).abs().max() > 1e-3 * want.abs().max(), "the mask changes nothing"
    assert_unchanged(model, before)
    return masked
