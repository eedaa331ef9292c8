"""packed_layout's Triton build (fxsparse.kernels.tables) against its torch build and the materialized mask.

The kernels run on CUDA, or on CPU through Triton's interpreter (``TRITON_INTERPRET=1 pytest -m
interpret``, as tests/test_kernels.py); sizes stay small for the interpreter. The torch build (the path
for CPU tensors) is the oracle of the tables; the mask of document ids and Layout.from_mask are
independent of both.
"""
from __future__ import annotations

import collections
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fxsparse
from fxsparse import Layout
from fxsparse.layout import TABLE_NAMES
from fxsparse.masks import _packed_layout_torch, document_ids, packed_layout
from fxsparse.testing import compare_with_oracle
from helpers import gen, qkv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                   reason="needs CUDA or TRITON_INTERPRET=1")


def documents_mask(lengths, n, causal):
    """The bool [B, 1, n, n] mask of packed documents, from their ids (padding, id -1, attends to nothing)."""
    ids = document_ids(lengths, total=n)
    mask = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool).tril()
    return mask[:, None]


def cases():
    """(lengths [B, D], total, block size, causal): random lengths with empty and one-token documents,
    padding after the documents, one document over several blocks, batch 1 to 3."""
    g = gen(21)
    out = []
    for trial in range(12):
        longest = (2, 9, 70, 260)[trial % 4]
        lengths = torch.randint(0, longest, (1 + trial % 3, 1 + trial % 6), generator=g)
        if trial % 4 == 1:
            lengths[0, ::2] = 1  # one-token documents
        if trial % 5 == 0:
            lengths[-1, 0] = 0  # an empty document first
        n = max(1, int(lengths.sum(-1).max()) + int(torch.randint(0, 50, (), generator=g)))
        out.append((lengths, n, (32, 64, 128)[trial % 3], trial % 2 == 0))
    out.append((torch.tensor([[300, 0, 1, 1]]), 310, 64, True))  # a long document then short ones and padding
    out.append((torch.tensor([[64, 64, 64]]), 192, 64, False))  # documents on block edges: full blocks only
    out.append((torch.tensor([[5, 3]]), 10, 32, True))  # one block
    return out


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("lengths,n,bs,causal", cases())
def test_kernel_tables_equal_the_torch_build(lengths, n, bs, causal):
    """Every table, bit for bit, equals the torch build's; the mask equals the documents' and every
    block's kind is Layout.from_mask's."""
    from fxsparse.kernels.tables import packed_layout_tables

    got = packed_layout_tables(lengths.to(DEVICE), n, bs, causal)
    want = _packed_layout_torch(lengths, n, bs, causal)
    for name in TABLE_NAMES:
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), (name, lengths.tolist(), n, bs, causal)
    assert torch.equal(got.data.cpu(), want.data)
    mask = documents_mask(lengths, n, causal)
    assert torch.equal(got.to_mask().cpu(), mask)
    assert torch.equal(got.kinds.cpu(), Layout.from_mask(mask, bs).kinds)
    assert (got.batch, got.num_heads, got.shape, got.block_size, got.causal) == (lengths.shape[0], 1, (n, n), bs, causal)


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_built_layout_through_the_op(causal):
    """packed_layout on the kernels' device takes the Triton build; the op with its layout against the
    float64 oracle, forward and backward, batch 2."""
    lengths = torch.tensor([[40, 1, 0, 57], [128, 0, 0, 0]])
    n = 140
    layout = packed_layout(lengths.to(DEVICE), n, causal=causal, block_size=32)
    assert torch.equal(layout.data.cpu(), _packed_layout_torch(lengths, n, 32, causal).data)
    q, k, v = qkv(2, 2, 1, n, n, 16, seed=22, device=DEVICE)
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, documents_mask(lengths, n, causal).to(DEVICE),
                        op_mask=layout, causal=causal)


class _Dispatched(TorchDispatchMode):
    """Counts the torch operations dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


_METADATA = {"empty", "view", "slice", "unsqueeze", "alias", "expand", "squeeze", "transpose", "detach",
             "select", "as_strided", "t"}  # operations that launch no kernel


def test_kernel_build_launches_two_kernels_and_two_torch_ops(monkeypatch):
    """The Triton build's launches: its two kernels, the documents' ends (a cumulative sum) and the
    zeroing of the mask slots and the split tables, whatever the size; the torch build launches over a hundred."""
    from fxsparse.kernels import tables

    launched = []

    class Recorder:  # stands in for a kernel: records the launch, runs nothing
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.name, grid))

    monkeypatch.setattr(tables, "_packed_ranges_kernel", Recorder("ranges"))
    monkeypatch.setattr(tables, "_packed_tables_kernel", Recorder("tables"))
    lengths = torch.tensor([[900, 100, 1000, 48], [1024, 1024, 0, 0]])
    with _Dispatched() as kernel_path:
        tables.packed_layout_tables(lengths, 2048, 64, True)
    work = {op: c for op, c in kernel_path.ops.items() if op not in _METADATA}
    assert work == {"cumsum": 1, "zero_": 1}, work
    assert launched == [("ranges", (2,)), ("tables", (64, 2))]
    with _Dispatched() as torch_path:
        _packed_layout_torch(lengths, 2048, 64, True)
    assert sum(c for op, c in torch_path.ops.items() if op not in _METADATA) > 100
