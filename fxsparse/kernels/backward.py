"""The backward kernels of block-sparse attention: dq (with delta and the bias gradient), then dk/dv.

Notation (as in forward.py):
  B, H, HKV, G    batch, query heads, key/value heads, G = H // HKV query heads per kv head
  NQ, NK          query and key/value lengths; NQB, NKB their numbers of layout blocks
  HEAD_DIM, D_PAD the head dim of q and k and its power-of-two padding; DV, DV_PAD the same for v,
                  the output and its gradient (equal to them when v has k's head dim)
  BLOCK           the layout's block size; BLOCK_M query rows and BLOCK_N kv rows of one tile
  stride_xb, stride_xh, stride_xm / stride_xn, stride_xd: strides of tensor x (DO: the output's gradient)
  T, O_*          the layout's flat tables and the offsets of the ones walked: the forward tables
                  for dq, the transposed ones (per kv block, its query blocks) for dk/dv
  Lse             the forward's row statistics, base 2: row max and log2 of the row sum
  delta           rowsum(out * dout), computed by the dq kernel for its rows and stored for dk/dv

The probabilities are recomputed from Lse: p = exp2(s - max - log2(sum)).
  * dq: one program per (batch, head, query tile) over the forward tables; it also writes delta
    and, when the bias needs a gradient, the bias gradient of the tiles it visits.
  * dk/dv, launched after it: one program per (batch, kv head, kv tile); it walks the transposed
    tables of every query head in its group, so no atomics are needed.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    bias_log2,
    chunk_range,
    count_below,
    dot,
    full_visit,
    load_bits,
    load_rows,
    query_rows,
    split_tile,
    tile_scores,
    visit,
    visit_counts,
)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, b, h, Lse, Delta, Bias, BITS, qb, j, mid,
    offs_n, col0, offs_d, offs_dv, stride_qm, stride_qd, stride_dom, stride_dod, stride_bias_m, stride_bias_n,
    NQ, NK, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, BOUNDS: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, FOLD: tl.constexpr,
    TMA: tl.constexpr,
):
    """dk and dv of this program's kv rows, plus the contribution of query rows qb * BLOCK + j .. + BLOCK_M.
    Scores are computed transposed ([kv rows, q rows]) so the kv side stays in registers."""
    first = qb * BLOCK + j
    rows = first + tl.arange(0, BLOCK_M)
    rmask = rows < NQ
    qt = load_rows(Q, Q_DESC, b, h, first, rows, offs_d, stride_qm, stride_qd, NQ,
                   HEAD_DIM=HEAD_DIM, D_PAD=D_PAD, ROWS=BLOCK_M, BOUNDS=BOUNDS, TRANS=True, TMA=TMA)
    do = load_rows(DO, DO_DESC, b, h, first, rows, offs_dv, stride_dom, stride_dod, NQ,
                   HEAD_DIM=DV, D_PAD=DV_PAD, ROWS=BLOCK_M, BOUNDS=BOUNDS, TRANS=False, TMA=TMA)
    if BOUNDS:
        m2 = tl.load(Lse + rows, mask=rmask, other=0.0)
        log_l = tl.load(Lse + NQ + rows, mask=rmask, other=float("inf"))
        delta = tl.load(Delta + rows, mask=rmask, other=0.0)
    else:
        m2 = tl.load(Lse + rows)
        log_l = tl.load(Lse + NQ + rows)
        delta = tl.load(Delta + rows)
    if FOLD:  # no bias: the row's max and log-sum are shifted off in the scale's multiply-add
        st = dot(k, qt, PRECISION=PRECISION) * scale_log2 - (m2 + log_l)[None, :]  # [kv rows, q rows]
    else:
        st = dot(k, qt, PRECISION=PRECISION) * scale_log2
        if HAS_BIAS:
            bias = tl.load(Bias + rows[None, :] * stride_bias_m + offs_n[:, None] * stride_bias_n,
                           mask=rmask[None, :] & (offs_n[:, None] < NK), other=0.0)
            st += bias_log2(bias)
    if PARTIAL:  # BITS holds the transposed masks: rows are keys
        keep = load_bits(BITS, mid, col0 + tl.arange(0, BLOCK_N), j, BLOCK=BLOCK, ROWS=BLOCK_N, COLS=BLOCK_M)
        st = tl.where(keep, st, float("-inf"))
    if IS_CAUSAL:
        st = tl.where(rows[None, :] >= offs_n[:, None], st, float("-inf"))
    if FOLD:
        pt = tl.math.exp2(st)
    else:  # apart: log_l survives beside a huge max (rows that only see finfo.min padding)
        pt = tl.math.exp2((st - m2[None, :]) - log_l[None, :])
    dv += dot(pt.to(do.dtype), do, PRECISION=PRECISION)
    dpt = dot(v, tl.trans(do), PRECISION=PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += dot(dst.to(qt.dtype), tl.trans(qt), PRECISION=PRECISION)
    return dk, dv


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, Q_DESC, DO_DESC, Lse, Delta, DK, DV_OUT, Bias, T, Work,
    O_PART_MID, O_BITS, O_FULL_NUM, O_FULL_IDX, O_PART_NUM, O_PART_IDX, O_LONG_INDEX, O_LONG_COLS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    SLOT_B, SLOT_H,
    H, HKV, G, NQ, NK, NQB, NKB, scale, scale_log2, CHUNK, N_LONG, N_CHUNKS,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, PAD: tl.constexpr, RAGGED: tl.constexpr,
    FOLD: tl.constexpr, TMA: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOOK_AHEAD: tl.constexpr,
):
    """One program: BLOCK_N kv rows (inside one layout block) of one (batch, kv head), over the G query
    heads that share it. DK and DV_OUT are contiguous [B, HKV, NK, HEAD_DIM] and [B, HKV, NK, DV].

    SPLIT: a kv block visited by far more query blocks than the mean (`Layout.split`, from the slot of
    the group's first head) is walked by several programs, CHUNK entries of each head's list each
    (`common.split_tile`); they write float32 partial dk, dv to Work ([.., BLOCK, D_PAD + DV_PAD]
    entries) for `common.sum_chunks_kernel`."""
    tl.static_assert(BLOCK % BLOCK_N == 0, "a program's kv rows lie inside one layout block")
    tl.static_assert(BLOCK % BLOCK_M == 0, "a visited block is walked in whole tiles")
    SUB: tl.constexpr = BLOCK // BLOCK_M
    PART_MID, BITS = T + O_PART_MID, T + O_BITS
    T_FULL_NUM, T_FULL_IDX, T_PART_NUM, T_PART_IDX = T + O_FULL_NUM, T + O_FULL_IDX, T + O_PART_NUM, T + O_PART_IDX
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    b32 = b.to(tl.int32)
    if SPLIT:
        start_n, li, chunk, valid = split_tile(T + O_LONG_INDEX, T + O_LONG_COLS, b * SLOT_B + hk * G * SLOT_H, NKB,
                                               N_CHUNKS, BLOCK=BLOCK, ROWS=BLOCK_N)
    else:
        start_n = tl.program_id(0) * BLOCK_N
    kb = start_n // BLOCK
    col0 = start_n - kb * BLOCK
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    nmask = (offs_n[:, None] < NK) & (offs_d[None, :] < HEAD_DIM)
    nmask_v = (offs_n[:, None] < NK) & (offs_dv[None, :] < DV)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=nmask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=nmask_v, other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    for g in range(G):
        h = hk * G + g
        slot = b * SLOT_B + h * SLOT_H
        trow = slot * NKB + kb
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        Lh = Lse + (b * H + h) * 2 * NQ
        Dh = Delta + (b * H + h) * NQ
        Bh = Bias + b * stride_bias_b + h * stride_bias_h
        n_part = tl.load(T_PART_NUM + trow)
        n_full = tl.load(T_FULL_NUM + trow)
        first_part = 0
        first_full = 0
        if IS_CAUSAL:  # query blocks that end before this kv block are skipped
            first_part = count_below(T_PART_IDX + trow * NQB, n_part, kb, PAD=PAD)
            first_full = count_below(T_FULL_IDX + trow * NQB, n_full, kb, PAD=PAD)
        if SPLIT:
            first_part, n_part, first_full, n_full = chunk_range(first_part, n_part, first_full, n_full, li, chunk,
                                                                 CHUNK, valid)
        for t in range(first_part * SUB, n_part * SUB):
            qb = tl.load(T_PART_IDX + trow * NQB + t // SUB)
            mid = tl.load(PART_MID + trow * NQB + t // SUB)
            dk, dv = _dkdv_tile(
                dk, dv, k, v, Qh, DOh, Q_DESC, DO_DESC, b32, h.to(tl.int32), Lh, Dh, Bh, BITS, qb, (t % SUB) * BLOCK_M,
                mid, offs_n, col0, offs_d, offs_dv, stride_qm, stride_qd, stride_dom, stride_dod, stride_bias_m,
                stride_bias_n, NQ, NK, scale_log2,
                HEAD_DIM=HEAD_DIM, D_PAD=D_PAD, DV=DV, DV_PAD=DV_PAD, BLOCK=BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PARTIAL=True,
                BOUNDS=RAGGED, HAS_BIAS=HAS_BIAS, IS_CAUSAL=IS_CAUSAL, PRECISION=PRECISION, FOLD=FOLD, TMA=TMA,
            )
        qb_next = visit(T_FULL_IDX + trow * NQB, first_full * SUB, n_full * SUB, SUB=SUB)
        for t in range(first_full * SUB, n_full * SUB):
            qb, qb_next = full_visit(T_FULL_IDX + trow * NQB, qb_next, t, n_full * SUB, SUB=SUB, LOOK_AHEAD=LOOK_AHEAD)
            dk, dv = _dkdv_tile(
                dk, dv, k, v, Qh, DOh, Q_DESC, DO_DESC, b32, h.to(tl.int32), Lh, Dh, Bh, BITS, qb, (t % SUB) * BLOCK_M,
                0, offs_n, col0, offs_d, offs_dv, stride_qm, stride_qd, stride_dom, stride_dod, stride_bias_m,
                stride_bias_n, NQ, NK, scale_log2,
                HEAD_DIM=HEAD_DIM, D_PAD=D_PAD, DV=DV, DV_PAD=DV_PAD, BLOCK=BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PARTIAL=False,
                BOUNDS=False, HAS_BIAS=HAS_BIAS, IS_CAUSAL=IS_CAUSAL, PRECISION=PRECISION, FOLD=FOLD, TMA=TMA,
            )
    if SPLIT:  # a chunk of a long column: its partial sums to the workspace; every other column: dk, dv
        part = (li >= 0) & valid
        at = (((pid_bh * N_LONG + tl.maximum(li, 0)) * N_CHUNKS + chunk) * BLOCK + (offs_n - kb * BLOCK))
        at = at * (D_PAD + DV_PAD)
        tl.store(Work + at[:, None] + offs_d[None, :], dk, mask=(offs_n[:, None] < NK) & part)
        tl.store(Work + at[:, None] + D_PAD + offs_dv[None, :], dv, mask=(offs_n[:, None] < NK) & part)
        nmask = nmask & (li < 0)
        nmask_v = nmask_v & (li < 0)
    tl.store(DK + pid_bh * NK * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=nmask)
    tl.store(DV_OUT + pid_bh * NK * DV + offs_n[:, None] * DV + offs_dv[None, :],
             dv.to(DV_OUT.dtype.element_ty), mask=nmask_v)


@triton.jit
def _dq_tile(
    dq, q, do, m2, log_l, delta, K, V, K_DESC, V_DESC, b, hk, Bias, DBias, BITS, kb, j, mid,
    offs_m, rows_in_block, offs_d, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_m,
    stride_bias_n, NQ, NK, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, BOUNDS: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, FOLD: tl.constexpr,
    TMA: tl.constexpr,
):
    """dq of this program's query rows, plus the contribution of kv rows kb * BLOCK + j .. + BLOCK_N
    (and that tile's bias gradient when BIAS_GRAD)."""
    first = kb * BLOCK + j
    cols = first + tl.arange(0, BLOCK_N)
    kt = load_rows(K, K_DESC, b, hk, first, cols, offs_d, stride_kn, stride_kd, NK,
                   HEAD_DIM=HEAD_DIM, D_PAD=D_PAD, ROWS=BLOCK_N, BOUNDS=BOUNDS, TRANS=True, TMA=TMA)
    vt = load_rows(V, V_DESC, b, hk, first, cols, offs_dv, stride_vn, stride_vd, NK,
                   HEAD_DIM=DV, D_PAD=DV_PAD, ROWS=BLOCK_N, BOUNDS=BOUNDS, TRANS=True, TMA=TMA)
    if FOLD:  # no bias: as in _dkdv_tile
        s = tile_scores(dot(q, kt, PRECISION=PRECISION) * scale_log2 - (m2 + log_l)[:, None], Bias, BITS, mid, offs_m,
                        rows_in_block, cols, j, stride_bias_m, stride_bias_n, NQ, NK, BLOCK=BLOCK, BLOCK_M=BLOCK_M,
                        BLOCK_N=BLOCK_N, PARTIAL=PARTIAL, HAS_BIAS=False, IS_CAUSAL=IS_CAUSAL)
        p = tl.math.exp2(s)
    else:
        s = tile_scores(dot(q, kt, PRECISION=PRECISION) * scale_log2, Bias, BITS, mid, offs_m, rows_in_block, cols, j,
                        stride_bias_m, stride_bias_n, NQ, NK, BLOCK=BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                        PARTIAL=PARTIAL, HAS_BIAS=HAS_BIAS, IS_CAUSAL=IS_CAUSAL)
        p = tl.math.exp2((s - m2[:, None]) - log_l[:, None])
    dp = dot(do, vt, PRECISION=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += dot(ds.to(kt.dtype), tl.trans(kt), PRECISION=PRECISION)
    if BIAS_GRAD:
        tl.store(DBias + offs_m[:, None] * NK + cols[None, :], ds,
                 mask=(offs_m[:, None] < NQ) & (cols[None, :] < NK))
    return dq


@triton.jit
def dq_kernel(
    Q, K, V, K_DESC, V_DESC, DO, Out, Lse, Delta, DQ, Bias, DBias, T, Work,
    O_PART_MID, O_BITS, O_FULL_NUM, O_FULL_IDX, O_PART_NUM, O_PART_IDX, O_LONG_INDEX, O_LONG_ROWS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    SLOT_B, SLOT_H,
    H, G, NQ, NK, NQB, NKB, scale, scale_log2, CHUNK, N_LONG, N_CHUNKS,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, PAD: tl.constexpr, RAGGED: tl.constexpr,
    FOLD: tl.constexpr, TMA: tl.constexpr, SPLIT: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, LOOK_AHEAD: tl.constexpr,
):
    """One program: BLOCK_M query rows (inside one layout block) of one (batch, head). DQ is contiguous
    [B, H, NQ, HEAD_DIM]; DBias, when BIAS_GRAD, a contiguous float32 [B, H, NQ, NK] (zeros where
    the layout visits nothing).

    SPLIT: long rows as in the forward; each chunk writes a float32 partial dq to Work ([.., BLOCK,
    D_PAD] entries) for `common.sum_chunks_kernel`, and the first one delta."""
    tl.static_assert(BLOCK % BLOCK_M == 0, "a program's query rows lie inside one layout block")
    tl.static_assert(BLOCK % BLOCK_N == 0, "a visited block is walked in whole tiles")
    SUB: tl.constexpr = BLOCK // BLOCK_N
    PART_MID, BITS = T + O_PART_MID, T + O_BITS
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX = T + O_FULL_NUM, T + O_FULL_IDX, T + O_PART_NUM, T + O_PART_IDX
    pid_bh, b, h, slot, start_m, qb, rows_in_block, offs_m, offs_d, li, chunk, valid = query_rows(
        T, O_LONG_INDEX, O_LONG_ROWS, H, SLOT_B, SLOT_H, NQB, N_CHUNKS, SPLIT=SPLIT, BLOCK=BLOCK, BLOCK_M=BLOCK_M,
        D_PAD=D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    mmask = (offs_m[:, None] < NQ) & (offs_d[None, :] < HEAD_DIM)
    mmask_v = (offs_m[:, None] < NQ) & (offs_dv[None, :] < DV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mmask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=mmask_v, other=0.0)
    m2 = tl.load(Lse + pid_bh * 2 * NQ + offs_m, mask=offs_m < NQ, other=0.0)
    log_l = tl.load(Lse + pid_bh * 2 * NQ + NQ + offs_m, mask=offs_m < NQ, other=float("inf"))
    # delta = rowsum(out * dout), stored for the dk/dv kernel that runs after this one
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                mask=mmask_v, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if SPLIT:
        tl.store(Delta + pid_bh * NQ + offs_m, delta, mask=(offs_m < NQ) & (chunk == 0))
    else:
        tl.store(Delta + pid_bh * NQ + offs_m, delta, mask=offs_m < NQ)
    K += b * stride_kb + (h // G) * stride_kh
    V += b * stride_vb + (h // G) * stride_vh
    Bias += b * stride_bias_b + h * stride_bias_h
    DBias += pid_bh * NQ * NK
    b32, hk32 = b.to(tl.int32), (h // G).to(tl.int32)
    row = slot * NQB + qb
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    n_part, n_full = visit_counts(PART_NUM, PART_IDX, FULL_NUM, FULL_IDX, row, NKB, start_m,
                                  BLOCK=BLOCK, BLOCK_M=BLOCK_M, IS_CAUSAL=IS_CAUSAL, PAD=PAD)
    if SPLIT:
        p0, p1, f0, f1 = chunk_range(0, n_part, 0, n_full, li, chunk, CHUNK, valid)
    else:
        p0, p1, f0, f1 = 0, n_part, 0, n_full
    for t in range(p0 * SUB, p1 * SUB):
        kb = tl.load(PART_IDX + row * NKB + t // SUB)
        mid = tl.load(PART_MID + row * NKB + t // SUB)
        dq = _dq_tile(
            dq, q, do, m2, log_l, delta, K, V, K_DESC, V_DESC, b32, hk32, Bias, DBias, BITS, kb, (t % SUB) * BLOCK_N,
            mid, offs_m, rows_in_block, offs_d, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_m,
            stride_bias_n, NQ, NK, scale_log2,
            HEAD_DIM=HEAD_DIM, D_PAD=D_PAD, DV=DV, DV_PAD=DV_PAD, BLOCK=BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PARTIAL=True,
            BOUNDS=RAGGED, HAS_BIAS=HAS_BIAS, BIAS_GRAD=BIAS_GRAD, IS_CAUSAL=IS_CAUSAL, PRECISION=PRECISION,
            FOLD=FOLD, TMA=TMA,
        )
    kb_next = visit(FULL_IDX + row * NKB, f0 * SUB, f1 * SUB, SUB=SUB)
    for t in range(f0 * SUB, f1 * SUB):
        kb, kb_next = full_visit(FULL_IDX + row * NKB, kb_next, t, f1 * SUB, SUB=SUB, LOOK_AHEAD=LOOK_AHEAD)
        dq = _dq_tile(
            dq, q, do, m2, log_l, delta, K, V, K_DESC, V_DESC, b32, hk32, Bias, DBias, BITS, kb, (t % SUB) * BLOCK_N,
            0, offs_m, rows_in_block, offs_d, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_m,
            stride_bias_n, NQ, NK, scale_log2,
            HEAD_DIM=HEAD_DIM, D_PAD=D_PAD, DV=DV, DV_PAD=DV_PAD, BLOCK=BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PARTIAL=False,
            BOUNDS=False, HAS_BIAS=HAS_BIAS, BIAS_GRAD=BIAS_GRAD, IS_CAUSAL=IS_CAUSAL, PRECISION=PRECISION,
            FOLD=FOLD, TMA=TMA,
        )
    if SPLIT:  # a chunk of a long row: its partial dq to the workspace; every other row: dq
        at = (((pid_bh * N_LONG + tl.maximum(li, 0)) * N_CHUNKS + chunk) * BLOCK + rows_in_block) * D_PAD
        tl.store(Work + at[:, None] + offs_d[None, :], dq, mask=(offs_m[:, None] < NQ) & ((li >= 0) & valid))
        mmask = mmask & (li < 0)
    tl.store(DQ + pid_bh * NQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=mmask)
