"""The op's block-skipping CPU path (fxsparse/cpu.py) against the exact chunked reference and the float64 oracle."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import fxsparse
from fxsparse import Layout, cpu, reference
from fxsparse.testing import TOLERANCES, assert_close, compare_with_oracle
from helpers import gen, mixed_mask, qkv

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the CPU path runs without TRITON_INTERPRET (the op then runs the kernels)", allow_module_level=True)


def _run(impl, q, k, v, layout, bias, scale, causal, dout):
    """impl's forward and backward through the op's interface: (out, row stats, dq, dk, dv, dbias)."""
    tables = (layout.data, layout.batch, layout.num_heads)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    stats = impl.forward(q, k, v, tables, bias, scale, layout.block_size, causal, out)
    grads = impl.backward(dout, q, k, v, out, stats, tables, bias, scale, layout.block_size, causal, bias is not None)
    return (out, stats) + tuple(grads)


# (B, H, Hkv, Nq, Nk, D, mask lead dims, block, causal, bias shape or None)
CASES = {
    "odd_lengths_gqa_batch_mask": (2, 4, 2, 150, 97, 24, (2, 4), 32, False, (2, 1, 150, 97)),
    "causal_mqa_nq_lt_nk": (1, 4, 1, 70, 260, 16, (), 64, True, (1, 4, 1, 260)),
    "per_head_layout_gqa": (1, 6, 2, 131, 131, 16, (6,), 32, False, None),
    "causal_square_block_128": (2, 2, 2, 300, 300, 8, (1,), 128, True, (300, 300)),
    "causal_nq_gt_nk": (1, 2, 1, 200, 90, 16, (), 32, True, None),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_in_float64(case, monkeypatch):
    """Every output of the forward and backward equals the reference's to float64 rounding; a small
    chunk budget makes each call run several chunks of different widths."""
    monkeypatch.setattr(cpu, "_CHUNK_ELEMENTS", 1 << 14)
    b, h, hkv, nq, nk, d, lead, bs, causal, bias_shape = CASES[case]
    q, k, v = qkv(b, h, hkv, nq, nk, d, dtype=torch.float64, grad=False)
    mask = mixed_mask(lead, nq, nk, bs, seed=1)
    mask[..., 3, :] = False  # an empty row
    layout = Layout.from_mask(mask, bs)
    bias = None if bias_shape is None else torch.randn(bias_shape, dtype=torch.float64, generator=gen(2))
    dout = torch.randn(b, h, nq, d, dtype=torch.float64, generator=gen(3))
    want = _run(reference, q, k, v, layout, bias, 0.3, causal, dout)
    got = _run(cpu, q, k, v, layout, bias, 0.3, causal, dout)
    names = ["out", "row stats", "dq", "dk", "dv", "dbias"]
    assert len(cpu._PLANS) and any(len(p[1]) > 1 for p in cpu._PLANS.values()), "expected several chunks"
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if name == "row stats":  # the log-sum of an empty row is +inf in both
            assert torch.equal(torch.isinf(g), torch.isinf(w)), name
            g, w = g.nan_to_num(posinf=0.0), w.nan_to_num(posinf=0.0)
        assert_close(g, w, 1e-12, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", ["odd_lengths_gqa_batch_mask", "causal_mqa_nq_lt_nk", "per_head_layout_gqa"])
def test_op_on_cpu_against_float64_oracle(case, dtype):
    """fxsparse.sparse_attention on CPU tensors (this path) against the dense float64 oracle: output and
    the gradients of q, k, v and the bias."""
    b, h, hkv, nq, nk, d, lead, bs, causal, bias_shape = CASES[case]
    q, k, v = qkv(b, h, hkv, nq, nk, d, dtype=dtype)
    mask = mixed_mask(lead, nq, nk, bs, seed=4)
    mask[..., 5, :] = False
    bias = None
    if bias_shape is not None:
        bias = torch.randn(bias_shape, generator=gen(5)).to(dtype).requires_grad_()
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask, op_mask=Layout.from_mask(mask, bs), bias=bias,
                        causal=causal)


def test_empty_rows_give_zero_output_and_zero_gradient():
    q, k, v = qkv(1, 2, 2, 40, 40, 16)
    mask = torch.ones(40, 40, dtype=torch.bool)
    mask[7] = False  # a row with no key
    bias = torch.zeros(1, 1, 40, 40)
    bias[..., 9, :] = float("-inf")  # a row whose every allowed score is -inf
    out = fxsparse.sparse_attention(q, k, v, Layout.from_mask(mask, 32), bias=bias)
    dq, dk = torch.autograd.grad(out.sum(), (q, k))
    for row in (7, 9):
        assert torch.equal(out[:, :, row], torch.zeros_like(out[:, :, row]))
        assert torch.equal(dq[:, :, row], torch.zeros_like(dq[:, :, row]))
    assert torch.isfinite(dk).all()


def test_all_true_mask_reproduces_sdpa():
    """The exactness rule: an all-True layout gives SDPA's dense result (and causal=True its causal one)."""
    q, k, v = qkv(2, 3, 3, 257, 257, 32, grad=False)
    for causal in (False, True):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        got = fxsparse.sparse_attention(q, k, v, None, causal=causal)
        assert_close(got, want, TOLERANCES[torch.float32][0], f"causal={causal}")


@pytest.mark.parametrize("nq,nk", [(64, 64), (64, 80), (32, 200)])
def test_causal_inside_one_diagonal_block(nq, nk):
    """A chunk of one query block whose keys all lie at or before its last row still needs the causal
    mask inside the block (its first rows see fewer keys): dense and all-True layouts, the op's 64-blocks."""
    q, k, v = qkv(1, 2, 1, nq, nk, 16)
    for mask in (None, torch.ones(nq, nk, dtype=torch.bool)):
        compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask, causal=True)


def test_skips_empty_blocks():
    """Only visited blocks are computed: a layout whose off-window blocks hold NaN keys still gives the
    oracle's answer (the dense reference, which multiplies every block, would spread the NaN)."""
    n, bs = 256, 64
    q, k, v = qkv(1, 2, 2, n, n, 16, grad=False)
    window = (torch.arange(n)[:, None] // bs - torch.arange(n)[None, :] // bs).abs() == 0  # diagonal blocks
    k, v = k.clone(), v.clone()
    k[:, :, bs:2 * bs] = float("nan")  # only block row 1 visits this kv block
    got = fxsparse.sparse_attention(q, k, v, Layout.from_mask(window, bs))
    assert torch.isnan(got[:, :, bs:2 * bs]).all() and torch.isfinite(torch.cat([got[:, :, :bs], got[:, :, 2 * bs:]], 2)).all()


def test_plan_is_rebuilt_when_the_tables_change():
    """Plans are cached per tables tensor; writing into the tables in place makes a new plan."""
    q, k, v = qkv(1, 1, 1, 64, 64, 16, dtype=torch.float64, grad=False)
    a = Layout.from_mask(torch.ones(64, 64, dtype=torch.bool).tril(), 32)
    b = Layout.from_mask(torch.ones(64, 64, dtype=torch.bool), 32)
    data = a.data.clone()
    first = fxsparse.sparse_attention(q, k, v, dataclasses.replace(a, data=data))
    data.copy_(b.data)
    second = fxsparse.sparse_attention(q, k, v, dataclasses.replace(b, data=data))
    assert_close(first, fxsparse.sparse_attention(q, k, v, a), 1e-12, "tril")
    assert_close(second, fxsparse.sparse_attention(q, k, v, b), 1e-12, "dense")


def test_expanded_and_materialized_padding_bias():
    """A padding mask as an additive bias, expanded (stride 0) or materialized [B, 1, Nq, Nk] as HuggingFace
    passes it: both against the float64 oracle, with the bias's gradient."""
    b, h, n, d = 2, 2, 150, 16
    q, k, v = qkv(b, h, h, n, n, d)
    keys = torch.zeros(b, 1, 1, n)
    keys[1, ..., 100:] = torch.finfo(torch.float32).min  # the second sequence is padded
    window = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= 40
    layout = Layout.from_mask(window, 32)
    for bias in (keys.expand(b, 1, n, n).requires_grad_(), keys.expand(b, 1, n, n).contiguous().requires_grad_()):
        compare_with_oracle(fxsparse.sparse_attention, q, k, v, window, op_mask=layout, bias=bias)


@pytest.mark.parametrize("case", ["odd_lengths_gqa_batch_mask", "causal_square_block_128"])
def test_masks_past_the_memory_budget_are_rebuilt_per_call(case, monkeypatch):
    """With no memory kept for masks the plan rebuilds each chunk's mask at every call: same results."""
    monkeypatch.setattr(cpu, "_MASK_BYTES", 0)
    monkeypatch.setattr(cpu, "_PLANS", type(cpu._PLANS)())
    b, h, hkv, nq, nk, d, lead, bs, causal, bias_shape = CASES[case]
    q, k, v = qkv(b, h, hkv, nq, nk, d, dtype=torch.float64, grad=False)
    layout = Layout.from_mask(mixed_mask(lead, nq, nk, bs, seed=6), bs)
    bias = None if bias_shape is None else torch.randn(bias_shape, dtype=torch.float64, generator=gen(7))
    dout = torch.randn(b, h, nq, d, dtype=torch.float64, generator=gen(8))
    want = _run(reference, q, k, v, layout, bias, 0.3, causal, dout)
    got = _run(cpu, q, k, v, layout, bias, 0.3, causal, dout)
    (plan,) = [p[1] for p in cpu._PLANS.values()]
    assert all(c.blocked is None and not c.additive for c in plan) and any(c.rebuild is not None for c in plan)
    for name, g, w in zip(["out", "stats", "dq", "dk", "dv", "dbias"], got, want):
        if name != "stats" and w is not None:
            assert_close(g, w, 1e-12, name)
