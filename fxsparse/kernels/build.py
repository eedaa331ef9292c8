"""Triton kernels for the builds of a Layout that a model's runtime mask (padding, packed documents)
pays on every forward, and under torch.compile once per layer. In torch operations on a GPU they were
~50 small launches, host-bound (1.4 ms of host time for 4 samples of 4096 tokens), plus several passes
over a token mask to cut it into blocks (1.6 ms of GPU time for a [4, 1, 4096, 4096] mask):

* ``block_tables``: a bool token mask's block kinds and packed masks in one pass over it (one program
  per block row, any strides, an axis expanded with stride 0 included), the tables of
  ``masks.block_tables``;
* ``write_lists``: what follows the kinds in ``layout._assemble``: the visit lists of every block row
  (forward tables) and block column (transposed tables), and the packed masks transposed.

The lists follow ``layout._lists_into``: the selected blocks ascending, then the others ascending,
and ``part_mid`` holds each partial entry's mask id (-1 past the partial ones). Same tables, bit for
bit, as the torch build (the path for CPU tensors, and the tests' oracle).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import layout
from .common import load_bits
from .launch import launch_device

CHUNK = 256  # blocks of a row one step of the lists kernel handles
FULL = tl.constexpr(layout.FULL)
PARTIAL = tl.constexpr(layout.PARTIAL)
EMPTY = tl.constexpr(layout.EMPTY)


@triton.jit
def _list_pos(sel, seen, total, c):
    """Where blocks c go in a list of the `total` selected ones (`sel`) first, the others after, both
    ascending (`layout._lists_into`), `seen` selected ones having gone before this step: (positions,
    selected ones so far)."""
    csum = seen + tl.cumsum(sel, 0)  # inclusive: selected blocks up to and with c
    return tl.where(sel != 0, csum - 1, total + c - csum), seen + tl.sum(sel, 0)


@triton.jit
def _lists_kernel(DATA, KINDS, MID, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, PART_MID, R, C, stride_r, stride_c,
                  CH: tl.constexpr):
    """One block row r of one (batch, head) slot: its C entries (kinds at KINDS + r * stride_r + c *
    stride_c within the slot's R x C kinds) become the full and partial lists, [slot, R, C] from the
    list offsets, and their counts, [slot, R]."""
    pid = tl.program_id(0).to(tl.int64)
    slot, r = pid // R, pid % R
    src = slot * R * C + r * stride_r
    n_full = 0
    n_part = 0
    for c0 in range(0, C, CH):
        c = c0 + tl.arange(0, CH)
        k = tl.load(DATA + KINDS + src + c * stride_c, mask=c < C, other=0)
        n_full += tl.sum((k == FULL).to(tl.int32), 0)
        n_part += tl.sum((k == PARTIAL).to(tl.int32), 0)
    dst = pid * C
    tl.store(DATA + FULL_NUM + pid, n_full)
    tl.store(DATA + PART_NUM + pid, n_part)
    seen_full = 0
    seen_part = 0
    for c0 in range(0, C, CH):
        c = c0 + tl.arange(0, CH)
        m = c < C
        k = tl.load(DATA + KINDS + src + c * stride_c, mask=m, other=0)
        mid = tl.load(DATA + MID + src + c * stride_c, mask=m, other=-1)
        pos, seen_full = _list_pos((k == FULL).to(tl.int32), seen_full, n_full, c)
        tl.store(DATA + FULL_IDX + dst + pos, c, mask=m)
        pos, seen_part = _list_pos((k == PARTIAL).to(tl.int32), seen_part, n_part, c)
        tl.store(DATA + PART_IDX + dst + pos, c, mask=m)
        tl.store(DATA + PART_MID + dst + pos, mid, mask=m)


@triton.jit
def _transpose_bits_kernel(DATA, SRC, DST, BS: tl.constexpr):
    """Mask p's packed bits (BS rows of BS // 32 words, bit j of word w = column 32 w + j) transposed."""
    W: tl.constexpr = BS // 32
    p = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BS)
    cols = tl.trans(load_bits(DATA + SRC, p, rows, 0, BLOCK=BS, ROWS=BS, COLS=BS).to(tl.int32))  # row = old column
    packed = tl.sum(tl.reshape(cols, [BS, W, 32]) << tl.arange(0, 32)[None, None, :], 2)  # distinct bits: sum = or
    tl.store(DATA + DST + p * BS * W + rows[:, None] * W + tl.arange(0, W)[None, :], packed)


@triton.jit
def _block_tables_kernel(KEEP, KINDS, MID, BITS, HL, NQB, NKB, NQ, NK, s_b, s_h, s_q, s_k,
                         BS: tl.constexpr, KB: tl.constexpr):
    """Block row qb of one (batch, head) slot of the token mask KEEP (uint8, strides s_*): each block's
    kind (empty, partial, full; tokens past NQ, NK are never attended), mask id (its own index where
    partial, else -1) and packed mask (every block its own), KB blocks at a time."""
    W: tl.constexpr = BS // 32
    pid = tl.program_id(0).to(tl.int64)
    slot, qb = pid // NQB, pid % NQB
    b, h = slot // HL, slot % HL
    rows = qb * BS + tl.arange(0, BS)
    src = KEEP + b * s_b + h * s_h + rows[:, None, None] * s_q
    for kb0 in range(0, NKB, KB):
        kb = kb0 + tl.arange(0, KB)
        cols = kb[None, :, None] * BS + tl.arange(0, BS)[None, None, :]  # [1, KB, BS]
        ok = (rows[:, None, None] < NQ) & (cols < NK) & (kb[None, :, None] < NKB)
        t = tl.load(src + cols * s_k, mask=ok, other=0) != 0  # [BS rows, KB blocks, BS columns]
        n_set = tl.sum(tl.sum(t.to(tl.int32), 2), 0)  # [KB]
        kind = tl.where(n_set == BS * BS, FULL, tl.where(n_set > 0, PARTIAL, EMPTY))
        block = pid * NKB + kb
        tl.store(KINDS + block, kind.to(tl.int8), mask=kb < NKB)
        tl.store(MID + block, tl.where(kind == PARTIAL, block, -1).to(tl.int32), mask=kb < NKB)
        words = tl.sum(tl.reshape(t.to(tl.int32), [BS, KB, W, 32]) << tl.arange(0, 32)[None, None, None, :], 3)
        dst = BITS + (block[None, :, None] * BS + tl.arange(0, BS)[:, None, None]) * W + tl.arange(0, W)[None, None, :]
        tl.store(dst, words, mask=(kb < NKB)[None, :, None])


def block_tables(keep: torch.Tensor, bs: int):
    """``masks.block_tables`` of a bool token mask [Bl, Hl, Nq, Nk] (any strides) in one launch:
    (kinds int8 [Bl, Hl, NQB, NKB], mask ids int32, packed masks int32 [every block, bs, bs // 32])."""
    bl, hl, nq, nk = keep.shape
    nqb, nkb = triton.cdiv(nq, bs), triton.cdiv(nk, bs)
    kinds = torch.empty(bl, hl, nqb, nkb, dtype=torch.int8, device=keep.device)
    mask_id = torch.empty(bl, hl, nqb, nkb, dtype=torch.int32, device=keep.device)
    bits = torch.empty(bl * hl * nqb * nkb, bs, bs // 32, dtype=torch.int32, device=keep.device)
    src = keep.view(torch.uint8)
    kb = max(1, min(triton.next_power_of_2(nkb), 16384 // (bs * bs)))  # a step holds at most 16384 entries
    with launch_device(keep):
        _block_tables_kernel[(bl * hl * nqb,)](src, kinds, mask_id, bits, hl, nqb, nkb, nq, nk, *src.stride(),
                                               BS=bs, KB=kb)
    return kinds, mask_id, bits


def write_lists(data: torch.Tensor, offsets: dict, dims: tuple, bs: int, masks: int) -> None:
    """Writes the forward and transposed lists of the kinds and mask ids already in ``data`` (the flat
    tables, ``offsets`` = ``layout.table_offsets(*dims)``), and the transposed copy of its ``masks``
    packed masks (those at ``offsets["bits"]``, then theirs right after them)."""
    bl, hl, nqb, nkb = dims
    at = {name: offsets[name][0] for name in offsets}
    bits_at = at["bits"]
    with launch_device(data):
        _lists_kernel[(bl * hl * nqb,)](data, at["kinds"], at["mask_id"], at["full_num"], at["full_idx"],
                                        at["part_num"], at["part_idx"], at["part_mid"], nqb, nkb, nkb, 1,
                                        CH=min(CHUNK, triton.next_power_of_2(nkb)))
        _lists_kernel[(bl * hl * nkb,)](data, at["kinds"], at["mask_id"], at["t_full_num"], at["t_full_idx"],
                                        at["t_part_num"], at["t_part_idx"], at["t_part_mid"], nkb, nqb, 1, nkb,
                                        CH=min(CHUNK, triton.next_power_of_2(nqb)))
        if masks:
            _transpose_bits_kernel[(masks,)](data, bits_at, bits_at + masks * bs * (bs // 32), BS=bs)
