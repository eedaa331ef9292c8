"""The Triton kernels against the float64 oracle: on CUDA, or on CPU through Triton's interpreter.

Run as ``TRITON_INTERPRET=1 pytest tests -m interpret``: the variable must be set before triton is
imported, so these tests live in their own pytest process. Shapes stay small for the interpreter.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import fxsparse
from fxsparse import Layout
from fxsparse.testing import TOLERANCES, assert_close, compare_with_oracle, dense_attention
from helpers import gen, mixed_mask, qkv, random_mask

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
op = fxsparse.sparse_attention


def _tols(dtype):
    # on a GPU, float32 matmuls run in tf32 unless the precision is "highest"
    if dtype == torch.float32 and DEVICE == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return (5e-3, 1e-2)
    return TOLERANCES[dtype]


def _layout(mask, bs):
    return Layout.from_mask(mask.to(DEVICE), block_size=bs)


def test_the_kernels_run():
    from fxsparse.kernels import launch as kernels

    q, k, v = qkv(1, 2, 1, 40, 70, 16, device=DEVICE, grad=False)
    assert fxsparse.op._use_triton(q)
    mask = mixed_mask((), 40, 70, 32, seed=1)
    layout = _layout(mask, 32)
    got = op(q, k, v, layout, causal=True)
    # the op's output is bit for bit what the Triton forward writes
    direct = torch.empty_like(got)
    kernels.forward(q, k, v, (layout.data, layout.batch, layout.num_heads), None, q.shape[-1] ** -0.5, 32, True,
                    direct)
    assert torch.equal(got, direct)
    if INTERPRET:
        assert kernels.INTERPRETED and type(kernels.forward_kernel).__name__ == "InterpretedFunction"


# (B, H, Hkv, Nq, Nk, D, mask lead dims or None, block_size, packed qkv)
CASES = {
    "gqa_ragged_d24_per_head": (2, 2, 1, 97, 75, 24, (2,), 32, False),
    "d80_block64_2d_mask": (1, 2, 2, 70, 130, 80, (), 64, False),
    "batch_head_mask": (2, 2, 2, 96, 96, 16, (2, 2), 32, False),
    "gqa_batch_only_mask": (2, 2, 1, 64, 96, 16, (2, 1), 32, False),
    "packed_qkv_views": (2, 2, 2, 100, 100, 32, (1, 1), 32, True),
    "dense_none_mask": (1, 4, 2, 33, 100, 32, None, 32, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_matches_oracle(name, dtype):
    B, H, Hkv, Nq, Nk, D, lead, bs, packed = CASES[name]
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, dtype=dtype, device=DEVICE, packed=packed, seed=2)
    if packed:
        assert not q.is_contiguous()
    mask = None if lead is None else mixed_mask(lead, Nq, Nk, bs, seed=3, device=DEVICE)
    layout = None if mask is None else _layout(mask, bs)
    if layout is not None:  # both kinds of visited blocks are exercised
        assert (layout.kinds == 1).any() and (layout.kinds == 2).any()
    compare_with_oracle(op, q, k, v, mask, op_mask=layout, tols=_tols(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_grad_and_causal(dtype):
    B, H, Hkv, Nq, Nk, D = 1, 4, 2, 100, 64, 32
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, dtype=dtype, device=DEVICE, seed=4)
    bias = torch.randn(1, H, Nq, Nk, generator=gen(5)).to(DEVICE).requires_grad_()
    mask = mixed_mask((H,), Nq, Nk, 32, seed=6, device=DEVICE)
    compare_with_oracle(op, q, k, v, mask, op_mask=_layout(mask, 32), bias=bias, causal=True, tols=_tols(dtype))


@pytest.mark.parametrize("nq,nk", [(40, 100), (100, 40)])
def test_causal_nq_ne_nk(nq, nk):
    q, k, v = qkv(1, 2, 1, nq, nk, 16, device=DEVICE, seed=nq)
    compare_with_oracle(op, q, k, v, None, causal=True, tols=_tols(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padding_bias_and_empty_rows(dtype):
    B, H, N, D = 2, 2, 64, 32
    q, k, v = qkv(B, H, H, N, N, D, dtype=dtype, device=DEVICE, seed=7)
    bias = torch.zeros(B, 1, 1, N)
    bias[0, ..., 50:] = float("-inf")
    bias[1, ..., 20:] = float("-inf")
    bias = bias.to(DEVICE).requires_grad_()
    mask = random_mask((H,), N, N, 0.4, seed=8)
    mask[:, 3] = False
    mask[1, 33:64] = False  # a whole block row of head 1
    mask = mask.to(DEVICE)
    out = compare_with_oracle(op, q, k, v, mask, op_mask=_layout(mask, 32), bias=bias, tols=_tols(dtype))
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.equal(out[:, 1, 33:], torch.zeros_like(out[:, 1, 33:]))


def test_backward_with_non_contiguous_output_gradients():
    # out.sum() hands back a stride-0 gradient; merging heads hands back one in [B, Nq, H, D] order
    B, H, N, D = 1, 2, 70, 16
    q, k, v = qkv(B, H, 1, N, N, D, device=DEVICE, seed=14)
    mask = mixed_mask((), N, N, 32, seed=15, device=DEVICE)
    layout = _layout(mask, 32)
    weight = torch.arange(H * D, device=DEVICE, dtype=torch.float32)
    for loss in (lambda o: o.sum(), lambda o: (o.transpose(1, 2).reshape(B, N, H * D) * weight).sum()):
        got = torch.autograd.grad(loss(op(q, k, v, layout)), (q, k, v))
        want = torch.autograd.grad(loss(dense_attention(q, k, v, mask)), (q, k, v))
        for name, a, b in zip("qkv", got, want):
            assert_close(a, b, _tols(torch.float32)[1], f"grad {name}")


def test_finfo_min_padding_bias_keeps_softmax_over_padded_keys():
    # eager transformers pad with torch.finfo(float32).min, not -inf: a row whose allowed keys are all
    # padding gets the softmax over them (uniform), as in PyTorch, not an empty row
    B, H, N, D = 2, 2, 64, 16
    q, k, v = qkv(B, H, H, N, N, D, device=DEVICE, seed=60)
    bias = torch.zeros(B, 1, 1, N)
    bias[1, ..., 40:] = torch.finfo(torch.float32).min
    band = torch.arange(N)
    mask = ((band[:, None] - band[None, :]).abs() <= 4).to(DEVICE)  # rows 44.. of batch 1 see only padding
    compare_with_oracle(op, q, k, v, mask, op_mask=_layout(mask, 32), bias=bias.to(DEVICE), tols=_tols(torch.float32))


@pytest.mark.parametrize("nq,d", [(1, 32), (40, 256), (33, 12)])
def test_single_query_and_largest_head_dim(nq, d):
    q, k, v = qkv(1, 2, 2, nq, 50, d, device=DEVICE, seed=d)
    mask = random_mask((), nq, 50, 0.5, seed=16, device=DEVICE)
    mask[:, 0] = True
    compare_with_oracle(op, q, k, v, mask, op_mask=_layout(mask, 32), tols=_tols(torch.float32))


def test_fully_masked_rows_zero_output_and_gradient():
    q, k, v = qkv(1, 2, 2, 70, 50, 16, device=DEVICE, seed=9)
    mask = torch.ones(70, 50, dtype=torch.bool)
    mask[5] = False
    mask[64:] = False  # the ragged last block row
    out = op(q, k, v, _layout(mask, 32))
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))
    assert torch.equal(out[:, :, 64:], torch.zeros_like(out[:, :, 64:]))
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
    assert torch.equal(gq[:, :, 5], torch.zeros_like(gq[:, :, 5]))
    assert torch.equal(gq[:, :, 64:], torch.zeros_like(gq[:, :, 64:]))
    # nothing at all allowed
    none = op(q, k, v, _layout(torch.zeros(70, 50, dtype=torch.bool), 32))
    assert torch.equal(none, torch.zeros_like(none))
    for g in torch.autograd.grad(none, (q, k, v), torch.ones_like(none)):
        assert torch.equal(g, torch.zeros_like(g))


def test_identical_partial_blocks_shared():
    # causal-like tril mask: every diagonal block shares one packed mask
    q, k, v = qkv(1, 2, 2, 128, 128, 16, device=DEVICE, seed=10)
    mask = torch.ones(128, 128, dtype=torch.bool).tril()
    layout = _layout(mask, 32)
    assert layout.bits.shape[0] == 1
    compare_with_oracle(op, q, k, v, mask.to(DEVICE), op_mask=layout, tols=_tols(torch.float32))


@pytest.mark.parametrize("d,bs,fwd", [(32, 32, None), (24, 64, (32, 32, 4, 1))], ids=["d32", "d24_two_tiles_a_block"])
def test_rows_of_several_full_blocks(d, bs, fwd):
    # long runs of full tiles (the forward's loop without per-element work), whole or two tiles a block
    opts = fxsparse.KernelOptions(forward_config=fxsparse.LaunchConfig(*fwd) if fwd else None)
    q, k, v = qkv(1, 2, 1, 150, 230, d, device=DEVICE, seed=17)
    i, j = torch.arange(150)[:, None], torch.arange(230)[None, :]
    mask = ((i - j).abs() <= 90) & (torch.rand(2, 150, 230, generator=gen(18)) < 0.97) | (j < 140)
    layout = _layout(mask, bs)
    assert ((layout.kinds == 2).sum(-1) >= 2).any()  # rows with several full blocks
    compare_with_oracle(functools.partial(op, options=opts), q, k, v, mask.to(DEVICE), op_mask=layout,
                        tols=_tols(torch.float32))


def test_refined_layout_matches_oracle():
    # a 128-block layout at head dim <= 64 runs on its 64-block refinement (kernel_layout); the dk/dv
    # kernel reads the transposed element masks of the refined partial blocks
    q, k, v = qkv(1, 2, 1, 200, 180, 32, seed=14, device=DEVICE)
    i, j = torch.arange(200)[:, None], torch.arange(180)[None, :]
    mask = ((i - j).abs() <= 70) | (torch.rand(2, 200, 180, generator=gen(15)) < 0.05)
    layout = _layout(mask, 128)
    assert fxsparse.op.kernel_layout(layout, 32).block_size == 64
    bias = torch.randn(1, 2, 200, 180, generator=gen(16)).to(DEVICE).requires_grad_()
    compare_with_oracle(op, q, k, v, mask.to(DEVICE), op_mask=layout, bias=bias, causal=True)


@pytest.mark.skipif(DEVICE == "cuda", reason="sub-tile configs are chosen per GPU there; this exercises them on CPU")
@pytest.mark.parametrize("fwd,dq,dkdv", [((32, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1)),
                                          ((32, 64, 4, 1), (32, 64, 2, 1), (64, 32, 4, 1))])
def test_sub_tiles_inside_a_block(fwd, dq, dkdv):
    # the GPU configs split a layout block into smaller tiles; the interpreter otherwise runs whole blocks
    config = fxsparse.LaunchConfig
    opts = fxsparse.KernelOptions(forward_config=config(*fwd), dq_config=config(*dq), dkdv_config=config(*dkdv))
    q, k, v = qkv(1, 2, 1, 100, 90, 24, seed=11)
    bias = torch.randn(1, 2, 100, 90, generator=gen(12)).requires_grad_()
    mask = mixed_mask((2,), 100, 90, 64, seed=13)
    compare_with_oracle(functools.partial(op, options=opts), q, k, v, mask, op_mask=_layout(mask, 64), bias=bias,
                        causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["gqa_ragged", "packed_qkv"])
def test_kv_through_tensor_descriptors(dtype, packed, monkeypatch):
    """K and V (forward, dq) and q and the output's gradient (dk/dv) read through tensor descriptors
    (on by default at D = 128 on Hopper; forced here at a small head dim): rows past the sequence's
    end read as zeros, GQA heads and strided views address the right rows, with causality, a bias
    and partial blocks."""
    from fxsparse.kernels import launch as kernels

    opts = fxsparse.KernelOptions(forward_descriptors=True, backward_descriptors=True)
    used = []
    make = kernels._tile_descriptors

    def spy(*args):
        made = make(*args)
        used.append([list(t.block_shape) for t in made])
        return made

    monkeypatch.setattr(kernels, "_tile_descriptors", spy)
    B, H, Hkv, Nq, Nk, D = (2, 2, 2, 80, 80, 32) if packed else (1, 4, 2, 90, 75, 32)
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, dtype=dtype, device=DEVICE, packed=packed, seed=21)
    bias = torch.randn(1, H, Nq, Nk, generator=gen(22)).to(DEVICE).requires_grad_()
    mask = mixed_mask((H,), Nq, Nk, 32, seed=23, device=DEVICE)
    compare_with_oracle(functools.partial(op, options=opts), q, k, v, mask, op_mask=_layout(mask, 32), bias=bias,
                        causal=True, tols=_tols(dtype))
    assert len(used) == 3 and all(shape[-1] == D for pair in used for shape in pair)  # forward, dq, dk/dv


def _global_token_mask(n: int, bs: int, heads: int = 0) -> torch.Tensor:
    """A band one block wide plus global tokens: query rows 0 and 5 * bs + 3 see every key, key columns 0
    and 7 * bs + 1 are seen by every query. With heads, one mask per head: the odd heads have only the
    first global row and column (fewer long lists than the widest head), shifted along both axes."""
    i = torch.arange(n)
    band = (i[:, None] - i[None, :]).abs() <= bs

    def one(rows, cols):
        m = band.clone()
        m[rows, :] = True
        m[:, cols] = True
        return m

    if not heads:
        return one([0, 5 * bs + 3], [0, 7 * bs + 1])
    return torch.stack([one([0, 5 * bs + 3], [0, 7 * bs + 1]) if h % 2 == 0
                        else one([0], [0]).roll((3 * bs, 2 * bs), (0, 1)) for h in range(heads)])


@pytest.mark.parametrize("causal,hkv,heads,bias", [(True, 1, 0, False), (False, 2, 2, True)],
                         ids=["causal_gqa_ragged", "per_head_bias"])
def test_long_rows_and_columns_split_across_programs(causal, hkv, heads, bias, monkeypatch):
    # global rows and columns visit every block; with a small minimum chunk the kernels walk them in
    # several programs (forward and dq: rows, dk/dv: columns) and merge: the result is the oracle's
    monkeypatch.setattr(fxsparse.layout, "SPLIT_MIN_CHUNK", 2)
    n = 32 * 32 + (5 if causal else 0)
    mask = _global_token_mask(n, 32, heads)
    layout = _layout(mask, 32)
    chunk, rows, chunks, t_chunk, cols, t_chunks = layout.split
    assert rows == 2 and cols == 2 and chunks >= 3 and t_chunks >= 3
    if heads:  # the odd head has one long row and column: the programs for the widest head's second do nothing
        assert (layout.long_rows[0, 1] > 0).sum() == 1 and (layout.t_long_cols[0, 1] > 0).sum() == 1
    q, k, v = qkv(1, 2, hkv, n, n, 16, device=DEVICE, seed=21)
    b = torch.randn(1, 2, n, n, generator=gen(22)).to(DEVICE).requires_grad_() if bias else None
    compare_with_oracle(functools.partial(op, options=fxsparse.KernelOptions(refine=False)), q, k, v, mask,
                        op_mask=layout, bias=b, causal=causal)
