"""fxsparse.transform on small random-weight models of the common families (tests/models.py).

For each family: the attentions found (count, names, lengths; checked against the oracle, which
finds them by running the original model), exactness with an all-True mask, a sparse mask
against the oracle (the original model with the mask applied to each attention, float64),
the report's statuses, and that the user's model is left as it was.
"""
import os
from collections.abc import Mapping

import pytest
import torch

import fxsparse
import models
from fxsparse import patterns
from fxsparse.testing import assert_close, masked_forward

CASES = [make() for make in models.CASES]
TOL = 1e-5          # relative to the largest magnitude of each output


def transform(case, model, mask_fn):
    kwargs = dict(case.transform_kwargs)
    if case.use_example_inputs:
        kwargs["example_inputs"] = case.inputs()
    if case.concrete_args is not None:
        kwargs["concrete_args"] = case.concrete_args
    return fxsparse.transform(model, mask_fn, **kwargs)


def tensors(out):
    """The tensors of a model output in order (tensor, tuple/list, dict or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in tensors(v)]
    return []


def run(model, args):
    with torch.no_grad():
        return tensors(model(*args))


def assert_close_to_scale(got, want, tol, what):
    assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, tol, f"{what}: output {i}")


def oracle_outputs(model, args, mask_fn):
    """The original model in float64, each attention masked by mask_fn: its output tensors and sites."""
    out, sites = masked_forward(model, args, mask_fn)
    return tensors(out), sites


def statuses(sparse):
    return [(r.name, r.status) for r in fxsparse.report(sparse).rows]


# Known failures of fxsparse on a family, by (case, test): each is xfail(strict=True), so the
# test turns red the day it starts passing and the entry must go.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def with_known_failures(cases, test_name):
    """Cases as pytest params, a known failure marked xfail(strict=True)."""
    out = []
    for c in cases:
        reason = KNOWN_FAILURES.get((c.name, test_name))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(c, marks=marks, id=c.name))
    return out


@pytest.fixture(params=CASES, ids=repr)
def case(request):
    reason = KNOWN_FAILURES.get((request.param.name, request.function.__name__))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    return request.param


def test_sites_found(case):
    model, args = case.build(), case.inputs()
    seen = []

    def record(site):
        seen.append(site)
        return None

    sparse = transform(case, model, record)
    run(sparse, args)
    names = [n for n, _, _ in case.sites]
    assert statuses(sparse) == [(n, "dense") for n in names]
    got = [(s.index, s.name, s.q_len, s.kv_len) for s in seen]
    assert got == [(i, n, q, kv) for i, (n, q, kv) in enumerate(case.sites)]
    # the oracle, which watches the original model run, sees the same attentions
    _, oracle_sites = oracle_outputs(model, args, None)
    assert [(s.name, s.q_len, s.kv_len, s.num_heads) for s in oracle_sites] == \
        [(s.name, s.q_len, s.kv_len, s.num_heads) for s in seen]


def test_all_true_mask_is_exact(case):
    model, args = case.build(), case.inputs()
    want = run(model, args)
    sparse = transform(case, model, patterns.dense())
    assert_close_to_scale(run(sparse, args), want, TOL, f"{case.name} with an all-True mask")
    assert statuses(sparse) == [(n, "rewritten") for n, _, _ in case.sites]


def test_sparse_mask_matches_oracle(case):
    model, args = case.build(), case.inputs()
    sparse = transform(case, model, case.sparse_fn)
    want, _ = oracle_outputs(model, args, case.sparse_fn)
    assert_close_to_scale(run(sparse, args), want, TOL, f"{case.name} with {case.sparse_fn!r}")
    # after the first forward every site's mask_fn has been called
    assert statuses(sparse) == [(n, s) for (n, _, _), s in zip(case.sites, case.sparse_status)]
    # the mask matters: the masked original is far from the dense one
    dense, _ = oracle_outputs(model, args, None)
    gap = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(want, dense))
    assert gap > 20 * TOL


def test_checkpoint_loads_by_name(case):
    """Another model's weights (a "pretrained checkpoint") load into the transformed model by
    the original names, and it then computes what that model computes."""
    model, args = case.build(), case.inputs()
    sparse = transform(case, model, patterns.dense())
    other = case.build()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    sparse.load_state_dict(other.state_dict(), strict=True)
    assert_close_to_scale(run(sparse, args), run(other, args), TOL,
                          f"{case.name} after load_state_dict")


def _snapshot(model):
    plain = (bool, int, float, str, type(None))
    config = getattr(model, "config", None)
    return dict(
        state={k: v.clone() for k, v in model.state_dict().items()},
        tensors=[(n, id(t)) for n, t in list(model.named_parameters()) + list(model.named_buffers())],
        modules=[(n, type(m), id(m)) for n, m in model.named_modules()],
        attrs=[(n, {k: v for k, v in vars(m).items() if isinstance(v, plain)})
               for n, m in model.named_modules()],
        hooks=[(n, len(m._forward_hooks), len(m._forward_pre_hooks))
               for n, m in model.named_modules()],
        config=None if config is None else (config.to_dict(),
                                            getattr(config, "_attn_implementation", None)),
    )


def test_model_not_mutated(case):
    model, args = case.build(), case.inputs()
    before, out_before = _snapshot(model), run(model, args)
    sparse = transform(case, model, case.sparse_fn)
    run(sparse, args)
    after = _snapshot(model)
    for key in ("tensors", "modules", "attrs", "hooks", "config"):
        assert after[key] == before[key], f"{case.name}: transform changed the model's {key}"
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{case.name}: {k} changed"
    assert_close_to_scale(run(model, args), out_before, 0.0, f"{case.name} after transform")


def _param_grads(model, args):
    outs = [o for o in tensors(model(*args)) if o.is_floating_point()]
    loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i))).sum()
               for i, o in enumerate(outs))
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: g for n, g in zip(params, grads) if g is not None}


def test_backward_with_all_true_mask_is_exact(case):
    model, args = case.build(), case.inputs()
    want = _param_grads(model, args)
    sparse = transform(case, model, patterns.dense())
    got = _param_grads(sparse, args)
    assert got.keys() == want.keys()
    scale = max(g.abs().max() for g in want.values())
    for name, g in want.items():
        err = (got[name] - g).abs().max()
        assert err <= TOL * scale, f"{case.name}: grad of {name} off by {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("case", [c for c in CASES if c.other_inputs is not None], ids=repr)
def test_new_input_size_calls_mask_fn_again(case):
    model = case.build()
    lengths = []

    def fn(site):
        lengths.append((site.index, site.q_len, site.kv_len))
        return case.sparse_fn(site)

    sparse = transform(case, model, fn)
    for args in (case.inputs(), case.other_inputs(), case.inputs()):
        want, sites = oracle_outputs(model, args, case.sparse_fn)
        assert_close_to_scale(run(sparse, args), want, TOL, f"{case.name} at {sites[0].q_len}")
    # once per site and length: the return to the first size reuses its layouts
    _, first = oracle_outputs(model, case.inputs(), None)
    _, other = oracle_outputs(model, case.other_inputs(), None)
    assert sorted(lengths) == sorted([(i, s.q_len, s.kv_len) for i, s in enumerate(first)] +
                                     [(i, s.q_len, s.kv_len) for i, s in enumerate(other)])


def per_head_windows(site):
    """Head h sees keys within h + 1 positions: a different mask on every head."""
    return torch.stack([patterns.sliding_window_mask(site.q_len, site.kv_len, window=h + 1)
                        for h in range(site.num_heads)])


def test_per_head_mask_matches_oracle(case):
    model, args = case.build(), case.inputs()
    sparse = transform(case, model, per_head_windows)
    want, _ = oracle_outputs(model, args, per_head_windows)
    assert_close_to_scale(run(sparse, args), want, TOL, f"{case.name} with per-head masks")
    assert statuses(sparse) == [(n, "rewritten") for n, _, _ in case.sites]


def test_mask_fn_may_return_a_layout(case):
    model, args = case.build(), case.inputs()

    def as_layout(site):
        mask = patterns.sliding_window_mask(site.q_len, site.kv_len, window=2)
        return fxsparse.Layout.from_mask(mask, block_size=32)

    sparse = transform(case, model, as_layout)
    want, _ = oracle_outputs(
        model, args, lambda s: patterns.sliding_window_mask(s.q_len, s.kv_len, window=2))
    assert_close_to_scale(run(sparse, args), want, TOL, f"{case.name} with a Layout")
    table = str(fxsparse.report(sparse))
    assert all(name in table for name, _, _ in case.sites)


def visited_fraction(mask, block):
    """Brute force: the fraction of the [q, kv] scores lying in blocks that hold a True."""
    q_len, kv_len = mask.shape
    area = 0
    for a in range(0, q_len, block):
        for b in range(0, kv_len, block):
            tile = mask[a:a + block, b:b + block]
            if tile.any():
                area += tile.numel()
    return area / (q_len * kv_len)


LONG_CASES = [make() for make in models.LONG_CASES]


def long_token_mask(case):
    if case.name.startswith("hf_bert"):
        return lambda s: patterns.sliding_window_mask(s.q_len, s.kv_len, window=8)
    return lambda s: patterns.local_2d_mask(s.q_len, s.kv_len, window=1)


@pytest.mark.parametrize("case", LONG_CASES, ids=repr)
def test_long_sequences_skip_empty_blocks(case):
    """Sequences of 200-258 tokens cut into 32-token blocks: full, partial and empty blocks."""
    model, args = case.build(), case.inputs()
    token_mask = long_token_mask(case)
    sparse = transform(case, model, lambda s: fxsparse.Layout.from_mask(token_mask(s), 32))
    want, _ = oracle_outputs(model, args, token_mask)
    assert_close_to_scale(run(sparse, args), want, TOL, f"{case.name} in 32-token blocks")
    rows = fxsparse.report(sparse).rows
    assert [(r.name, r.status, r.block) for r in rows] == \
        [(n, "rewritten", 32) for n, _, _ in case.sites]
    for row in rows:
        expected = visited_fraction(token_mask(row.site), 32)
        assert expected < 0.6
        assert row.density == pytest.approx(expected), row.name


def test_train_mode(case):
    """In train mode a site with active attention dropout is kept as it was and reported
    skipped; the others are rewritten. With the same seed the output is the original's."""
    model, args = case.build().train(), case.inputs()
    sparse = transform(case, model, patterns.dense())
    torch.manual_seed(7)
    got = tensors(sparse(*args))
    torch.manual_seed(7)
    want = tensors(model(*args))
    assert_close_to_scale(got, want, TOL, f"{case.name} in train mode")
    rows = fxsparse.report(sparse).rows
    expected = "skipped" if case.attn_dropout > 0 else "rewritten"
    assert [(r.name, r.status) for r in rows] == [(n, expected) for n, _, _ in case.sites]
    if case.attn_dropout > 0:
        assert all("dropout" in r.reason for r in rows)
    assert model.training and all(m.training for m in model.modules())


def test_pattern_that_does_not_fit_names_the_site():
    """local_2d on CLIP's text tower (12 tokens: no grid of patches) is an error naming it."""
    case = models.clip()
    with pytest.raises(Exception, match=r"text_model\.encoder\.layers\.0\.self_attn.*square grid"):
        sparse = transform(case, case.build(), patterns.local_2d(1))
        run(sparse, case.inputs())


@pytest.mark.interpret
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the Triton kernels on CPU: needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", with_known_failures(CASES + LONG_CASES,
                                                     "test_kernels_inside_models"))
def test_kernels_inside_models(case):
    """The Triton kernels (through the interpreter) inside each model: a sparse mask against the
    oracle (long sequences in 32-token blocks), and gradients with an all-True mask."""
    model, args = case.build(), case.inputs()
    if case in LONG_CASES:
        token_mask = long_token_mask(case)
        mask_fn = lambda s: fxsparse.Layout.from_mask(token_mask(s), 32)
    else:
        token_mask = mask_fn = case.sparse_fn
    want, _ = oracle_outputs(model, args, token_mask)
    sparse = transform(case, model, mask_fn)
    assert_close_to_scale(run(sparse, args), want, TOL, f"{case.name} through the kernels")

    want = _param_grads(model, args)
    got = _param_grads(transform(case, model, patterns.dense()), args)
    scale = max(g.abs().max() for g in want.values())
    for name, g in want.items():
        err = (got[name] - g).abs().max()
        assert err <= TOL * scale, f"{case.name}: grad of {name} off by {err:.3g} (scale {scale:.3g})"
