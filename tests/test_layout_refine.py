"""Layout.refine (the same mask in smaller blocks), the transposed element masks, the kernels' choice
of table block, the eager path of the op against the custom op it stands in for, and the output tensor."""
from __future__ import annotations

import pytest
import torch

import fxsparse
import fxsparse.op as op
from fxsparse import Layout
from fxsparse.layout import EMPTY, FULL, PARTIAL, unpack_bits
from fxsparse.testing import compare_with_oracle
from helpers import gen, mixed_mask, qkv


def _window(nq, nk, w):
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    return (i - j).abs() <= w


@pytest.mark.parametrize("nq,nk,lead,bs,fine", [
    (300, 257, (2,), 128, 64),  # ragged edges, per-head masks
    (197, 197, (), 128, 32),
    (60, 100, (1, 2), 128, 64),  # fewer rows than one coarse block: sub-blocks past the end go
    (512, 512, (2, 1), 256, 64),
    (256, 256, (), 64, 64),  # same size: the layout itself
])
def test_refine_keeps_the_mask(nq, nk, lead, bs, fine):
    mask = _window(nq, nk, 40) | (torch.rand(*lead, nq, nk, generator=gen(1)) < 0.03)
    mask = mask.expand(*lead, nq, nk).clone()
    if lead:
        mask[..., :, :bs // 2] = True  # all-True parts inside partial blocks
    coarse = Layout.from_mask(mask, bs)
    fine_layout = coarse.refine(fine)
    assert fine_layout.block_size == fine and fine_layout.shape == coarse.shape
    assert fine_layout.num_blocks == (-(-nq // fine), -(-nk // fine))
    assert torch.equal(fine_layout.to_mask(), coarse.to_mask())
    assert torch.equal(fine_layout.to_mask().reshape(mask.shape), mask)
    assert fine_layout.density <= coarse.density + 1e-12
    if fine == bs:
        assert fine_layout is coarse


def test_refine_splits_partial_blocks_of_a_local_window():
    # |i - j| <= 128 in 128-blocks: 2 partial + 1 full block a row; in 64-blocks 2 partial + 3 full
    coarse = Layout.from_mask(_window(1024, 1024, 128), 128)
    fine = coarse.refine(64)
    inner = slice(2, -2)  # rows away from the sequence ends
    assert ((coarse.kinds[0, 0, 1:-1] == PARTIAL).sum(-1) == 2).all()
    assert ((fine.kinds[0, 0, inner] == PARTIAL).sum(-1) == 2).all()
    assert ((fine.kinds[0, 0, inner] == FULL).sum(-1) == 3).all()
    assert fine.density < coarse.density
    # identical partial parts are stored once
    assert fine.bits.shape[0] == 2


def test_refine_of_block_maps_and_dense_layouts():
    blocks = torch.rand(5, 4, generator=gen(2)) < 0.5
    coarse = Layout.from_blocks(blocks, 128)
    fine = coarse.refine(64)
    assert torch.equal(fine.kinds[0, 0], torch.where(blocks, FULL, EMPTY).to(torch.int8)
                       .repeat_interleave(2, 0).repeat_interleave(2, 1))
    dense = Layout.dense(197, 150)
    assert torch.equal(dense.refine(32).to_mask(), torch.ones(1, 1, 197, 150, dtype=torch.bool))


def test_refine_is_cached_and_travels_with_to():
    coarse = Layout.from_mask(_window(200, 200, 30), 128)
    fine = coarse.refine(64)
    assert coarse.refine(64) is fine
    moved = coarse.to("cpu")
    assert 64 in moved.refined and torch.equal(moved.refined[64].data, fine.data)
    with pytest.raises(ValueError, match="larger"):
        fine.refine(128)
    with pytest.raises(ValueError, match="block_size"):
        coarse.refine(48)


def test_transposed_element_masks():
    mask = mixed_mask((2,), 150, 170, 64, seed=4)
    layout = Layout.from_mask(mask, 64)
    assert torch.equal(unpack_bits(layout.t_bits), unpack_bits(layout.bits).transpose(-1, -2))


@pytest.mark.parametrize("refine", [False, True])
def test_visit_lists_carry_each_partial_blocks_mask(refine):
    """part_mid / t_part_mid: the mask id of every listed partial visit, forward and transposed; the
    kernels read it beside the block index. Checked against the block map and the packed masks."""
    mask = mixed_mask((2,), 300, 257, 128, seed=5)
    layout = Layout.from_mask(mask, 128)
    layout = layout.refine(64) if refine else layout
    kinds, bits = layout.kinds, unpack_bits(layout.bits)
    bs = layout.block_size
    for b in range(kinds.shape[0]):
        for h in range(kinds.shape[1]):
            for qb in range(kinds.shape[2]):
                n = int(layout.part_num[b, h, qb])
                listed = layout.part_idx[b, h, qb, :n].tolist()
                assert listed == [kb for kb in range(kinds.shape[3]) if kinds[b, h, qb, kb] == PARTIAL]
                for t, kb in enumerate(listed):
                    tile = mask[h, qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs]
                    got = bits[layout.part_mid[b, h, qb, t]][:tile.shape[0], :tile.shape[1]]
                    assert torch.equal(got, tile)
            for kb in range(kinds.shape[3]):
                n = int(layout.t_part_num[b, h, kb])
                for t, qb in enumerate(layout.t_part_idx[b, h, kb, :n].tolist()):
                    assert layout.t_part_mid[b, h, kb, t] == layout.mask_id[b, h, qb, kb] >= 0


def test_kernel_layout_choice():
    coarse = Layout.from_mask(_window(300, 300, 50), 128)
    assert op.kernel_layout(coarse, 64).block_size == 64
    assert op.kernel_layout(coarse, 40).block_size == 64
    assert op.kernel_layout(coarse, 80) is coarse  # 128-wide tiles there
    assert op.kernel_layout(coarse, 64, refine=False) is coarse  # KernelOptions(refine=False)


def test_the_op_on_a_refined_layout_matches_the_oracle():
    q, k, v = qkv(2, 2, 1, 230, 190, 32, seed=5)
    mask = mixed_mask((2,), 230, 190, 128, seed=6)
    bias = torch.randn(1, 2, 230, 190, generator=gen(7)).requires_grad_()
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask, op_mask=Layout.from_mask(mask, 128),
                        bias=bias, causal=True)


# ------------------------------------------------------------------------------ the eager path
def _run(q, k, v, layout, bias):
    out = fxsparse.sparse_attention(q, k, v, layout, bias=bias, causal=True)
    grads = torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out))
    return (out,) + grads


def test_eager_path_equals_the_custom_op(monkeypatch):
    q, k, v = qkv(2, 4, 2, 100, 90, 16, seed=8)
    bias = torch.randn(2, 1, 100, 90, generator=gen(9)).requires_grad_()
    layout = Layout.from_mask(mixed_mask((4,), 100, 90, 32, seed=10), 32)
    calls = []
    eager_apply = op._EagerAttention.apply
    monkeypatch.setattr(op._EagerAttention, "apply", lambda *a: calls.append(1) or eager_apply(*a))
    eager = _run(q, k, v, layout, bias)
    assert calls, "a plain eager call takes the eager path"
    monkeypatch.setattr(op, "_plain_eager", lambda tensors: False)
    custom = _run(q, k, v, layout, bias)
    assert len(calls) == 1
    for a, b in zip(eager, custom):
        assert torch.equal(a, b)


def test_traced_calls_take_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = qkv(1, 2, 2, 64, 64, 16, seed=11, grad=False)
    assert op._plain_eager((q, k, v, None))
    with FakeTensorMode() as mode:
        assert not op._plain_eager(tuple(mode.from_tensor(t) for t in (q, k, v)))
    layout = Layout.from_mask(torch.ones(64, 64, dtype=torch.bool).tril(), 32)
    graph = make_fx(lambda q, k, v: fxsparse.sparse_attention(q, k, v, layout))(q, k, v)
    targets = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    assert torch.ops.fxsparse.sparse_attention.default in targets


class _Sub(torch.Tensor):
    pass


def test_subclass_inputs_take_the_custom_op():
    q, k, v = qkv(1, 2, 2, 64, 64, 16, seed=12, grad=False)
    assert not op._plain_eager((q.as_subclass(_Sub), k, v))


@pytest.mark.parametrize("eager", [True, False], ids=["eager_path", "custom_op"])
def test_output_can_be_modified_in_place(eager, monkeypatch):
    # a model may scale the merged heads in place, with parameters that require grad (eval without
    # no_grad): the op's output is a plain tensor laid out [B, N, H, D], not a view made inside the op
    if not eager:
        monkeypatch.setattr(op, "_plain_eager", lambda tensors: False)
    q, k, v = qkv(2, 3, 3, 40, 40, 8, seed=13)
    out = fxsparse.sparse_attention(q, k, v)
    assert out._base is None and out.transpose(1, 2).is_contiguous()
    merged = out.transpose(1, 2).reshape(2, 40, 24)
    want = merged.detach() * 2
    merged.mul_(2)
    assert torch.equal(merged.detach(), want)


def test_split_lists_long_rows_and_columns():
    # a local band (3 blocks a row) with query block 6 global and kv block 9 seen by every query: the
    # two lists far longer than the mean are named, the others not
    nb, bs = 40, 32
    blocks = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        blocks[i, max(0, i - 1): i + 2] = True
    blocks[6, :] = True
    blocks[:, 9] = True
    layout = Layout.from_blocks(blocks, bs)
    chunk, rows, chunks, t_chunk, cols, t_chunks = layout.split
    mean = blocks.sum(-1).double().mean().item()
    assert chunk == max(fxsparse.layout.SPLIT_MIN_CHUNK, int(torch.tensor(2 * mean).ceil()))
    assert (rows, cols) == (1, 1) and chunks == -(-nb // chunk) and t_chunks == -(-nb // t_chunk)
    # the tables hold blocks and positions plus one (0: none)
    assert layout.long_rows.flatten().tolist() == [7] + [0] * (nb - 1)
    assert layout.long_index.flatten().tolist() == [1 if i == 6 else 0 for i in range(nb)]
    assert layout.t_long_cols.flatten().tolist() == [10] + [0] * (nb - 1)
    # the split follows the layout through .to() and refine (where the lists are twice as long, and so is the mean)
    assert layout.to("cpu").split == layout.split
    fine = Layout.from_blocks(blocks, 64).refine(32)
    assert fine.split[1] == fine.split[4] == 2
    # a band alone has no long list
    band = Layout.from_mask(_window(nb * bs, nb * bs, 40), bs)
    assert band.split == () and (band.long_rows == 0).all() and (band.t_long_cols == 0).all()
