"""fxsparse.sparse_attention on CPU (the exact chunked reference) against the float64 dense oracle; Layout; errors."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import fxsparse
from fxsparse import Layout
from fxsparse.testing import TOLERANCES, assert_close, compare_with_oracle, dense_attention, relative_error
from helpers import gen, mixed_mask, qkv, random_mask

if os.environ.get("TRITON_INTERPRET") == "1":
    # this file tests the reference path; under the interpreter the op would run the kernels instead
    pytest.skip("reference tests run without TRITON_INTERPRET", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
op = fxsparse.sparse_attention


# ------------------------------------------------------------------------------ the oracle itself
def test_oracle_matches_sdpa_in_float64():
    q, k, v = qkv(2, 4, 2, 33, 47, 16, dtype=torch.float64, grad=False)
    mask = random_mask((2, 4), 33, 47, 0.5)
    mask[..., 0] = True  # no empty rows: SDPA would give NaN there
    bias = torch.randn(2, 1, 33, 47, dtype=torch.float64, generator=gen(3))
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    sdpa_mask = bias.masked_fill(~mask, float("-inf"))
    want = F.scaled_dot_product_attention(q, kk, vv, attn_mask=sdpa_mask, scale=0.7)
    got = dense_attention(q, k, v, mask, bias=bias, scale=0.7)
    assert relative_error(got, want) < 1e-12
    # causal, Nq != Nk both ways
    for nq, nk in ((33, 47), (47, 33)):
        q, k, v = qkv(1, 2, 2, nq, nk, 16, dtype=torch.float64, grad=False)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert relative_error(dense_attention(q, k, v, causal=True), want) < 1e-12


def test_oracle_empty_rows_are_zero_with_zero_gradient():
    q, k, v = qkv(1, 1, 1, 4, 5, 16, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1] = False
    out = dense_attention(q, k, v, mask)
    assert torch.equal(out[0, 0, 1], torch.zeros(16, dtype=torch.float64))
    (gq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(gq[0, 0, 1], torch.zeros(16, dtype=torch.float64)) and torch.isfinite(gq).all()


# ------------------------------------------------------------------------------ against the oracle
# (B, H, Hkv, Nq, Nk, D, mask lead dims or None, block_size, packed qkv)
SHAPES = {
    "vit197_d80_per_head_mask": (2, 3, 3, 197, 197, 80, (3,), 64, False),
    "gqa_nq_gt_nk_batch_mask": (2, 4, 2, 150, 97, 48, (2, 4), 32, False),
    "mqa_nq_lt_nk_2d_mask": (1, 4, 1, 70, 260, 32, (), 64, False),
    "packed_qkv_views": (2, 4, 4, 197, 197, 64, (1, 1), 64, True),
    "block_256": (1, 2, 1, 300, 270, 16, (2,), 256, False),
    "batch_only_mask": (2, 4, 2, 100, 90, 32, (2, 1), 32, False),
    "dense_none_mask": (2, 2, 1, 130, 61, 24, None, 128, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", SHAPES)
def test_matches_oracle(name, dtype):
    B, H, Hkv, Nq, Nk, D, lead, bs, packed = SHAPES[name]
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, dtype=dtype, packed=packed, seed=1)
    if packed:
        assert not q.is_contiguous() and q.stride(-2) == 3 * H * D
    mask = None if lead is None else mixed_mask(lead, Nq, Nk, bs, seed=2)
    layout = None if mask is None else Layout.from_mask(mask, block_size=bs)
    if layout is not None:  # the case really mixes full, partial and empty blocks
        assert {0, 1, 2} <= set(layout.kinds.unique().tolist()) or bs == 256
    compare_with_oracle(op, q, k, v, mask, op_mask=layout)


@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("as_layout", [False, True], ids=["token_mask", "layout"])
def test_block_sizes_and_mask_forms(block_size, as_layout):
    q, k, v = qkv(2, 4, 2, 131, 100, 40, seed=block_size)
    mask = mixed_mask((4,), 131, 100, block_size, seed=5)
    layout = Layout.from_mask(mask, block_size=block_size) if as_layout else None
    compare_with_oracle(op, q, k, v, mask, op_mask=layout, scale=0.37)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows_and_columns(dtype):
    q, k, v = qkv(2, 2, 2, 97, 75, 32, dtype=dtype, seed=3)
    mask = random_mask((2, 2), 97, 75, 0.3, seed=4)
    mask[:, :, 5] = False
    mask[0, 1, 40:70] = False  # a whole block row of head 1, batch 0
    mask[..., 10] = False  # a key nobody sees
    out = compare_with_oracle(op, q, k, v, mask, op_mask=Layout.from_mask(mask, block_size=32))
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))
    assert torch.equal(out[0, 1, 40:70], torch.zeros_like(out[0, 1, 40:70]))


def test_fully_masked_rows_no_nan_zero_gradient():
    q, k, v = qkv(1, 2, 1, 70, 70, 16, seed=6)
    mask = torch.ones(70, 70, dtype=torch.bool)
    mask[3] = False
    mask[64:] = False  # the last, ragged block row: 6 rows, all empty
    bias = torch.randn(1, 2, 70, 70, generator=gen(7)).requires_grad_()
    out = op(q, k, v, mask, bias=bias)
    assert torch.isfinite(out).all()
    for rows in (slice(3, 4), slice(64, 70)):
        assert torch.equal(out[:, :, rows], torch.zeros_like(out[:, :, rows]))
    gq, gk, gv, gb = torch.autograd.grad(out, (q, k, v, bias), torch.randn_like(out))
    for g in (gq, gk, gv, gb):
        assert torch.isfinite(g).all()
    assert torch.equal(gq[:, :, 3], torch.zeros_like(gq[:, :, 3]))
    assert torch.equal(gq[:, :, 64:], torch.zeros_like(gq[:, :, 64:]))
    assert torch.equal(gb[:, :, 3], torch.zeros_like(gb[:, :, 3]))


def test_all_false_mask():
    q, k, v = qkv(1, 2, 2, 40, 50, 16, seed=8)
    mask = torch.zeros(40, 50, dtype=torch.bool)
    out = op(q, k, v, mask)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("d", [8, 12, 16, 256])
def test_head_dim_limits(d):
    q, k, v = qkv(1, 2, 1, 40, 33, d, seed=d)
    mask = random_mask((), 40, 33, 0.5, seed=d + 1)
    compare_with_oracle(op, q, k, v, mask)


def test_backward_with_non_contiguous_output_gradients():
    # out.sum() hands back a stride-0 gradient; merging heads hands back one in [B, Nq, H, D] order
    B, H, N, D = 2, 4, 60, 16
    q, k, v = qkv(B, H, 2, N, N, D, seed=33)
    mask = mixed_mask((H,), N, N, 32, seed=34)
    out, want = op(q, k, v, mask), dense_attention(q, k, v, mask)
    for got_loss, want_loss in (
        (out.sum(), want.sum()),
        ((out.transpose(1, 2).reshape(B, N, H * D) * torch.arange(H * D)).sum(),
         (want.transpose(1, 2).reshape(B, N, H * D) * torch.arange(H * D)).sum()),
    ):
        got_grads = torch.autograd.grad(got_loss, (q, k, v), retain_graph=True)
        want_grads = torch.autograd.grad(want_loss, (q, k, v), retain_graph=True)
        for name, a, b in zip("qkv", got_grads, want_grads):
            assert_close(a, b, 1e-5, f"grad {name}")


def test_float64_gradients_are_float64_accurate():
    q, k, v = qkv(1, 2, 2, 64, 64, 16, dtype=torch.float64, seed=35)
    compare_with_oracle(op, q, k, v, None, tols=(1e-10, 1e-10))


@pytest.mark.parametrize("shape", [(2, 1, 1, 50), (50,), (40, 1)])
def test_token_mask_broadcast_in_the_last_two_dims(shape):
    q, k, v = qkv(2, 2, 2, 40, 50, 16, seed=36)
    mask = random_mask(shape[:-1], 1, shape[-1], 0.6, seed=37).reshape(shape)
    mask[..., 0] = True
    compare_with_oracle(op, q, k, v, mask)


def test_finfo_min_padding_bias_keeps_softmax_over_padded_keys():
    # eager transformers pad with torch.finfo(float32).min: a row whose allowed keys are all padding
    # gets the (uniform) softmax over them as in PyTorch, forward and backward
    q, k, v = qkv(2, 2, 2, 64, 64, 16, seed=61)
    bias = torch.zeros(2, 1, 1, 64)
    bias[1, ..., 40:] = torch.finfo(torch.float32).min
    band = torch.arange(64)
    mask = (band[:, None] - band[None, :]).abs() <= 4  # rows 44.. of batch 1 see only padding
    compare_with_oracle(op, q, k, v, mask, op_mask=Layout.from_mask(mask, block_size=32), bias=bias)


# ------------------------------------------------------------------------------ bias
def _padding_bias(B, Nk):
    """[B, 1, 1, Nk]: 0 for tokens, -inf for padding (a different number of pads per batch)."""
    bias = torch.zeros(B, 1, 1, Nk)
    for b in range(B):
        bias[b, ..., Nk - 7 * (b + 1):] = float("-inf")
    return bias


BIAS_SHAPES = {
    "padding_B11Nk_inf": lambda B, H, Nq, Nk: _padding_bias(B, Nk),
    "swin_H_Nq_Nk": lambda B, H, Nq, Nk: torch.randn(H, Nq, Nk, generator=gen(11)),
    "1HNqNk": lambda B, H, Nq, Nk: torch.randn(1, H, Nq, Nk, generator=gen(12)),
    "full_BHNqNk": lambda B, H, Nq, Nk: torch.randn(B, H, Nq, Nk, generator=gen(13)),
    "Nq_Nk": lambda B, H, Nq, Nk: torch.randn(Nq, Nk, generator=gen(14)),
    "Nk": lambda B, H, Nq, Nk: torch.randn(Nk, generator=gen(15)),
    "B1NqNk": lambda B, H, Nq, Nk: torch.randn(B, 1, Nq, Nk, generator=gen(16)),
    "111Nk": lambda B, H, Nq, Nk: torch.randn(1, 1, 1, Nk, generator=gen(16)),
    "alibi_1H1Nk": lambda B, H, Nq, Nk: -torch.arange(H)[None, :, None, None] * 0.1 * torch.arange(Nk).float(),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", BIAS_SHAPES)
def test_bias_broadcast_and_gradient(kind, dtype):
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 77, 90, 32
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, dtype=dtype, seed=9)
    bias = BIAS_SHAPES[kind](B, H, Nq, Nk).requires_grad_()
    mask = mixed_mask((H,), Nq, Nk, 32, seed=10)
    compare_with_oracle(op, q, k, v, mask, op_mask=Layout.from_mask(mask, block_size=32), bias=bias)
    # the gradient comes back in the bias's own shape (compare_with_oracle checked its values)
    (gb,) = torch.autograd.grad(op(q, k, v, mask, bias=bias).float().sum(), (bias,))
    assert gb.shape == bias.shape


def test_bias_without_grad_and_expanded_bias():
    B, H, Nq, Nk, D = 2, 2, 50, 60, 16
    q, k, v = qkv(B, H, H, Nq, Nk, D, seed=17)
    base = torch.randn(Nk, generator=gen(18)).requires_grad_()
    bias = base.expand(B, H, Nq, Nk)  # stride-0 view
    compare_with_oracle(op, q, k, v, None, bias=bias)
    fixed = torch.randn(B, 1, Nq, Nk, generator=gen(19))  # no grad wanted
    compare_with_oracle(op, q, k, v, None, bias=fixed, causal=True)


def test_bias_constant_along_keys_changes_nothing():
    # softmax is shift-invariant per row: same output as without bias, and a zero gradient
    q, k, v = qkv(2, 2, 2, 40, 30, 16, seed=30)
    bias = (torch.randn(2, 1, 40, 1, generator=gen(31)) * 5).requires_grad_()
    mask = random_mask((2,), 40, 30, 0.5, seed=32)
    out = op(q, k, v, mask, bias=bias)
    assert_close(out, op(q, k, v, mask), 1e-5, "row-constant bias")
    (gb,) = torch.autograd.grad(out, (bias,), torch.randn_like(out))
    assert gb.shape == bias.shape and gb.abs().max() < 1e-5


def test_bias_all_inf_row_is_empty():
    q, k, v = qkv(2, 2, 2, 40, 30, 16, seed=20)
    bias = _padding_bias(2, 30)
    bias[1] = float("-inf")  # batch 1 is all padding
    bias.requires_grad_()
    out = compare_with_oracle(op, q, k, v, None, bias=bias)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


# ------------------------------------------------------------------------------ causal
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq,nk", [(100, 100), (130, 70), (70, 130), (1, 65)])
def test_causal_matches_oracle(nq, nk, dtype):
    q, k, v = qkv(2, 4, 2, nq, nk, 32, dtype=dtype, seed=nq + nk)
    mask = mixed_mask((1, 4), nq, nk, 32, seed=21)
    compare_with_oracle(op, q, k, v, mask, op_mask=Layout.from_mask(mask, block_size=32), causal=True)
    compare_with_oracle(op, q, k, v, None, causal=True)


@pytest.mark.parametrize("nq,nk", [(100, 60), (60, 100), (97, 97)])
def test_causal_aligned_as_sdpa(nq, nk):
    q, k, v = qkv(2, 3, 3, nq, nk, 32, dtype=torch.float64, seed=22)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = op(q, k, v, causal=True)
    assert relative_error(got, want) < 1e-12


# ------------------------------------------------------------------------------ SDPA equivalence, output
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_true_mask_equals_sdpa(dtype):
    q, k, v = qkv(2, 4, 4, 197, 150, 64, dtype=dtype, seed=23)
    mask = torch.ones(197, 150, dtype=torch.bool)
    got = op(q, k, v, Layout.from_mask(mask, block_size=64))
    want = F.scaled_dot_product_attention(q, k, v)
    tol = TOLERANCES[dtype][0]
    assert_close(got, want.double(), tol, "all-True mask vs SDPA")
    g = torch.randn(got.shape, generator=gen(24)).to(dtype)
    got_grads = torch.autograd.grad(got, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b.double(), TOLERANCES[dtype][1], "gradient vs SDPA")


def test_gqa_equals_sdpa_with_repeated_kv():
    q, k, v = qkv(1, 6, 2, 64, 80, 32, dtype=torch.float64, seed=25, grad=False)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    assert relative_error(op(q, k, v), want) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_shape_dtype_strides(dtype):
    B, H, Nq, Nk, D = 2, 4, 33, 20, 24
    q, k, v = qkv(B, H, 2, Nq, Nk, D, dtype=dtype, grad=False)
    out = op(q, k, v)
    assert out.shape == (B, H, Nq, D) and out.dtype == dtype and out.device == q.device
    # laid out as [B, Nq, H, D]: the usual transpose(1, 2).reshape(B, Nq, H * D) is a view
    assert out.transpose(1, 2).is_contiguous()
    merged = out.transpose(1, 2).reshape(B, Nq, H * D)
    assert merged.data_ptr() == out.data_ptr()
    # inputs untouched
    assert not q.requires_grad and q.shape == (B, H, Nq, D)


def test_layout_is_reused_across_calls_and_inputs_not_copied():
    q, k, v = qkv(1, 2, 2, 64, 64, 32, seed=26, packed=True)
    mask = mixed_mask((), 64, 64, 32, seed=27)
    layout = Layout.from_mask(mask, block_size=32)
    before = layout.data.clone()
    a = op(q, k, v, layout)
    b = op(q, k, v, layout)
    assert torch.equal(a, b)
    assert torch.equal(before, layout.data)


# ------------------------------------------------------------------------------ Layout
def _brute_blocks(mask4, bs):
    """Block kinds by loops: 2 (full) only if the whole bs x bs tile is in the sequence and True, 1 if any True."""
    bl, hl, nq, nk = mask4.shape
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    kinds = torch.zeros(bl, hl, nqb, nkb, dtype=torch.int64)
    for b in range(bl):
        for h in range(hl):
            for i in range(nqb):
                for j in range(nkb):
                    tile = mask4[b, h, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
                    whole = tile.shape == (bs, bs)
                    kinds[b, h, i, j] = 2 if (whole and tile.all()) else (1 if tile.any() else 0)
    return kinds


@pytest.mark.parametrize("bs", [32, 64, 128])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["2d", "per_head", "batch_head"])
def test_layout_round_trip(lead, bs):
    mask = mixed_mask(lead, 197, 150, bs, seed=bs + len(lead))
    mask[..., 0, :] = False
    layout = Layout.from_mask(mask, block_size=bs)
    back = layout.to_mask()
    assert back.dtype == torch.bool
    assert back.shape == (1,) * (4 - mask.dim()) + tuple(mask.shape)
    assert torch.equal(back, mask.reshape(back.shape))
    m4 = mask.reshape(back.shape)
    assert torch.equal(layout.kinds.long(), _brute_blocks(m4, bs))
    assert layout.shape == (197, 150) and layout.block_size == bs
    assert (layout.batch, layout.num_heads) == tuple(back.shape[:2])


def test_layout_default_block_size_is_valid():
    layout = Layout.from_mask(torch.ones(10, 300, dtype=torch.bool))
    assert layout.block_size in (32, 64, 128, 256)
    assert torch.equal(layout.to_mask()[0, 0], torch.ones(10, 300, dtype=torch.bool))


def test_layout_from_blocks_aligned():
    blocks = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    layout = Layout.from_blocks(blocks, 32)
    assert layout.shape == (64, 96)
    want = blocks.repeat_interleave(32, 0).repeat_interleave(32, 1)
    assert torch.equal(layout.to_mask()[0, 0], want)
    assert (layout.kinds == 1).sum() == 0  # whole blocks only: no partial work
    assert layout.density == pytest.approx(4 / 6)


def test_layout_from_blocks_ragged_and_per_head():
    blocks = torch.zeros(2, 4, 3, dtype=torch.bool)  # [H, NQB, NKB]
    blocks[0].fill_diagonal_(True)
    blocks[1, :, 2] = True
    layout = Layout.from_blocks(blocks, 32, shape=(100, 70))
    want = blocks.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :100, :70]
    assert torch.equal(layout.to_mask()[0], want)
    assert layout.shape == (100, 70)
    # the op with a from_blocks layout equals the oracle on the same token mask
    q, k, v = qkv(1, 2, 1, 100, 70, 16, seed=28)
    compare_with_oracle(op, q, k, v, want, op_mask=layout)
    with pytest.raises(ValueError, match="does not cover"):
        Layout.from_blocks(blocks, 32, shape=(200, 70))
    with pytest.raises(TypeError, match="bool"):
        Layout.from_blocks(blocks.int(), 32)


def test_layout_density_by_hand():
    # 100 x 100 tokens, blocks of 32: block rows/cols of 32, 32, 32 and 4 tokens
    blocks = torch.eye(4, dtype=torch.bool)
    layout = Layout.from_blocks(blocks, 32, shape=(100, 100))
    assert layout.density == pytest.approx((3 * 32 * 32 + 4 * 4) / 10_000)
    # one True token makes its whole block computed: 32 * 32 of 64 * 64
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[40, 5] = True
    assert Layout.from_mask(mask, block_size=32).density == pytest.approx(1024 / 4096)
    # per head the density is the mean over heads: head 0 all, head 1 nothing
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0] = True
    assert Layout.from_mask(mask, block_size=32).density == pytest.approx(0.5)


def test_layout_repr_is_readable():
    mask = torch.ones(100, 100, dtype=torch.bool).tril()
    text = repr(Layout.from_mask(mask, block_size=32))
    assert text.startswith("Layout(")
    assert "(100, 100)" in text and "block_size=32" in text
    # 4x4 blocks: below the diagonal 3 full and 3 partial (the last block row), 4 partial on it, 6 empty above
    # block row 3 and column 3 hold 4 tokens: never full (padding counts as False)
    for part in ("full=3", "partial=7", "empty=6"):
        assert part in text, text
    assert re.search(r"density=\d+(\.\d+)?%", text), text
    assert len(text) < 300


def test_layout_dedups_identical_partial_blocks():
    mask = torch.ones(256, 256, dtype=torch.bool).tril()  # 8 identical lower-triangular diagonal blocks
    layout = Layout.from_mask(mask, block_size=32)
    assert int((layout.kinds == 1).sum()) == 8
    assert layout.bits.shape[0] == 1
    assert torch.equal(layout.to_mask()[0, 0], mask)
    mask2 = mask.clone()
    mask2[33, 40] = True  # the second diagonal block now differs
    layout2 = Layout.from_mask(mask2, block_size=32)
    assert layout2.bits.shape[0] == 2
    assert torch.equal(layout2.to_mask()[0, 0], mask2)


def test_layout_to_device_and_wrong_device():
    mask = mixed_mask((2,), 64, 64, 32, seed=29)
    layout = Layout.from_mask(mask, block_size=32)
    same = layout.to("cpu")
    assert torch.equal(same.data, layout.data)
    assert same.density == layout.density and same.shape == layout.shape
    meta = layout.to("meta")
    assert meta.device.type == "meta" and layout.device.type == "cpu"
    q, k, v = qkv(1, 2, 2, 64, 64, 16, grad=False)
    with pytest.raises(ValueError, match="layout is on meta"):
        op(q, k, v, meta)


@pytest.mark.parametrize("bad", [16, 48, 512, 0, "64", 64.0])
def test_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size"):
        Layout.from_mask(torch.ones(64, 64, dtype=torch.bool), block_size=bad)
    with pytest.raises(ValueError, match="block_size"):
        Layout.from_blocks(torch.ones(2, 2, dtype=torch.bool), bad)


# ------------------------------------------------------------------------------ errors
def _inputs(B=1, H=4, Hkv=2, Nq=40, Nk=50, D=32, dtype=torch.float32):
    return qkv(B, H, Hkv, Nq, Nk, D, dtype=dtype, grad=False)


def test_error_wrong_rank():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        op(q[0], k, v)
    with pytest.raises(ValueError, match=r"k must be 4-D"):
        op(q, k[None], v)
    with pytest.raises(TypeError, match=r"v must be a torch.Tensor"):
        op(q, k, v.tolist())


def test_error_dtypes():
    q, k, v = _inputs()
    with pytest.raises(TypeError, match="share one dtype"):
        op(q, k.bfloat16(), v)
    with pytest.raises(TypeError, match="not supported"):
        op(q.int(), k.int(), v.int())


def test_error_device_mismatch_with_meta():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="one device"):
        op(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="bias is on meta"):
        op(q, k, v, bias=torch.zeros(50, device="meta"))


def test_error_shapes():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="k and v must have the same batch, heads and length"):
        op(q, k, v[:, :, :-1])
    with pytest.raises(ValueError, match="k and v must have the same batch, heads and length"):
        op(q, k, v.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="not a multiple"):
        op(*_inputs(H=4, Hkv=3))
    with pytest.raises(ValueError, match="batch of k/v"):
        op(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="head_dim of k"):
        op(q, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="head_dim of v must be between 1 and 256, got 300"):
        op(q, k, torch.zeros(*v.shape[:3], 300))
    with pytest.raises(ValueError, match="head_dim of v must be between 1 and 256, got 0"):
        op(q, k, v[..., :0])


@pytest.mark.parametrize("d", [257, 320])
def test_error_head_dim_out_of_range(d):
    with pytest.raises(ValueError, match=f"head_dim must be between 1 and 256, got {d}"):
        op(*_inputs(D=d))


def test_error_mask():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="does not broadcast"):
        op(q, k, v, torch.ones(40, 51, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        op(q, k, v, torch.ones(1, 1, 1, 40, 50, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be bool"):
        op(q, k, v, torch.ones(40, 50))
    with pytest.raises(TypeError, match="must be a fxsparse.Layout"):
        op(q, k, v, [[True]])
    with pytest.raises(ValueError, match="heads"):
        op(q, k, v, torch.ones(3, 40, 50, dtype=torch.bool))  # 3 heads in the mask, 4 in q
    with pytest.raises(ValueError, match="batch"):
        op(q, k, v, torch.ones(2, 4, 40, 50, dtype=torch.bool))  # batch 2 in the mask, 1 in q


def test_error_layout_for_another_shape():
    q, k, v = _inputs()
    layout = Layout.from_mask(torch.ones(40, 64, dtype=torch.bool), block_size=32)
    with pytest.raises(ValueError, match=r"layout was built for .*\(40, 64\).*\(40, 50\)"):
        op(q, k, v, layout)


def test_error_bias():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="bias of shape"):
        op(q, k, v, bias=torch.zeros(40, 49))
    with pytest.raises(ValueError, match="bias of shape"):
        op(q, k, v, bias=torch.zeros(3, 40, 50))  # 3 heads, q has 4
    with pytest.raises(ValueError, match="bias of shape"):
        op(q, k, v, bias=torch.zeros(1, 1, 1, 40, 50))
    with pytest.raises(TypeError, match="bias must be an additive float tensor"):
        op(q, k, v, bias=torch.ones(40, 50, dtype=torch.bool))
    with pytest.raises(TypeError, match="bias must be an additive float tensor"):
        op(q, k, v, bias=1.0)


def test_error_layout_inputs():
    with pytest.raises(TypeError, match="bool"):
        Layout.from_mask(torch.ones(8, 8), block_size=32)
    with pytest.raises(ValueError, match="2 to 4 dims"):
        Layout.from_mask(torch.ones(8, dtype=torch.bool), block_size=32)
    with pytest.raises(ValueError, match="empty"):
        Layout.from_mask(torch.ones(0, 8, dtype=torch.bool), block_size=32)


@pytest.mark.parametrize("nq,nk,bs", [(197, 197, 32), (64, 64, 32), (100, 70, 64), (5, 300, 128)])
def test_dense_layout_equals_the_all_true_mask(nq, nk, bs):
    dense = Layout.dense(nq, nk, bs)
    full = Layout.from_mask(torch.ones(nq, nk, dtype=torch.bool), block_size=bs)
    assert torch.equal(dense.to_mask(), full.to_mask()) and torch.equal(dense.kinds, full.kinds)
    assert dense.density == full.density == 1.0
