"""Triton kernels of block-sparse attention: forward, and backward as a dk/dv kernel plus a dq kernel.

Each query tile visits the kv blocks its layout row lists: partial blocks first (bounds checks and
the packed element mask), then full blocks (no per-element work). Softmax runs in base 2 with
log2(e) folded into the scale. The head dim is padded to a power of two inside the kernel by
masked loads, never by copying the inputs. Grouped-query heads index their kv head (h // G). At
D = 128 on Hopper the kernels read their streamed tiles (K and V in the forward and dq, q and the
output's gradient in dk/dv) through tensor descriptors (TMA) when the strides allow it, and
through pointer loads otherwise.

The forward saves two row statistics, base 2: the row max and log2 of the row sum (kept apart so
the log-sum survives beside a huge max, e.g. rows that only see finfo.min padding). The backward
recomputes the probabilities from them:
  * dq (and the bias gradient): one program per (batch, head, query tile) over the forward tables;
    it also computes delta = rowsum(out * dout) for its rows;
  * dk/dv, launched after it: one program per (batch, kv head, kv tile); it walks the transposed
    tables of every query head in its group, so no atomics are needed.
The layout's tables arrive as one flat int32 tensor plus the offsets of the ones a kernel walks.
Offsets of whole (batch, head) slices are int64: large tensors pass 2**31 elements.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..layout import bits_offsets, table_offsets

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once: triton itself reads it at import
# Launch knobs for benchmarks, read from the environment once (a call must not pay for reading it);
# benchmarks and tests change them here.
# FXSPARSE_FOLD / FXSPARSE_BWD_FOLD = 0: the scores' scale and shift as two operations (FOLD in
# _fwd_tile and _dkdv_tile).
# FXSPARSE_FWD_LOOK_AHEAD / FXSPARSE_DQ_LOOK_AHEAD / FXSPARSE_DKDV_LOOK_AHEAD: the padded head dim up
# to which that kernel reads the next full block's index one tile ahead (128 / 64 / 64; 0 = never).
# FXSPARSE_TMA: the forward reads K and V through tensor descriptors (`_tile_descriptors`) at D = 128
# (unset), wherever they fit (1), or never (0). FXSPARSE_BWD_TMA: the same choice for the backward,
# where the dq kernel reads K and V and the dk/dv kernel q and the output's gradient through them.
# FXSPARSE_FWD_MAXNREG / FXSPARSE_DKDV_MAXNREG=n: that kernel's threads hold at most n registers.
KNOBS = {name: os.environ.get(name) for name in (
    "FXSPARSE_FWD_CONFIG", "FXSPARSE_BWD_CONFIG", "FXSPARSE_FAST_LAUNCH", "FXSPARSE_FOLD", "FXSPARSE_BWD_FOLD",
    "FXSPARSE_FWD_LOOK_AHEAD", "FXSPARSE_DQ_LOOK_AHEAD", "FXSPARSE_DKDV_LOOK_AHEAD", "FXSPARSE_TMA", "FXSPARSE_BWD_TMA",
    "FXSPARSE_FWD_MAXNREG", "FXSPARSE_DKDV_MAXNREG")}


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    # Triton's CPU interpreter multiplies bfloat16 operands wrongly: there the host asks for "upcast".
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


# How a partial block's packed words become its element mask (H200, v4: 0 is 4x faster at 9 %): 1 = each element reads its own
# word (cached loads, no data movement between threads), 0 = one load of [rows, cols / 32] words
# expanded by broadcasting and a reshape. FXSPARSE_BITS_GATHER picks one for benchmarks.
BITS_GATHER = tl.constexpr(int(os.environ.get("FXSPARSE_BITS_GATHER", "0")))


@triton.jit
def _load_bits(BITS, mid, rows_in_block, j, BLOCK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Element mask [ROWS, COLS] of partial block `mid`: rows `rows_in_block`, columns j .. j + COLS."""
    W: tl.constexpr = BLOCK // 32
    base = BITS + mid * (BLOCK * W) + rows_in_block[:, None] * W
    if BITS_GATHER:
        cols = j + tl.arange(0, COLS)
        words = tl.load(base + (cols // 32)[None, :])
        return ((words >> (cols % 32)[None, :]) & 1) != 0
    else:
        words = tl.load(base + (j // 32 + tl.arange(0, COLS // 32))[None, :])
        bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
        return tl.reshape(bits, [ROWS, COLS]) != 0


@triton.jit
def _load2(ptrs, row_ok, col_ok, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A 2-D tile with only the bounds that can cut it: ROWS / COLS say whether row_ok / col_ok apply
    (sequence ends in ragged partial blocks, the head dim's padding)."""
    if ROWS and COLS:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif ROWS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif COLS:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _rows(P, DESC, b, hh, first, rows, offs_d, s_row, s_d, N, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
          ROWS: tl.constexpr, BOUNDS: tl.constexpr, TRANS: tl.constexpr, TMA: tl.constexpr):
    """Rows `rows` (first .. first + ROWS) of one head's [N, HEAD_DIM] slice as [ROWS, D_PAD], or
    transposed: through the tensor descriptor DESC over [B, H, N, D] at (b, hh) when TMA (rows past N
    read as zeros), else through pointers from P (the head's slice) with the bounds that can cut."""
    if TMA:
        x = DESC.load([b, hh, first, 0]).reshape(ROWS, D_PAD)
        if TRANS:
            x = tl.trans(x)
    elif TRANS:
        x = _load2(P + rows[None, :] * s_row + offs_d[:, None] * s_d, offs_d < HEAD_DIM, rows < N, D_PAD != HEAD_DIM,
                   BOUNDS)
    else:
        x = _load2(P + rows[:, None] * s_row + offs_d[None, :] * s_d, rows < N, offs_d < HEAD_DIM, BOUNDS,
                   D_PAD != HEAD_DIM)
    return x


@triton.jit
def _bias_log2(bias):
    # finite values are clamped first: torch.finfo(float32).min (eager padding masks) times log2(e)
    # would overflow to -inf and turn an all-padding row into an empty one, where PyTorch gives the
    # softmax over those keys; -inf stays -inf (a key that may not be attended)
    b = bias.to(tl.float32)
    return tl.where(b == float("-inf"), b, tl.maximum(b, -1e38)) * 1.4426950408889634


@triton.jit
def _query_tile(H, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    """Where this program's BLOCK_M query rows sit: (batch, head) slot (int64: whole slices can pass
    2**31 elements), batch, head, first row, layout block, rows within that block, rows, head-dim lanes."""
    pid_bh = tl.program_id(1).to(tl.int64)
    start_m = tl.program_id(0) * BLOCK_M
    qb = start_m // BLOCK
    offs_m = start_m + tl.arange(0, BLOCK_M)
    return pid_bh, pid_bh // H, pid_bh % H, start_m, qb, offs_m - qb * BLOCK, offs_m, tl.arange(0, D_PAD)


@triton.jit
def _tile_scores(
    s, Bias, BITS, mid, offs_m, rows_in_block, cols, j, sbm, sbn, NQ, NK,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Scores [BLOCK_M, BLOCK_N] (q·kᵀ·scale, base 2) with the bias added and the partial block's
    element mask and causality applied (-inf where a key may not be attended)."""
    if HAS_BIAS:
        bmask = (offs_m[:, None] < NQ) & (cols[None, :] < NK)
        s += _bias_log2(tl.load(Bias + offs_m[:, None] * sbm + cols[None, :] * sbn, mask=bmask, other=0.0))
    if PARTIAL:
        s = tl.where(_load_bits(BITS, mid, rows_in_block, j, BLOCK, BLOCK_M, BLOCK_N), s, float("-inf"))
    if IS_CAUSAL:
        s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
    return s


@triton.jit
def _visit_counts(PART_NUM, PART_IDX, FULL_NUM, FULL_IDX, row, NKB, start_m,
                  BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr, PAD: tl.constexpr):
    """How many partial and full kv blocks a query tile visits (causal: blocks that start after its
    last row are skipped)."""
    n_part = tl.load(PART_NUM + row)
    n_full = tl.load(FULL_NUM + row)
    if IS_CAUSAL:
        limit = (start_m + BLOCK_M - 1) // BLOCK + 1
        n_part = _count_below(PART_IDX + row * NKB, n_part, limit, PAD)
        n_full = _count_below(FULL_IDX + row * NKB, n_full, limit, PAD)
    return n_part, n_full


@triton.jit
def _count_below(IDX, num, limit, PAD: tl.constexpr):
    """How many of the first `num` (ascending) block indices at IDX are below `limit`."""
    offs = tl.arange(0, PAD)
    idx = tl.load(IDX + offs, mask=offs < num, other=limit)
    return tl.sum((idx < limit).to(tl.int32), 0)


@triton.jit
def _visit(IDX, t, end, SUB: tl.constexpr):
    """The block of tile t of a visit list (0 once t reaches `end`: a look-ahead past the last tile).

    The loops over full blocks may ask for the next tile's block one tile ahead (LOOK_AHEAD): the
    tile's loads depend on it, and a load whose address waits on another load takes a pipeline
    stage. H200: the dense forward at D = 64 1.112 -> 1.069 ms (4096); at D = 128 the stage it frees
    lets K and V be triple-buffered instead of double, 19.5 -> 17.0 ms (32768, RESULTS.md v9). Not
    over partial blocks (forward 10-18 % slower at 3-9 % density: 3 programs per SM instead of 4;
    RESULTS.md, v7 to v9), and in the backward only at D <= 64 (at 128 it halves the programs per SM)."""
    return tl.load(IDX + t // SUB, mask=t < end, other=0)


@triton.jit
def _full_visit(IDX, nxt, t, end, SUB: tl.constexpr, LOOK_AHEAD: tl.constexpr):
    """(block of full tile t, the look-ahead to carry to tile t + 1); `nxt` starts as _visit(IDX, first, ...)."""
    if LOOK_AHEAD:
        return nxt, _visit(IDX, t + 1, end, SUB)
    else:
        return tl.load(IDX + t // SUB), nxt


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, K, V, KD, VD, b, hk, Bias, BITS, kb, j, mid,
    offs_m, rows_in_block, offs_d, skn, skd, svn, svd, sbm, sbn,
    NQ, NK, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, BOUNDS: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, FOLD: tl.constexpr, TMA: tl.constexpr,
):
    first = kb * BLOCK + j
    cols = first + tl.arange(0, BLOCK_N)
    kt = _rows(K, KD, b, hk, first, cols, offs_d, skn, skd, NK, HEAD_DIM, D_PAD, BLOCK_N, BOUNDS, True, TMA)
    v = _rows(V, VD, b, hk, first, cols, offs_d, svn, svd, NK, HEAD_DIM, D_PAD, BLOCK_N, BOUNDS, False, TMA)
    if FOLD and not (PARTIAL or HAS_BIAS or IS_CAUSAL):
        # a tile with nothing to mask: the row max of the raw scores, scaled after (scale > 0), and the
        # scale and the shift in one multiply-add per score; the max is finite, no -inf guard
        qk = _dot(q, kt, PRECISION)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    else:
        s = _tile_scores(_dot(q, kt, PRECISION) * scale_log2, Bias, BITS, mid, offs_m, rows_in_block, cols, j,
                         sbm, sbn, NQ, NK, BLOCK, BLOCK_M, BLOCK_N, PARTIAL, HAS_BIAS, IS_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, KD, VD, Out, Lse, Bias, T, O_PART_MID, O_BITS, O_FULL_NUM, O_FULL_IDX, O_PART_NUM, O_PART_IDX,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    sbb, sbh, sbm, sbn, SLOT_B, SLOT_H,
    H, G, NQ, NK, NQB, NKB, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    PAD: tl.constexpr, RAGGED: tl.constexpr, FOLD: tl.constexpr, LOOK_AHEAD: tl.constexpr, TMA: tl.constexpr,
):
    """One program: BLOCK_M query rows (inside one layout block) of one (batch, head).

    Each visited kv block is walked in BLOCK // BLOCK_N tiles, in one flat loop per block kind so
    the compiler can prefetch the next tile while this one computes."""
    SUB: tl.constexpr = BLOCK // BLOCK_N
    PART_MID, BITS = T + O_PART_MID, T + O_BITS
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX = T + O_FULL_NUM, T + O_FULL_IDX, T + O_PART_NUM, T + O_PART_IDX
    pid_bh, b, h, start_m, qb, rows_in_block, offs_m, offs_d = _query_tile(H, BLOCK, BLOCK_M, D_PAD)
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    K += b * skb + (h // G) * skh
    V += b * svb + (h // G) * svh
    Bias += b * sbb + h * sbh
    b32, hk32 = b.to(tl.int32), (h // G).to(tl.int32)
    row = (b * SLOT_B + h * SLOT_H) * NQB + qb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    n_part, n_full = _visit_counts(PART_NUM, PART_IDX, FULL_NUM, FULL_IDX, row, NKB, start_m,
                                   BLOCK, BLOCK_M, IS_CAUSAL, PAD)
    for t in range(n_part * SUB):
        kb = tl.load(PART_IDX + row * NKB + t // SUB)
        mid = tl.load(PART_MID + row * NKB + t // SUB)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, K, V, KD, VD, b32, hk32, Bias, BITS, kb, (t % SUB) * BLOCK_N, mid,
            offs_m, rows_in_block, offs_d, skn, skd, svn, svd, sbm, sbn, NQ, NK, scale_log2,
            HEAD_DIM, D_PAD, BLOCK, BLOCK_M, BLOCK_N, True, RAGGED, HAS_BIAS, IS_CAUSAL, PRECISION, FOLD, TMA,
        )
    kb_next = _visit(FULL_IDX + row * NKB, 0, n_full * SUB, SUB)
    for t in range(n_full * SUB):
        kb, kb_next = _full_visit(FULL_IDX + row * NKB, kb_next, t, n_full * SUB, SUB, LOOK_AHEAD)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, K, V, KD, VD, b32, hk32, Bias, BITS, kb, (t % SUB) * BLOCK_N, 0,
            offs_m, rows_in_block, offs_d, skn, skd, svn, svd, sbm, sbn, NQ, NK, scale_log2,
            HEAD_DIM, D_PAD, BLOCK, BLOCK_M, BLOCK_N, False, False, HAS_BIAS, IS_CAUSAL, PRECISION, FOLD, TMA,
        )
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    log_l = tl.where(empty, float("inf"), tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < HEAD_DIM))
    # row statistics for the backward, base 2: the max and log2 of the sum, kept apart so that
    # log2(sum) survives next to a huge max (rows that only see finfo.min padding)
    tl.store(Lse + pid_bh * 2 * NQ + offs_m, m_safe, mask=offs_m < NQ)
    tl.store(Lse + pid_bh * 2 * NQ + NQ + offs_m, log_l, mask=offs_m < NQ)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, Q, DO, QD, DOD, b, h, Lse, Delta, Bias, BITS, qb, j, mid,
    offs_n, col0, offs_d, sqm, sqd, sdm, sdd, sbm, sbn,
    NQ, NK, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, BOUNDS: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, FOLD: tl.constexpr, TMA: tl.constexpr,
):
    first = qb * BLOCK + j
    rows = first + tl.arange(0, BLOCK_M)
    rmask = rows < NQ
    qt = _rows(Q, QD, b, h, first, rows, offs_d, sqm, sqd, NQ, HEAD_DIM, D_PAD, BLOCK_M, BOUNDS, True, TMA)
    do = _rows(DO, DOD, b, h, first, rows, offs_d, sdm, sdd, NQ, HEAD_DIM, D_PAD, BLOCK_M, BOUNDS, False, TMA)
    if BOUNDS:
        m2 = tl.load(Lse + rows, mask=rmask, other=0.0)
        log_l = tl.load(Lse + NQ + rows, mask=rmask, other=float("inf"))
        delta = tl.load(Delta + rows, mask=rmask, other=0.0)
    else:
        m2 = tl.load(Lse + rows)
        log_l = tl.load(Lse + NQ + rows)
        delta = tl.load(Delta + rows)
    if FOLD:  # no bias: the row's max and log-sum are shifted off in the scale's multiply-add
        st = _dot(k, qt, PRECISION) * scale_log2 - (m2 + log_l)[None, :]  # [kv rows, q rows]
    else:
        st = _dot(k, qt, PRECISION) * scale_log2
        if HAS_BIAS:
            bias = tl.load(Bias + rows[None, :] * sbm + offs_n[:, None] * sbn,
                           mask=rmask[None, :] & (offs_n[:, None] < NK), other=0.0)
            st += _bias_log2(bias)
    if PARTIAL:  # BITS holds the transposed masks: rows are keys
        st = tl.where(_load_bits(BITS, mid, col0 + tl.arange(0, BLOCK_N), j, BLOCK, BLOCK_N, BLOCK_M), st, float("-inf"))
    if IS_CAUSAL:
        st = tl.where(rows[None, :] >= offs_n[:, None], st, float("-inf"))
    if FOLD:
        pt = tl.math.exp2(st)
    else:  # apart: log_l survives beside a huge max (rows that only see finfo.min padding)
        pt = tl.math.exp2((st - m2[None, :]) - log_l[None, :])
    dv += _dot(pt.to(do.dtype), do, PRECISION)
    dpt = _dot(v, tl.trans(do), PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += _dot(dst.to(qt.dtype), tl.trans(qt), PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, QD, DOD, Lse, Delta, DK, DV, Bias, T, O_PART_MID, O_BITS, O_FULL_NUM, O_FULL_IDX, O_PART_NUM, O_PART_IDX,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    sbb, sbh, sbm, sbn, SLOT_B, SLOT_H,
    H, HKV, G, NQ, NK, NQB, NKB, scale, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    PAD: tl.constexpr, RAGGED: tl.constexpr, FOLD: tl.constexpr, LOOK_AHEAD: tl.constexpr, TMA: tl.constexpr,
):
    """One program: BLOCK_N kv rows (inside one layout block) of one (batch, kv head), over its query heads."""
    SUB: tl.constexpr = BLOCK // BLOCK_M
    PART_MID, BITS = T + O_PART_MID, T + O_BITS
    T_FULL_NUM, T_FULL_IDX, T_PART_NUM, T_PART_IDX = T + O_FULL_NUM, T + O_FULL_IDX, T + O_PART_NUM, T + O_PART_IDX
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    b32 = b.to(tl.int32)
    start_n = pid_n * BLOCK_N
    kb = start_n // BLOCK
    col0 = start_n - kb * BLOCK
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    nmask = (offs_n[:, None] < NK) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nmask, other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for g in range(G):
        h = hk * G + g
        slot = b * SLOT_B + h * SLOT_H
        trow = slot * NKB + kb
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdb + h * sdh
        Lh = Lse + (b * H + h) * 2 * NQ
        Dh = Delta + (b * H + h) * NQ
        Bh = Bias + b * sbb + h * sbh
        n_part = tl.load(T_PART_NUM + trow)
        n_full = tl.load(T_FULL_NUM + trow)
        first_part = 0
        first_full = 0
        if IS_CAUSAL:  # query blocks that end before this kv block are skipped
            first_part = _count_below(T_PART_IDX + trow * NQB, n_part, kb, PAD)
            first_full = _count_below(T_FULL_IDX + trow * NQB, n_full, kb, PAD)
        for t in range(first_part * SUB, n_part * SUB):
            qb = tl.load(T_PART_IDX + trow * NQB + t // SUB)
            mid = tl.load(PART_MID + trow * NQB + t // SUB)
            dk, dv = _dkdv_tile(
                dk, dv, k, v, Qh, DOh, QD, DOD, b32, h.to(tl.int32), Lh, Dh, Bh, BITS, qb, (t % SUB) * BLOCK_M, mid,
                offs_n, col0, offs_d, sqm, sqd, sdm, sdd, sbm, sbn, NQ, NK, scale_log2,
                HEAD_DIM, D_PAD, BLOCK, BLOCK_M, BLOCK_N, True, RAGGED, HAS_BIAS, IS_CAUSAL, PRECISION, FOLD, TMA,
            )
        qb_next = _visit(T_FULL_IDX + trow * NQB, first_full * SUB, n_full * SUB, SUB)
        for t in range(first_full * SUB, n_full * SUB):
            qb, qb_next = _full_visit(T_FULL_IDX + trow * NQB, qb_next, t, n_full * SUB, SUB, LOOK_AHEAD)
            dk, dv = _dkdv_tile(
                dk, dv, k, v, Qh, DOh, QD, DOD, b32, h.to(tl.int32), Lh, Dh, Bh, BITS, qb, (t % SUB) * BLOCK_M, 0,
                offs_n, col0, offs_d, sqm, sqd, sdm, sdd, sbm, sbn, NQ, NK, scale_log2,
                HEAD_DIM, D_PAD, BLOCK, BLOCK_M, BLOCK_N, False, False, HAS_BIAS, IS_CAUSAL, PRECISION, FOLD, TMA,
            )
    tl.store(DK + pid_bh * NK * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=nmask)
    tl.store(DV + pid_bh * NK * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=nmask)


@triton.jit
def _dq_tile(
    dq, q, do, m2, log_l, delta, K, V, KD, VD, b, hk, Bias, DBias, BITS, kb, j, mid,
    offs_m, rows_in_block, offs_d, skn, skd, svn, svd, sbm, sbn,
    NQ, NK, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, BOUNDS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, FOLD: tl.constexpr,
    TMA: tl.constexpr,
):
    first = kb * BLOCK + j
    cols = first + tl.arange(0, BLOCK_N)
    kt = _rows(K, KD, b, hk, first, cols, offs_d, skn, skd, NK, HEAD_DIM, D_PAD, BLOCK_N, BOUNDS, True, TMA)
    vt = _rows(V, VD, b, hk, first, cols, offs_d, svn, svd, NK, HEAD_DIM, D_PAD, BLOCK_N, BOUNDS, True, TMA)
    if FOLD:  # no bias: as in _dkdv_tile
        s = _tile_scores(_dot(q, kt, PRECISION) * scale_log2 - (m2 + log_l)[:, None], Bias, BITS, mid, offs_m,
                         rows_in_block, cols, j, sbm, sbn, NQ, NK, BLOCK, BLOCK_M, BLOCK_N, PARTIAL, False, IS_CAUSAL)
        p = tl.math.exp2(s)
    else:
        s = _tile_scores(_dot(q, kt, PRECISION) * scale_log2, Bias, BITS, mid, offs_m, rows_in_block, cols, j,
                         sbm, sbn, NQ, NK, BLOCK, BLOCK_M, BLOCK_N, PARTIAL, HAS_BIAS, IS_CAUSAL)
        p = tl.math.exp2((s - m2[:, None]) - log_l[:, None])
    dp = _dot(do, vt, PRECISION)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(kt.dtype), tl.trans(kt), PRECISION)
    if BIAS_GRAD:
        tl.store(DBias + offs_m[:, None] * NK + cols[None, :], ds,
                 mask=(offs_m[:, None] < NQ) & (cols[None, :] < NK))
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, KD, VD, DO, Out, Lse, Delta, DQ, Bias, DBias, T, O_PART_MID, O_BITS, O_FULL_NUM, O_FULL_IDX, O_PART_NUM,
    O_PART_IDX, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd, sob, soh, som, sod,
    sbb, sbh, sbm, sbn, SLOT_B, SLOT_H,
    H, G, NQ, NK, NQB, NKB, scale, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, IS_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, PAD: tl.constexpr, RAGGED: tl.constexpr, FOLD: tl.constexpr,
    LOOK_AHEAD: tl.constexpr, TMA: tl.constexpr,
):
    """One program: BLOCK_M query rows (inside one layout block) of one (batch, head)."""
    SUB: tl.constexpr = BLOCK // BLOCK_N
    PART_MID, BITS = T + O_PART_MID, T + O_BITS
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX = T + O_FULL_NUM, T + O_FULL_IDX, T + O_PART_NUM, T + O_PART_IDX
    pid_bh, b, h, start_m, qb, rows_in_block, offs_m, offs_d = _query_tile(H, BLOCK, BLOCK_M, D_PAD)
    mmask = (offs_m[:, None] < NQ) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=mmask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=mmask, other=0.0)
    m2 = tl.load(Lse + pid_bh * 2 * NQ + offs_m, mask=offs_m < NQ, other=0.0)
    log_l = tl.load(Lse + pid_bh * 2 * NQ + NQ + offs_m, mask=offs_m < NQ, other=float("inf"))
    # delta = rowsum(out * dout), stored for the dk/dv kernel that runs after this one
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=mmask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * NQ + offs_m, delta, mask=offs_m < NQ)
    K += b * skb + (h // G) * skh
    V += b * svb + (h // G) * svh
    Bias += b * sbb + h * sbh
    DBias += pid_bh * NQ * NK
    b32, hk32 = b.to(tl.int32), (h // G).to(tl.int32)
    row = (b * SLOT_B + h * SLOT_H) * NQB + qb
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    n_part, n_full = _visit_counts(PART_NUM, PART_IDX, FULL_NUM, FULL_IDX, row, NKB, start_m,
                                   BLOCK, BLOCK_M, IS_CAUSAL, PAD)
    for t in range(n_part * SUB):
        kb = tl.load(PART_IDX + row * NKB + t // SUB)
        mid = tl.load(PART_MID + row * NKB + t // SUB)
        dq = _dq_tile(
            dq, q, do, m2, log_l, delta, K, V, KD, VD, b32, hk32, Bias, DBias, BITS, kb, (t % SUB) * BLOCK_N, mid,
            offs_m, rows_in_block, offs_d, skn, skd, svn, svd, sbm, sbn, NQ, NK, scale_log2,
            HEAD_DIM, D_PAD, BLOCK, BLOCK_M, BLOCK_N, True, RAGGED, HAS_BIAS, BIAS_GRAD, IS_CAUSAL, PRECISION, FOLD,
            TMA,
        )
    kb_next = _visit(FULL_IDX + row * NKB, 0, n_full * SUB, SUB)
    for t in range(n_full * SUB):
        kb, kb_next = _full_visit(FULL_IDX + row * NKB, kb_next, t, n_full * SUB, SUB, LOOK_AHEAD)
        dq = _dq_tile(
            dq, q, do, m2, log_l, delta, K, V, KD, VD, b32, hk32, Bias, DBias, BITS, kb, (t % SUB) * BLOCK_N, 0,
            offs_m, rows_in_block, offs_d, skn, skd, svn, svd, sbm, sbn, NQ, NK, scale_log2,
            HEAD_DIM, D_PAD, BLOCK, BLOCK_M, BLOCK_N, False, False, HAS_BIAS, BIAS_GRAD, IS_CAUSAL, PRECISION, FOLD,
            TMA,
        )
    tl.store(DQ + pid_bh * NQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=mmask)


# ------------------------------------------------------------------------------------- launch
def _precision(dtype) -> str:
    if dtype == torch.bfloat16 and INTERPRET:
        return "upcast"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _next_pow2(n: int) -> int:
    # plain arithmetic: triton's helpers of the same name cost microseconds a call on the host
    return 1 << (n - 1).bit_length()


def _pad_dim(d: int) -> int:
    return max(16, _next_pow2(d))


def _pad_blocks(nqb: int, nkb: int, causal: bool) -> int:
    """Width of the causal bound search (a constexpr: 1 when not causal, so lengths don't recompile)."""
    return _next_pow2(max(nqb, nkb)) if causal else 1


def _ragged(nq: int, nk: int, block: int) -> bool:
    """Whether a sequence ends inside a block: only then do partial tiles need bounds checks (full
    blocks never cross a sequence's end, and partial blocks' element masks are False past it)."""
    return nq % block != 0 or nk % block != 0


def _table_args(tables, nqb: int, nkb: int):
    """The flat tables, the offsets of the six a kernel walks (forward, or transposed with the
    transposed element masks), and (SLOT_B, SLOT_H): how a (batch, head) pair picks its row of the
    tables (0 = broadcast)."""
    data, bl, hl = tables
    return (data,) + _offsets(data.numel(), bl, hl, nqb, nkb)


@functools.lru_cache(maxsize=1024)
def _offsets(numel: int, bl: int, hl: int, nqb: int, nkb: int):
    off = {n: o for n, (o, _) in table_offsets(bl, hl, nqb, nkb).items()}
    off["bits"], off["t_bits"] = bits_offsets(numel, bl, hl, nqb, nkb)
    fwd = tuple(off[n] for n in ("part_mid", "bits", "full_num", "full_idx", "part_num", "part_idx"))
    bwd = tuple(off[n] for n in ("t_part_mid", "t_bits", "t_full_num", "t_full_idx", "t_part_num", "t_part_idx"))
    return fwd, bwd, ((hl if bl > 1 else 0), (1 if hl > 1 else 0))


def _bias_args(bias, q, nk):
    if bias is None:
        return q, (0, 0, 0, 0), False  # any pointer; never read
    b, h, nq, _ = q.shape
    full = bias.expand(b, h, nq, nk)
    return full, full.stride(), True


def _triton_at_least(major: int, minor: int) -> bool:
    try:
        return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


# Compiled kernels by our own key of a launch, for `_launch`. Triton's `kernel[grid](...)` binds and
# specialises all of a call's ~50 arguments in Python before it launches (20-40 µs a launch on the
# H200 machine's host, as much as a small problem's GPU time); the key below is cheaper and implies
# Triton's specialisation (the exact scalars, each tensor's dtype and 16-byte alignment, the
# constexprs, warps and stages, the device), so the kernel it maps to is the one Triton would pick.
_COMPILED: dict = {}
try:  # CompiledKernel.run's signature as triton 3.3 - 3.8 call it, hooks in triton.knobs
    import triton.knobs

    _FAST_LAUNCH = not INTERPRET and _triton_at_least(3, 3)
except ImportError:
    _FAST_LAUNCH = False


def _current_device() -> int:
    return torch.cuda.current_device()


def _on_device(t: torch.Tensor):
    """Makes t's GPU the current device for the launches (nothing to do when it already is, or for CPU
    tensors under the interpreter): triton compiles for and launches on the current device, which
    need not be the one a model's tensors live on (a model on cuda:1 without torch.cuda.set_device)."""
    if t.device.type != "cuda" or t.device.index == _current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device.index)


def _current_stream(device: int):
    return triton.runtime.driver.active.get_current_stream(device)  # the raw stream handle triton launches on


def _hooked(hook) -> bool:
    """Whether a launch hook of triton's is set (triton >= 3.5 keeps an empty HookChain when none is)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _options(num_warps, num_stages, maxnreg) -> dict:
    """Triton's launch options (only the slow path builds them: the fast path has a compiled kernel)."""
    return dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))


def _launch(kernel, grid, ptrs, scalars, consts, num_warps, num_stages, maxnreg=None):
    """``kernel[grid](*ptrs, *scalars, **consts, num_warps=..., num_stages=...[, maxnreg=...])``; after the first call
    with a given key, straight to the compiled kernel's launcher (FXSPARSE_FAST_LAUNCH=0 turns that
    off, and a launch hook, e.g. a profiler's, sends every call through triton). ptrs: the tensor
    parameters (tensors or tensor descriptors), which come first (their device is the current one: see
    `_on_device`); scalars: the int and float ones after them. maxnreg caps the registers a thread holds."""
    if not _FAST_LAUNCH or KNOBS["FXSPARSE_FAST_LAUNCH"] == "0":
        kernel[grid](*ptrs, *scalars, **consts, **_options(num_warps, num_stages, maxnreg))
        return
    device = ptrs[0].device.index
    key = (id(kernel), device, num_warps, num_stages, maxnreg, *consts.values(), *scalars,
           *[(t.dtype, t.data_ptr() % 16 == 0) if isinstance(t, torch.Tensor) else None for t in ptrs])
    hit = _COMPILED.get(key)
    rt = triton.knobs.runtime
    if hit is None or _hooked(rt.launch_enter_hook) or _hooked(rt.launch_exit_hook):
        compiled = kernel[grid](*ptrs, *scalars, **consts, **_options(num_warps, num_stages, maxnreg))
        if hit is None and len(_COMPILED) < 4096 and hasattr(compiled, "packed_metadata"):  # a few hundred bytes each
            _COMPILED[key] = (compiled, tuple(consts[n] for n in kernel.arg_names[len(ptrs) + len(scalars):]))
        return
    compiled, tail = hit
    compiled.run(grid[0], grid[1], 1, _current_stream(device), compiled.function, compiled.packed_metadata,
                 None, None, None, *ptrs, *scalars, *tail)


def _fwd_plans(block: int, d_pad: int, dtype):
    """Launch plans (BLOCK_M, BLOCK_N, num_warps, num_stages, LOOK_AHEAD), fastest first; a plan whose
    kernel does not fit the GPU's shared memory gives way to the next (`_launch_fitting`).
    FXSPARSE_FWD_CONFIG="m,n,w,s" sets the only plan (benchmarks)."""
    look_ahead = d_pad <= int(KNOBS["FXSPARSE_FWD_LOOK_AHEAD"] or 128)
    env = KNOBS["FXSPARSE_FWD_CONFIG"]
    if env:
        m, n, w, s = (int(x) for x in env.split(","))
        plans = [(m, n, w, s, look_ahead)]
    elif INTERPRET:
        plans = [(block, block, 4, 1, look_ahead)]
    elif dtype == torch.float32 or d_pad > 128:
        plans = [(64, 64, 4, 2, look_ahead), (32, 32, 4, 1, False)]
    elif d_pad <= 64:  # H200, bf16, D = 64: 64x64 tiles beat 128x128 by 1.5x at 9 % density (RESULTS.md)
        plans = [(64, 64, 4, 3, look_ahead), (64, 64, 4, 2, False)]
    else:  # D = 128 with the look-ahead: q + 3 K + 3 V tiles, 229376 B (an H100/H200; an A100 has 166912 B)
        plans = [(128, 128, 8, 3, look_ahead), (128, 128, 8, 3, False), (64, 64, 4, 2, False)]
    return [(min(m, block), min(n, block), w, s, la) for m, n, w, s, la in plans]


def _bwd_plans(block: int, d_pad: int, dtype):
    """Launch plans of the dq kernel and of the dk/dv kernel, fastest first, each (rows, cols,
    num_warps, num_stages, LOOK_AHEAD): rows are the program's own (q rows for dq, kv rows for dk/dv).
    The last plan fits any GPU."""
    n1, m1, m2, n2, dkdv_ws, dq_ws = _bwd_config(block, d_pad, dtype)
    small = (min(32, block), min(32, block), 4, 1, False)
    return ([(m2, n2, *dq_ws, d_pad <= int(KNOBS["FXSPARSE_DQ_LOOK_AHEAD"] or 64)), small],
            [(n1, m1, *dkdv_ws, d_pad <= int(KNOBS["FXSPARSE_DKDV_LOOK_AHEAD"] or 64)), small])


def _bwd_config(block: int, d_pad: int, dtype):
    """dk/dv tile (kv rows, q rows), dq tile (q rows, kv rows), (num_warps, num_stages) of the dk/dv
    kernel and of the dq kernel; FXSPARSE_BWD_CONFIG="n1,m1,m2,n2,w,s" (both kernels) or
    "n1,m1,m2,n2,w,s,w_dq,s_dq" overrides it (benchmarks)."""
    env = KNOBS["FXSPARSE_BWD_CONFIG"]
    if env:
        values = [int(x) for x in env.split(",")]
        if len(values) not in (6, 8):
            raise ValueError(f"FXSPARSE_BWD_CONFIG={env!r}: expected n1,m1,m2,n2,warps,stages[,dq warps,dq stages]")
        n1, m1, m2, n2, w, s, *dq_ws = values
    elif INTERPRET:
        n1, m1, m2, n2, w, s, dq_ws = block, block, block, block, 4, 1, []
    elif dtype == torch.float32 or d_pad > 128:
        n1, m1, m2, n2, w, s, dq_ws = 64, 32, 64, 32, 4, 1, []
    else:  # H200, bf16, D = 64 and 128: best of the sweep in RESULTS.md
        n1, m1, m2, n2, w, s, dq_ws = 64, 64, 64, 64, 4, 3, []
    return min(n1, block), min(m1, block), min(m2, block), min(n2, block), (w, s), tuple(dq_ws) or (w, s)


_FITTED: dict = {}  # (kernel name, device, dtype, constexprs, knobs) -> the first launch plan that fitted the GPU


def _launch_fitting(key, plans, launch):
    """launch(plan) with the first plan of `plans()` whose compiled kernel fits the GPU. Triton raises
    OutOfResources before it launches a kernel that asks for more shared memory than the GPU has.
    The plan that fitted is remembered per key (which holds everything the compiled kernel depends
    on but the plan), so later calls go straight to it."""
    plan = _FITTED.get(key)
    if plan is not None:
        return launch(plan)
    plans = plans()
    for i, plan in enumerate(plans):
        try:
            launch(plan)
        except triton.runtime.errors.OutOfResources as e:
            if i + 1 < len(plans):
                continue
            raise RuntimeError(f"fxsparse: no launch plan of {key[0]} fits this GPU "
                               f"({e}); try a smaller head dim or block size") from e
        _FITTED[key] = plan
        return


try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older triton: pointer loads only
    TensorDescriptor = None


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def _descriptors_fit(d: int, d_pad: int, a, b) -> bool:
    """Whether two [B, H, N, D] tensors can be read through tensor descriptors (TMA, Hopper and newer):
    2-byte elements, an unpadded head dim, unit stride along it, and 16-byte aligned base and strides."""
    if TensorDescriptor is None or d != d_pad or a.dtype not in (torch.float16, torch.bfloat16):
        return False
    if a.is_cuda and _capability(a.device.index)[0] < 9:
        return False
    return _descriptor_fits(a) and _descriptor_fits(b)


def _descriptor_fits(t) -> bool:
    """A [B, H, N, D] tensor of 2-byte elements: unit stride along D, the other strides positive
    multiples of 8 (16 bytes; a broadcast dim's 0 stride does not pass), a 16-byte aligned base."""
    sb, sh, sn, sd = t.stride()
    return (sd == 1 and sb > 0 and sh > 0 and sn > 0 and not (sb % 8 or sh % 8 or sn % 8 or t.data_ptr() % 16)
            and t.numel() > 0)


def _use_descriptors(d: int, d_pad: int, a, b, knob: str = "FXSPARSE_TMA") -> bool:
    """Tensor descriptors for two of a kernel's inputs: at D = 128 by default; `knob` = 1 / 0 in the
    environment: wherever they fit / never. H200: the forward's K and V 5.8 % faster at 10 % density
    and 7 % dense (v10), 2-9 % slower at D = 64 (139 registers against 119, one program fewer per SM,
    no better with the registers capped at 128); the backward's (FXSPARSE_BWD_TMA) 1-1.5 % faster at
    D = 128 and 2 % slower at D = 64, 9 % density (RESULTS.md, v11)."""
    setting = KNOBS[knob]
    if setting == "0" or (setting != "1" and d != 128):
        return False
    return _descriptors_fit(d, d_pad, a, b)


def _tile_descriptors(a, b, rows: int, d_pad: int):
    """Descriptors of two [B, H, N, D] tensors that load [1, 1, rows, d_pad] tiles (about 2 µs of host
    time each: triton's constructor checks again what `_descriptors_fit` has checked)."""
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, d_pad]) for t in (a, b)]


def forward(q, k, v, tables, bias, scale, block, causal, out):
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nqb, nkb = -(-nq // block), -(-nk // block)
    data, fwd_offsets, _, (slot_b, slot_h) = _table_args(tables, nqb, nkb)
    d_pad = _pad_dim(d)
    lse = torch.empty(b, h, 2, nq, dtype=torch.float32, device=q.device)
    bias_t, bstr, has_bias = _bias_args(bias, q, nk)
    consts = dict(HEAD_DIM=d, D_PAD=d_pad, BLOCK=block, HAS_BIAS=has_bias, IS_CAUSAL=causal,
                  PRECISION=_precision(q.dtype), PAD=_pad_blocks(nqb, nkb, causal), RAGGED=_ragged(nq, nk, block),
                  FOLD=scale > 0 and KNOBS["FXSPARSE_FOLD"] != "0")
    tma = _use_descriptors(d, d_pad, k, v)
    consts["TMA"] = tma
    scalars = (*fwd_offsets, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bstr, slot_b, slot_h,
               h, h // hkv, nq, nk, nqb, nkb, scale * LOG2E)

    def launch(plan):
        block_m, block_n, warps, stages, look_ahead = plan
        kd, vd = _tile_descriptors(k, v, block_n, d_pad) if tma else (k, v)
        _launch(_fwd_kernel, (nqb * (block // block_m), b * h), (q, k, v, kd, vd, out, lse, bias_t, data), scalars,
                dict(consts, BLOCK_M=block_m, BLOCK_N=block_n, LOOK_AHEAD=look_ahead), warps, stages,
                int(KNOBS["FXSPARSE_FWD_MAXNREG"] or 0))

    key = ("_fwd_kernel", q.device, q.dtype, *consts.values(), KNOBS["FXSPARSE_FWD_CONFIG"], KNOBS["FXSPARSE_FWD_LOOK_AHEAD"],
           KNOBS["FXSPARSE_FWD_MAXNREG"])
    with _on_device(q):
        _launch_fitting(key, lambda: _fwd_plans(block, d_pad, q.dtype), launch)
    return lse


def backward(dout, q, k, v, out, lse, tables, bias, scale, block, causal, bias_grad):
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nqb, nkb = -(-nq // block), -(-nk // block)
    data, fwd_offsets, bwd_offsets, (slot_b, slot_h) = _table_args(tables, nqb, nkb)
    d_pad = _pad_dim(d)
    delta = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)  # written by the dq kernel
    dq = torch.empty(b, h, nq, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(b, hkv, nk, d, dtype=k.dtype, device=q.device)
    dv = torch.empty(b, hkv, nk, d, dtype=v.dtype, device=q.device)
    dbias = torch.zeros(b, h, nq, nk, dtype=torch.float32, device=q.device) if bias_grad else None
    bias_t, bstr, has_bias = _bias_args(bias, q, nk)
    common = dict(HEAD_DIM=d, D_PAD=d_pad, BLOCK=block, HAS_BIAS=has_bias, IS_CAUSAL=causal,
                  PRECISION=_precision(q.dtype), PAD=_pad_blocks(nqb, nkb, causal), RAGGED=_ragged(nq, nk, block),
                  FOLD=not has_bias and KNOBS["FXSPARSE_BWD_FOLD"] != "0")
    io_strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    bias_slots = (*bstr, slot_b, slot_h)
    # descriptors: K and V for dq, q and dout for dk/dv
    dq_tma = _use_descriptors(d, d_pad, k, v, "FXSPARSE_BWD_TMA")
    dkdv_tma = _use_descriptors(d, d_pad, q, dout, "FXSPARSE_BWD_TMA")
    dq_scalars = (*fwd_offsets, *io_strides, *out.stride(), *bias_slots, h, h // hkv, nq, nk, nqb, nkb,
                  scale, scale * LOG2E)
    dkdv_scalars = (*bwd_offsets, *io_strides, *bias_slots, h, hkv, h // hkv, nq, nk, nqb, nkb, scale, scale * LOG2E)

    def launch_dq(plan):
        rows, cols, warps, stages, look_ahead = plan
        kd, vd = _tile_descriptors(k, v, cols, d_pad) if dq_tma else (k, v)
        _launch(_dq_kernel, (nqb * (block // rows), b * h),
                (q, k, v, kd, vd, dout, out, lse, delta, dq, bias_t, dbias if bias_grad else q, data), dq_scalars,
                dict(common, BLOCK_M=rows, BLOCK_N=cols, BIAS_GRAD=bias_grad, LOOK_AHEAD=look_ahead, TMA=dq_tma),
                warps, stages)

    def launch_dkdv(plan):
        rows, cols, warps, stages, look_ahead = plan
        qd, dod = _tile_descriptors(q, dout, cols, d_pad) if dkdv_tma else (q, dout)
        _launch(_dkdv_kernel, (nkb * (block // rows), b * hkv), (q, k, v, dout, qd, dod, lse, delta, dk, dv, bias_t, data),
                dkdv_scalars, dict(common, BLOCK_M=cols, BLOCK_N=rows, LOOK_AHEAD=look_ahead, TMA=dkdv_tma),
                warps, stages, int(KNOBS["FXSPARSE_DKDV_MAXNREG"] or 0))

    key = (q.device, q.dtype, bias_grad, dq_tma, dkdv_tma, *common.values(), KNOBS["FXSPARSE_BWD_CONFIG"],
           KNOBS["FXSPARSE_DQ_LOOK_AHEAD"], KNOBS["FXSPARSE_DKDV_LOOK_AHEAD"], KNOBS["FXSPARSE_DKDV_MAXNREG"])
    with _on_device(q):
        _launch_fitting(("_dq_kernel", *key), lambda: _bwd_plans(block, d_pad, q.dtype)[0], launch_dq)
        _launch_fitting(("_dkdv_kernel", *key), lambda: _bwd_plans(block, d_pad, q.dtype)[1], launch_dkdv)
    return dq, dk, dv, dbias
