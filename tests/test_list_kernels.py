"""The Triton build of a layout's lists and transposed masks (fxsparse.kernels.build) against the torch
build (``layout._write_lists``, the CPU path), bit for bit, on layouts of every builder that ends in
``layout._assemble``: token masks, runtime-mask folds (key padding, 4-D masks), random block kinds over
rows longer than one step of the kernel. Run on CUDA, or on CPU through Triton's interpreter
(``TRITON_INTERPRET=1 pytest -m interpret``); sizes stay small for the interpreter."""
from __future__ import annotations

import os

import pytest
import torch

import fxsparse.layout as L
from fxsparse import Layout, masks
from fxsparse import patterns as P
from fxsparse.kernels import build
from helpers import gen

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.interpret,
              pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1")]


def both_builds(monkeypatch, build):
    """build() with the lists written by the torch operations, then by the Triton kernels."""
    monkeypatch.setattr(L, "build_kernels", lambda device: False)
    torch_built = build()
    monkeypatch.setattr(L, "build_kernels", lambda device: True)
    return torch_built, build()


def random_kinds(bl, hl, nqb, nkb, bs, seed):
    """Random kinds with every partial block its own random mask."""
    g = gen(seed)
    kinds = torch.randint(0, 3, (bl, hl, nqb, nkb), generator=g).to(torch.int8)
    partial = kinds == L.PARTIAL
    mask_id = torch.where(partial, partial.flatten().cumsum(0).view(partial.shape) - 1, -1).to(torch.int32)
    bits = torch.randint(-2**31, 2**31 - 1, (int(partial.sum()), bs, bs // 32), generator=g, dtype=torch.int64)
    return kinds.to(DEVICE), mask_id.to(DEVICE), bits.to(torch.int32).to(DEVICE)


BUILDS = {
    # rows of 300 blocks: two steps of the lists kernel (256 blocks each), columns of 3
    "random kinds, long rows": lambda: L.layout_from_kinds(*random_kinds(1, 2, 3, 300, 32, 1), 32, (96, 9600),
                                                           density=float("nan"), causal=False),
    "random kinds, 64-blocks": lambda: L.layout_from_kinds(*random_kinds(2, 1, 5, 4, 64, 2), 64, (300, 250),
                                                           density=float("nan"), causal=False),
    "token mask": lambda: Layout.from_mask(torch.rand(2, 3, 70, 90, generator=gen(3)).to(DEVICE) < 0.2, 32),
    "sliding window": lambda: P.sliding_window(20, causal=True).layout(150, 150, block_size=32, device=DEVICE),
    # causal key padding keeps its torch tables (per kv block, four variants) on a GPU too
    "key padding": lambda: masks.key_padding_layout((torch.rand(3, 130, generator=gen(4)) < 0.6).to(DEVICE), 130,
                                                    block_size=32, causal=True),
    "4-D mask": lambda: masks.model_mask_layout((torch.rand(2, 1, 100, 70, generator=gen(5)) < 0.5).to(DEVICE), 100,
                                                block_size=32),
}


@pytest.mark.parametrize("name", list(BUILDS))
def test_list_kernels_write_the_torch_builds_tables(monkeypatch, name):
    want, got = both_builds(monkeypatch, BUILDS[name])
    assert got.data.shape == want.data.shape
    for table in L.TABLE_NAMES:
        a, b = getattr(got, table), getattr(want, table)
        assert torch.equal(a, b), f"{name}: table {table} differs"
    assert (got.density == want.density or got.density != got.density) and got.causal == want.causal
    assert got.split == want.split


@pytest.mark.parametrize("shape,bs,expand", [((2, 1, 100, 70), 32, False), ((1, 2, 64, 200), 64, False),
                                             ((3, 1, 1, 90), 32, True), ((1, 1, 130, 260), 128, False)])
def test_block_tables_kernel_equals_the_torch_build(shape, bs, expand):
    g = gen(sum(shape))
    keep = torch.rand(shape, generator=g) < 0.5
    keep[..., : shape[-1] // 2] = True  # some full blocks
    keep[..., -shape[-1] // 3:] = False  # some empty ones
    if expand:  # the query axis expanded with stride 0, as a model's key padding mask often is
        keep = keep.expand(shape[0], shape[1], 77, shape[3])
    else:
        keep = keep.transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major: any strides
    keep = keep.to(DEVICE)
    got = build.block_tables(keep, bs)
    want = masks._block_tables_torch(keep, bs)
    for name, a, b in zip(("kinds", "mask ids", "masks"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differ"
    assert bool((want[0] == L.FULL).any()) and bool((want[0] == L.PARTIAL).any()) and bool((want[0] == L.EMPTY).any())


def test_key_padding_by_the_block_pass_is_the_same_layout(monkeypatch):
    """Key padding on a GPU goes through the block pass (every block its own mask) where its masks are
    small: the same mask and block kinds as the torch tables (per kv block, four variants), and the
    large case keeps those tables."""
    keep = (torch.rand(3, 130, generator=gen(6)) < 0.6).to(DEVICE)
    keep[0, :64] = False
    want, got = both_builds(monkeypatch, lambda: masks.model_mask_layout(keep, 70, block_size=32))
    assert got.bits.shape[0] == 3 * 3 * 5 != want.bits.shape[0], "the block pass gives every block its mask"
    assert torch.equal(got.kinds, want.kinds) and torch.equal(got.to_mask(), want.to_mask())
    monkeypatch.setattr(masks, "KERNEL_PADDING_BYTES", 0)
    assert masks.model_mask_layout(keep, 70, block_size=32).bits.shape[0] == want.bits.shape[0]
