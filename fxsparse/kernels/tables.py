"""Triton kernels that write a Layout's flat tables directly: the packed-document layout
(``fxsparse.masks.packed_layout``) in four launches (the documents' ends by a cumulative sum, a memset,
two kernels) instead of the torch build's ~140 small ones, still with nothing read back to the host.

The mask: query row i attends to the keys of one interval [lo_i, hi_i] (its document's start to i when
causal, to the document's end when not; a padding row none), and key column j is attended by the rows
of one interval [clo_j, chi_j]; all four bounds are nondecreasing. So the kv blocks a query block visits
form one contiguous range [a, b] holding a contiguous run of full blocks [f0, f1]: its partial blocks
are [a, f0) then (f1, b]. The same holds for the query blocks visiting a kv block. Each block row and
block column is thus four numbers, and every table entry follows from them in O(1):

* ``_packed_ranges_kernel`` (one program per sample): the four numbers of every block row and column,
  and the slot of each row's first partial mask (a cumulative sum of the rows' partial counts, so the
  partial blocks take slots in row-major order, as ``masks.interval_tables`` gives them);
* ``_packed_tables_kernel`` (one program per block row and per block column, per sample): a row writes
  its kinds, mask ids, forward lists and the packed masks of its partial blocks; a column its
  transposed lists and the transposed masks (from the column intervals, not by transposing bits).

The lists follow ``layout._lists_into``: the selected blocks ascending, then the others ascending.
Slots past a sample's partial blocks stay zero. Same tables, bit for bit, as the torch build in
``fxsparse.masks`` (the path for CPU tensors, and the tests' oracle).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..layout import Layout, table_offsets
from .launch import launch_device

CHUNK = 256  # blocks one program of the tables kernel handles per step of its loops
RANGES_CHUNK = 4096  # at most this many block rows (columns) per step of the ranges kernel's loops


@triton.jit
def _doc_of(ends, D, steps, i, n):
    """(start, end, real) of the documents holding positions ``i``: the count of document ends <= i by
    binary search (``steps`` = bit length of D); ``real`` is False past the documents or past n."""
    lo = tl.zeros_like(i)
    hi = tl.zeros_like(i) + D
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(ends + mid, mask=active, other=0)
        go = active & (v <= i)
        hi = tl.where(active & (v > i), mid, hi)
        lo = tl.where(go, mid + 1, lo)
    real = (lo < D) & (i < n) & (i >= 0)
    start = tl.load(ends + lo - 1, mask=real & (lo > 0), other=0)
    end = tl.minimum(tl.load(ends + lo, mask=real, other=0), n)
    return start, end, real


@triton.jit
def _interval(ends, D, steps, i, n, CAUSAL: tl.constexpr, COLUMNS: tl.constexpr):
    """Row i's keys [first, last] (COLUMNS: column i's query rows); (n, n - 1) where there are none."""
    start, end, real = _doc_of(ends, D, steps, i, n)
    last = end - 1
    first = start
    if CAUSAL:
        if COLUMNS:
            first = i
        else:
            last = i
    return tl.where(real, first, n), tl.where(real, last, n - 1)


@triton.jit
def _ranges(ends, D, steps, n, real_end, blk, BS: tl.constexpr, CAUSAL: tl.constexpr, COLUMNS: tl.constexpr):
    """Block rows (COLUMNS: block columns) ``blk``: the visited range [a, b] of the other axis' blocks
    (a = 0, b = -1 when none) and its full run [f0, f1] (f0 = b + 1, f1 = b when none)."""
    r0 = blk * BS
    r1 = tl.minimum(r0 + BS, n) - 1
    some = r0 < real_end
    lo0, hi0 = _interval(ends, D, steps, r0, n, CAUSAL, COLUMNS)
    lo1, _ = _interval(ends, D, steps, r1, n, CAUSAL, COLUMNS)
    _, hil = _interval(ends, D, steps, tl.maximum(tl.minimum(r1, real_end - 1), 0), n, CAUSAL, COLUMNS)
    a = tl.where(some, lo0 // BS, 0)
    b = tl.where(some, hil // BS, -1)
    f0 = (lo1 + BS - 1) // BS  # every row starts at or before the block: lo of the last row
    f1 = tl.minimum((hi0 + 1) // BS - 1, n // BS - 1)  # every row reaches past it: hi of the first
    full = some & (r0 + BS <= n) & (f0 <= f1)
    return a, b, tl.where(full, f0, b + 1), tl.where(full, f1, b)


@triton.jit
def _packed_ranges_kernel(ENDS, RANGES, D, steps, n, nqb, nkb, slots,
                          BS: tl.constexpr, CAUSAL: tl.constexpr, CHUNK: tl.constexpr):
    """RANGES: int32 [B, 5, NQB + NKB]: a, b, f0, f1 of each block row then column, and (rows) the
    slot of the row's first partial mask, sample b's slots starting at b * slots."""
    s = tl.program_id(0)
    ends = ENDS + s * D
    real_end = tl.minimum(tl.load(ends + D - 1), n)
    stride = nqb + nkb
    out = RANGES + s * 5 * stride
    carry = s * slots
    for c0 in range(0, nqb, CHUNK):
        blk = c0 + tl.arange(0, CHUNK)
        m = blk < nqb
        a, b, f0, f1 = _ranges(ends, D, steps, n, real_end, blk, BS, CAUSAL, False)
        npart = tl.where(m, (b - a + 1) - (f1 - f0 + 1), 0)
        first = carry + tl.cumsum(npart, 0) - npart
        tl.store(out + blk, a, mask=m)
        tl.store(out + stride + blk, b, mask=m)
        tl.store(out + 2 * stride + blk, f0, mask=m)
        tl.store(out + 3 * stride + blk, f1, mask=m)
        tl.store(out + 4 * stride + blk, first, mask=m)
        carry += tl.sum(npart, 0)
    for c0 in range(0, nkb, CHUNK):
        blk = c0 + tl.arange(0, CHUNK)
        m = blk < nkb
        a, b, f0, f1 = _ranges(ends, D, steps, n, real_end, blk, BS, CAUSAL, True)
        tl.store(out + nqb + blk, a, mask=m)
        tl.store(out + stride + nqb + blk, b, mask=m)
        tl.store(out + 2 * stride + nqb + blk, f0, mask=m)
        tl.store(out + 3 * stride + nqb + blk, f1, mask=m)


@triton.jit
def _words(first, last, at):
    """Packed mask words: bit j of the word at position ``at`` is set when first <= at + j <= last."""
    lo = tl.minimum(tl.maximum(first - at, 0), 32).to(tl.int64)
    hi = tl.minimum(tl.maximum(last - at + 1, 0), 32).to(tl.int64)
    one = tl.full(lo.shape, 1, tl.int64)
    word = tl.where(hi > lo, (one << hi) - (one << lo), 0)
    return tl.where(word >= 2147483648, word - 4294967296, word).to(tl.int32)  # as a signed 32-bit word


@triton.jit
def _partial(p, a, f1, L):
    """The p-th partial block (p < the count): [a, a + L) then (f1, b]."""
    return tl.where(p < L, a + p, f1 + 1 + p - L)


@triton.jit
def _pick(p, a, b, f0, f1, npart, nf, L):
    """The p-th entry of a block list: the partial blocks [a, f0) then (f1, b] (p < npart), then the
    others ascending: [0, a), the full run [f0, f1], (b, end)."""
    q = p - npart
    rest = tl.where(q < a, q, tl.where(q < a + nf, f0 + q - a, b + 1 + q - a - nf))
    return tl.where(p < npart, _partial(p, a, f1, L), rest)


@triton.jit
def _full_first(p, f0, nf):
    """The p-th entry of a full-blocks list: the full run [f0, f0 + nf), then the others ascending."""
    q = p - nf
    return tl.where(p < nf, f0 + p, tl.where(q < f0, q, q + nf))


@triton.jit
def _slot(first, a, f0, f1, blk):
    """Mask slot of partial block ``blk`` of a row whose partial blocks [a, f0) then (f1, b] take the
    slots from ``first`` on."""
    return first + tl.where(blk < f0, blk - a, f0 - a + blk - f1 - 1)


@triton.jit
def _slot_in_row(rng, stride, qb, blk, sel):
    """Mask slot of partial block (qb, blk), from block row qb's ranges (where ``sel``)."""
    a = tl.load(rng + qb, mask=sel, other=0)
    f0 = tl.load(rng + 2 * stride + qb, mask=sel, other=0)
    f1 = tl.load(rng + 3 * stride + qb, mask=sel, other=0)
    first = tl.load(rng + 4 * stride + qb, mask=sel, other=0)
    return _slot(first, a, f0, f1, blk)


@triton.jit
def _packed_tables_kernel(ENDS, RANGES, DATA, D, steps, n, nqb, nkb, slots,
                          KINDS, MASK_ID, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, PART_MID,
                          T_FULL_NUM, T_FULL_IDX, T_PART_NUM, T_PART_IDX, T_PART_MID, BITS, T_BITS,
                          BS: tl.constexpr, CAUSAL: tl.constexpr, CHUNK: tl.constexpr, PB: tl.constexpr):
    W: tl.constexpr = BS // 32
    pid = tl.program_id(0)
    s = tl.program_id(1)
    ends = ENDS + s * D
    stride = nqb + nkb
    rng = RANGES + s * 5 * stride
    blk = tl.where(pid < nqb, pid, pid - nqb)  # this program's block row, or block column
    at = pid  # its ranges: rows first, then columns
    a = tl.load(rng + at)
    b = tl.load(rng + stride + at)
    f0 = tl.load(rng + 2 * stride + at)
    f1 = tl.load(rng + 3 * stride + at)
    nf = f1 - f0 + 1
    L = f0 - a  # partial blocks before the full run
    npart = L + b - f1
    pos = tl.arange(0, CHUNK)
    word = tl.arange(0, W)
    inner = tl.arange(0, BS)
    pp = tl.arange(0, PB)
    if pid < nqb:
        first_slot = tl.load(rng + 4 * stride + blk)
        row = (s * nqb + blk).to(tl.int64)
        for c0 in range(0, nkb, CHUNK):
            kb = c0 + pos
            m = kb < nkb
            full = (kb >= f0) & (kb <= f1)
            part = (kb >= a) & (kb <= b) & ~full
            tl.store(DATA + KINDS + row * nkb + kb, tl.where(full, 2, tl.where(part, 1, 0)), mask=m)
            slot = _slot(first_slot, a, f0, f1, kb)
            tl.store(DATA + MASK_ID + row * nkb + kb, tl.where(part, slot, -1), mask=m)
            tl.store(DATA + FULL_IDX + row * nkb + kb, _full_first(kb, f0, nf), mask=m)  # kb as a list position
            tl.store(DATA + PART_IDX + row * nkb + kb, _pick(kb, a, b, f0, f1, npart, nf, L), mask=m)
            tl.store(DATA + PART_MID + row * nkb + kb, tl.where(kb < npart, first_slot + kb, -1), mask=m)
        tl.store(DATA + FULL_NUM + row, nf)
        tl.store(DATA + PART_NUM + row, npart)
        # the partial blocks' masks: row i keeps the keys [lo_i, hi_i]
        lo, hi = _interval(ends, D, steps, blk * BS + inner, n, CAUSAL, False)
        for p0 in range(0, npart, PB):
            p = p0 + pp
            kbp = _partial(p, a, f1, L)
            words = _words(lo[None, :, None], hi[None, :, None], kbp[:, None, None] * BS + 32 * word[None, None, :])
            dst = DATA + BITS + (first_slot + p).to(tl.int64)[:, None, None] * (BS * W) + inner[None, :, None] * W
            keep = (p < npart) & (first_slot + p < (s + 1) * slots)  # within the sample's slots, whatever the input
            tl.store(dst + word[None, None, :], words, mask=keep[:, None, None])
    else:
        col = (s * nkb + blk).to(tl.int64)
        for c0 in range(0, nqb, CHUNK):
            p = c0 + pos
            m = p < nqb
            tl.store(DATA + T_FULL_IDX + col * nqb + p, _full_first(p, f0, nf), mask=m)
            qb = _pick(p, a, b, f0, f1, npart, nf, L)
            tl.store(DATA + T_PART_IDX + col * nqb + p, qb, mask=m)
            sel = m & (p < npart) & (qb >= 0) & (qb < nqb)  # the mask id of partial block (qb, blk), from row qb's
            slot = _slot_in_row(rng, stride, qb, blk, sel)
            tl.store(DATA + T_PART_MID + col * nqb + p, tl.where(sel, slot, -1), mask=m)
        tl.store(DATA + T_FULL_NUM + col, nf)
        tl.store(DATA + T_PART_NUM + col, npart)
        # the transposed masks: key j is attended by the query rows [clo_j, chi_j]
        clo, chi = _interval(ends, D, steps, blk * BS + inner, n, CAUSAL, True)
        for p0 in range(0, npart, PB):
            p = p0 + pp
            qbp = _partial(p, a, f1, L)
            sel = (p < npart) & (qbp >= 0) & (qbp < nqb)
            slot = _slot_in_row(rng, stride, qbp, blk, sel)
            sel = sel & (slot >= s * slots) & (slot < (s + 1) * slots)
            words = _words(clo[None, :, None], chi[None, :, None], qbp[:, None, None] * BS + 32 * word[None, None, :])
            dst = DATA + T_BITS + slot.to(tl.int64)[:, None, None] * (BS * W) + inner[None, :, None] * W
            tl.store(dst + word[None, None, :], words, mask=sel[:, None, None])


def packed_slots(nqb: int, nkb: int) -> int:
    """Partial-mask slots per sample: a bound on the partial blocks of any packed-document mask (see
    ``masks.interval_tables``), so the tables' size is known without reading anything back."""
    return 5 * nqb + 3 * nkb + 2


def packed_layout_tables(lengths: torch.Tensor, total: int, block_size: int, causal: bool) -> Layout:
    """The Layout of ``masks.packed_layout`` for int lengths [B, D] (D >= 1) on a CUDA device (or any
    device under TRITON_INTERPRET=1): one cumulative sum, one memset and two kernel launches; nothing
    is read back to the host. ``density`` is NaN, ``causal`` the flag."""
    bsz, docs = lengths.shape
    n, bs = int(total), int(block_size)
    if n >= 2**31 - 2 * bs:
        raise ValueError(f"packed_layout: total={n} tokens is past what the int32 tables index")
    nqb = nkb = math.ceil(n / bs)
    slots = packed_slots(nqb, nkb)
    offsets = table_offsets(bsz, 1, nqb, nkb)
    bits_at = offsets["bits"][0]
    words = bsz * slots * bs * (bs // 32)
    dev = lengths.device
    data = torch.empty(bits_at + 2 * words, dtype=torch.int32, device=dev)
    # slots past a sample's partial blocks stay zero, and so do the split's tables (no split) before them
    data[offsets["long_index"][0]:].zero_()
    ends = lengths.cumsum(-1, dtype=torch.int32)
    ranges = torch.empty(bsz, 5, nqb + nkb, dtype=torch.int32, device=dev)
    steps = docs.bit_length()
    chunk = min(RANGES_CHUNK, 1 << (nqb - 1).bit_length())  # one program per sample walks every block row
    at = [offsets[name][0] for name in ("kinds", "mask_id", "full_num", "full_idx", "part_num", "part_idx",
                                        "part_mid", "t_full_num", "t_full_idx", "t_part_num", "t_part_idx",
                                        "t_part_mid")]
    with launch_device(lengths):
        _packed_ranges_kernel[(bsz,)](ends, ranges, docs, steps, n, nqb, nkb, slots, BS=bs, CAUSAL=bool(causal),
                                      CHUNK=chunk, num_warps=max(4, chunk // 256))
        _packed_tables_kernel[(nqb + nkb, bsz)](ends, ranges, data, docs, steps, n, nqb, nkb, slots, *at,
                                                bits_at, bits_at + words, BS=bs, CAUSAL=bool(causal), CHUNK=CHUNK,
                                                PB=max(1, 2048 // (bs * (bs // 32))))
    return Layout(block_size=bs, shape=(n, n), batch=bsz, num_heads=1, data=data, density=float("nan"),
                  causal=bool(causal))
