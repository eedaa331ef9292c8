"""The forward kernel of block-sparse attention.

Notation:
  B, H, G         batch, query heads, query heads per key/value head (grouped-query attention: head h
                  reads kv head h // G)
  NQ, NK          query and key/value lengths; NQB, NKB their numbers of layout blocks
  HEAD_DIM, D_PAD the head dim of q and k and its power-of-two padding (masked loads, never a copy of
                  the inputs); DV, DV_PAD the same for v and the output (equal to them when v has k's head dim)
  BLOCK           the layout's block size; BLOCK_M query rows per program, BLOCK_N kv rows per step,
                  SUB = BLOCK // BLOCK_N steps per visited block
  stride_xb, stride_xh, stride_xm / stride_xn, stride_xd: strides of tensor x along batch, head,
                  sequence and head dim (any strides, no copies)
  T               the layout's tables as one flat int32 tensor; O_* the offsets of the ones walked:
                  per (batch, head, query block) the number and indices of its full and partial kv
                  blocks, and each partial block's mask id into BITS (the packed element masks)
  Lse             the row statistics saved for the backward, base 2: [B, H, 2, NQ] = row max and
                  log2 of the row sum, kept apart so the log-sum survives beside a huge max (rows
                  that only see finfo.min padding)

Each query tile visits the kv blocks its layout row lists: partial blocks first (bounds checks and
the element mask), then full blocks (no per-element work), each in one flat loop over tiles so the
compiler can prefetch the next tile while this one computes. Softmax runs online in base 2 with
log2(e) folded into the scale. A row with no allowed key writes 0 and log2-sum +inf.

Row split (SPLIT, the layout's `split`): a query block whose visit list is much longer than the mean
(a global token's row visits every kv block) is walked by several programs, CHUNK blocks of the list
each (`common.split_tile`, `common.chunk_range`). The first chunk runs in the row's own program, the
others in programs appended to the grid. Each writes its unnormalised output and row statistics to
a float32 workspace (an empty chunk too), and `combine_kernel` merges them.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import chunk_range, dot, full_visit, load_rows, query_rows, tile_scores, visit, visit_counts


@triton.jit
def _forward_tile(
    acc, m_i, l_i, q, K, V, K_DESC, V_DESC, b, hk, Bias, BITS, kb, j, mid,
    offs_m, rows_in_block, offs_d, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_m, stride_bias_n,
    NQ, NK, scale_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, BOUNDS: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, FOLD: tl.constexpr, TMA: tl.constexpr,
):
    """One step of the online softmax over kv rows kb * BLOCK + j .. + BLOCK_N: the updated
    (acc, row max, row sum)."""
    first = kb * BLOCK + j
    cols = first + tl.arange(0, BLOCK_N)
    kt = load_rows(K, K_DESC, b, hk, first, cols, offs_d, stride_kn, stride_kd, NK,
                   HEAD_DIM=HEAD_DIM, D_PAD=D_PAD, ROWS=BLOCK_N, BOUNDS=BOUNDS, TRANS=True, TMA=TMA)
    v = load_rows(V, V_DESC, b, hk, first, cols, offs_dv, stride_vn, stride_vd, NK,
                  HEAD_DIM=DV, D_PAD=DV_PAD, ROWS=BLOCK_N, BOUNDS=BOUNDS, TRANS=False, TMA=TMA)
    if FOLD and not (PARTIAL or HAS_BIAS or IS_CAUSAL):
        # a tile with nothing to mask: the row max of the raw scores, scaled after (scale > 0), and the
        # scale and the shift in one multiply-add per score; the max is finite, no -inf guard
        qk = dot(q, kt, PRECISION=PRECISION)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    else:
        s = tile_scores(dot(q, kt, PRECISION=PRECISION) * scale_log2, Bias, BITS, mid, offs_m, rows_in_block, cols, j,
                        stride_bias_m, stride_bias_n, NQ, NK, BLOCK=BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                        PARTIAL=PARTIAL, HAS_BIAS=HAS_BIAS, IS_CAUSAL=IS_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION=PRECISION)
    return acc, m_new, l_i


@triton.jit
def forward_kernel(
    Q, K, V, K_DESC, V_DESC, Out, Lse, Bias, T, Work,
    O_PART_MID, O_BITS, O_FULL_NUM, O_FULL_IDX, O_PART_NUM, O_PART_IDX, O_LONG_INDEX, O_LONG_ROWS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    SLOT_B, SLOT_H,
    H, G, NQ, NK, NQB, NKB, scale_log2, CHUNK, N_LONG, N_CHUNKS,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, PAD: tl.constexpr, RAGGED: tl.constexpr,
    FOLD: tl.constexpr, TMA: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOOK_AHEAD: tl.constexpr,
):
    """One program: BLOCK_M query rows (inside one layout block) of one (batch, head), or with SPLIT
    one chunk of a long row's visit list.

    K_DESC, V_DESC: tensor descriptors of K and V when TMA, else K and V again. SLOT_B, SLOT_H: how a
    (batch, head) picks its row of the tables (0 where the layout is shared). PAD: the width of the
    causal bound search (1 when not causal). RAGGED: a sequence ends inside a block, so partial
    tiles check bounds (full blocks never cross a sequence's end). FOLD: unmasked tiles may fold the
    scale into one multiply-add (needs scale > 0). Work, CHUNK, N_LONG, N_CHUNKS: the row split
    (module docstring; unused without SPLIT)."""
    tl.static_assert(BLOCK % BLOCK_M == 0, "a program's query rows lie inside one layout block")
    tl.static_assert(BLOCK % BLOCK_N == 0, "a visited block is walked in whole tiles")
    tl.static_assert(D_PAD >= HEAD_DIM)
    tl.static_assert(DV_PAD >= DV)
    SUB: tl.constexpr = BLOCK // BLOCK_N
    PART_MID, BITS = T + O_PART_MID, T + O_BITS
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX = T + O_FULL_NUM, T + O_FULL_IDX, T + O_PART_NUM, T + O_PART_IDX
    pid_bh, b, h, slot, start_m, qb, rows_in_block, offs_m, offs_d, li, chunk, valid = query_rows(
        T, O_LONG_INDEX, O_LONG_ROWS, H, SLOT_B, SLOT_H, NQB, N_CHUNKS, SPLIT=SPLIT, BLOCK=BLOCK, BLOCK_M=BLOCK_M,
        D_PAD=D_PAD)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    K += b * stride_kb + (h // G) * stride_kh
    V += b * stride_vb + (h // G) * stride_vh
    Bias += b * stride_bias_b + h * stride_bias_h
    b32, hk32 = b.to(tl.int32), (h // G).to(tl.int32)
    row = slot * NQB + qb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    offs_dv = tl.arange(0, DV_PAD)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    n_part, n_full = visit_counts(PART_NUM, PART_IDX, FULL_NUM, FULL_IDX, row, NKB, start_m,
                                  BLOCK=BLOCK, BLOCK_M=BLOCK_M, IS_CAUSAL=IS_CAUSAL, PAD=PAD)
    if SPLIT:
        p0, p1, f0, f1 = chunk_range(0, n_part, 0, n_full, li, chunk, CHUNK, valid)
    else:
        p0, p1, f0, f1 = 0, n_part, 0, n_full
    for t in range(p0 * SUB, p1 * SUB):
        kb = tl.load(PART_IDX + row * NKB + t // SUB)
        mid = tl.load(PART_MID + row * NKB + t // SUB)
        acc, m_i, l_i = _forward_tile(
            acc, m_i, l_i, q, K, V, K_DESC, V_DESC, b32, hk32, Bias, BITS, kb, (t % SUB) * BLOCK_N, mid,
            offs_m, rows_in_block, offs_d, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_m,
            stride_bias_n, NQ, NK, scale_log2,
            HEAD_DIM=HEAD_DIM, D_PAD=D_PAD, DV=DV, DV_PAD=DV_PAD, BLOCK=BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PARTIAL=True,
            BOUNDS=RAGGED, HAS_BIAS=HAS_BIAS, IS_CAUSAL=IS_CAUSAL, PRECISION=PRECISION, FOLD=FOLD, TMA=TMA,
        )
    kb_next = visit(FULL_IDX + row * NKB, f0 * SUB, f1 * SUB, SUB=SUB)
    for t in range(f0 * SUB, f1 * SUB):
        kb, kb_next = full_visit(FULL_IDX + row * NKB, kb_next, t, f1 * SUB, SUB=SUB, LOOK_AHEAD=LOOK_AHEAD)
        acc, m_i, l_i = _forward_tile(
            acc, m_i, l_i, q, K, V, K_DESC, V_DESC, b32, hk32, Bias, BITS, kb, (t % SUB) * BLOCK_N, 0,
            offs_m, rows_in_block, offs_d, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_m,
            stride_bias_n, NQ, NK, scale_log2,
            HEAD_DIM=HEAD_DIM, D_PAD=D_PAD, DV=DV, DV_PAD=DV_PAD, BLOCK=BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PARTIAL=False,
            BOUNDS=False, HAS_BIAS=HAS_BIAS, IS_CAUSAL=IS_CAUSAL, PRECISION=PRECISION, FOLD=FOLD, TMA=TMA,
        )
    keep = offs_m < NQ
    if SPLIT:
        # a chunk of a long row: its unnormalised sums to the workspace; every other row: its output
        write = keep & ((li >= 0) & valid)
        at = ((pid_bh * N_LONG + tl.maximum(li, 0)) * N_CHUNKS + chunk) * BLOCK + rows_in_block
        tl.store(Work + at[:, None] * (DV_PAD + 2) + offs_dv[None, :], acc, mask=write[:, None])
        tl.store(Work + at * (DV_PAD + 2) + DV_PAD, m_i, mask=write)
        tl.store(Work + at * (DV_PAD + 2) + DV_PAD + 1, l_i, mask=write)
        keep = keep & (li < 0)
    finish_rows(acc, m_i, l_i, Out, Lse, b, h, pid_bh, offs_m, offs_dv, keep, stride_ob, stride_oh, stride_om,
                stride_od, NQ, DV=DV)


@triton.jit
def finish_rows(acc, m_i, l_i, Out, Lse, b, h, pid_bh, offs_m, offs_dv, keep, stride_ob, stride_oh, stride_om,
                stride_od, NQ, DV: tl.constexpr):
    """Writes rows `offs_m` (where `keep`) of the output, acc / row sum, and their statistics
    (row max and log2 of the row sum; a row with no allowed key: 0 and +inf)."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    log_l = tl.where(empty, float("inf"), tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=keep[:, None] & (offs_dv[None, :] < DV))
    tl.store(Lse + pid_bh * 2 * NQ + offs_m, m_safe, mask=keep)
    tl.store(Lse + pid_bh * 2 * NQ + NQ + offs_m, log_l, mask=keep)


@triton.jit
def combine_kernel(
    Out, Lse, T, Work, O_LONG_ROWS,
    stride_ob, stride_oh, stride_om, stride_od,
    SLOT_B, SLOT_H, H, NQ, NQB, N_LONG, N_CHUNKS,
    DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merges the N_CHUNKS chunks of BLOCK_M query rows of one long row and writes their output and
    statistics (an empty chunk holds row max -inf and row sum 0, and adds nothing)."""
    SUBM: tl.constexpr = BLOCK // BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    li = tl.program_id(0) // SUBM
    qb = tl.load(T + O_LONG_ROWS + (b * SLOT_B + h * SLOT_H) * NQB + li) - 1
    rows_in_block = (tl.program_id(0) % SUBM) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = tl.maximum(qb, 0) * BLOCK + rows_in_block
    offs_dv = tl.arange(0, DV_PAD)
    keep = (offs_m < NQ) & (qb >= 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for c in range(N_CHUNKS):
        at = (((pid_bh * N_LONG + li) * N_CHUNKS + c) * BLOCK + rows_in_block) * (DV_PAD + 2)
        m_c = tl.load(Work + at + DV_PAD, mask=keep, other=float("-inf"))
        l_c = tl.load(Work + at + DV_PAD + 1, mask=keep, other=0.0)
        acc_c = tl.load(Work + at[:, None] + offs_dv[None, :], mask=keep[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_c)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a_run, a_c = tl.math.exp2(m_i - m_safe), tl.math.exp2(m_c - m_safe)
        acc = acc * a_run[:, None] + acc_c * a_c[:, None]
        l_i = l_i * a_run + l_c * a_c
        m_i = m_new
    finish_rows(acc, m_i, l_i, Out, Lse, b, h, pid_bh, offs_m, offs_dv, keep, stride_ob, stride_oh,
                stride_om, stride_od, NQ, DV=DV)
