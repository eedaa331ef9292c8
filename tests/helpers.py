"""Helpers shared by the tests: seeded inputs for the op, and the whole contract of ``fxsparse.transform``
checked on one model. The oracles and the comparison live in ``fxsparse.testing``."""
from __future__ import annotations

import math

import torch

import fxsparse
from fxsparse.testing import assert_close, masked_forward

# -- inputs for the op ---------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def qkv(B, H, Hkv, Nq, Nk, D, *, dtype=torch.float32, device="cpu", seed=0, packed=False, grad=True):
    """q [B, H, Nq, D], k and v [B, Hkv, Nk, D]; packed=True makes them strided views of one qkv tensor."""
    g = gen(seed)
    if packed:
        assert H == Hkv and Nq == Nk, "a packed qkv has one head count and one length"
        base = torch.randn(B, Nq, 3 * H * D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
        q, k, v = base.reshape(B, Nq, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    v = torch.randn(B, Hkv, Nk, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (q, k, v))


def mixed_mask(lead, Nq, Nk, block_size, *, seed=0, device="cpu"):
    """bool [*lead, Nq, Nk] whose blocks are randomly full, partial (about half True) or empty."""
    g = gen(seed)
    nqb, nkb = math.ceil(Nq / block_size), math.ceil(Nk / block_size)
    kind = torch.randint(0, 3, (*lead, nqb, nkb), generator=g)
    kind = kind.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :Nq, :Nk]
    coin = torch.rand(*lead, Nq, Nk, generator=g) < 0.5
    return ((kind == 2) | ((kind == 1) & coin)).to(device)


def random_mask(lead, Nq, Nk, density, *, seed=0, device="cpu"):
    return (torch.rand(*lead, Nq, Nk, generator=gen(seed)) < density).to(device)


# -- the transform's contract on one model ---------------------------------------------------------


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
    want_sparse, _ = masked_forward(model, args, sparse_fn)
    assert_close(got, want_sparse, what="sparse mask vs oracle")
    assert (want_sparse.double() - want.double()).abs().max() > 1e-3 * want.abs().max(), "the mask changes nothing"
    assert_unchanged(model, before)
    return masked
