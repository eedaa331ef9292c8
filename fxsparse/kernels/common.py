"""Triton helpers shared by the forward and the backward kernels.

Notation (as in forward.py and backward.py):
  B, H, HKV       batch, query heads, key/value heads; G = H // HKV query heads share one kv head
  NQ, NK          query and key/value lengths; NQB, NKB their numbers of layout blocks
  HEAD_DIM, D_PAD the head dim and its power-of-two padding (padded lanes are masked loads, never copies)
  BLOCK           the layout's block size; a visited block is walked in BLOCK // tile tiles (SUB)
  BLOCK_M, BLOCK_N query rows and key/value rows of one tile
  full / partial  visited blocks: full ones need no per-element work, partial ones apply their
                  packed element mask (BITS: BLOCK // 32 int32 words a row, bit j = column j)
  scores          base 2: log2(e) is folded into the scale, softmax uses exp2
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    # Triton's CPU interpreter multiplies bfloat16 operands wrongly: there the host asks for "upcast"
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def load_bits(BITS, mid, rows_in_block, j, BLOCK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Element mask [ROWS, COLS] of partial block `mid`: rows `rows_in_block`, columns j .. j + COLS.

    One load of [ROWS, COLS / 32] words, expanded to bits by broadcasting and a reshape (faster than
    each element loading its own word, which reads every word 32 times)."""
    tl.static_assert(COLS % 32 == 0, "a tile's columns cover whole 32-bit words of the element mask")
    W: tl.constexpr = BLOCK // 32
    base = BITS + mid * (BLOCK * W) + rows_in_block[:, None] * W
    words = tl.load(base + (j // 32 + tl.arange(0, COLS // 32))[None, :])
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, [ROWS, COLS]) != 0


@triton.jit
def load_tile(ptrs, row_ok, col_ok, ROW_BOUND: tl.constexpr, COL_BOUND: tl.constexpr):
    """A 2-D tile with only the bounds that can cut it: ROW_BOUND / COL_BOUND say whether row_ok /
    col_ok apply (a sequence's end inside a partial block, the head dim's padding)."""
    if ROW_BOUND and COL_BOUND:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif ROW_BOUND:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif COL_BOUND:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def load_rows(P, DESC, b, hh, first, rows, offs_d, stride_n, stride_d, N,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr, BOUNDS: tl.constexpr,
              TRANS: tl.constexpr, TMA: tl.constexpr):
    """Rows `rows` (first .. first + ROWS) of one head's [N, HEAD_DIM] slice as [ROWS, D_PAD], or
    transposed: through the tensor descriptor DESC over [B, H, N, D] at (b, hh) when TMA (rows past N
    read as zeros), else through pointers from P (the head's slice) with the bounds that can cut
    (BOUNDS: the rows may pass N)."""
    if TMA:
        x = DESC.load([b, hh, first, 0]).reshape(ROWS, D_PAD)
        if TRANS:
            x = tl.trans(x)
    elif TRANS:
        x = load_tile(P + rows[None, :] * stride_n + offs_d[:, None] * stride_d, offs_d < HEAD_DIM, rows < N,
                      ROW_BOUND=D_PAD != HEAD_DIM, COL_BOUND=BOUNDS)
    else:
        x = load_tile(P + rows[:, None] * stride_n + offs_d[None, :] * stride_d, rows < N, offs_d < HEAD_DIM,
                      ROW_BOUND=BOUNDS, COL_BOUND=D_PAD != HEAD_DIM)
    return x


@triton.jit
def bias_log2(bias):
    # finite values are clamped first: torch.finfo(float32).min (eager padding masks) times log2(e)
    # would overflow to -inf and turn an all-padding row into an empty one, where PyTorch gives the
    # softmax over those keys; -inf stays -inf (a key that may not be attended)
    b = bias.to(tl.float32)
    return tl.where(b == float("-inf"), b, tl.maximum(b, -1e38)) * 1.4426950408889634


@triton.jit
def tile_scores(
    s, Bias, BITS, mid, offs_m, rows_in_block, cols, j, stride_bias_m, stride_bias_n, NQ, NK,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Scores [BLOCK_M, BLOCK_N] (q·kᵀ·scale, base 2) with the bias added and the partial block's
    element mask and causality applied (-inf where a key may not be attended)."""
    if HAS_BIAS:
        bmask = (offs_m[:, None] < NQ) & (cols[None, :] < NK)
        s += bias_log2(tl.load(Bias + offs_m[:, None] * stride_bias_m + cols[None, :] * stride_bias_n,
                               mask=bmask, other=0.0))
    if PARTIAL:
        s = tl.where(load_bits(BITS, mid, rows_in_block, j, BLOCK=BLOCK, ROWS=BLOCK_M, COLS=BLOCK_N), s, float("-inf"))
    if IS_CAUSAL:
        s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
    return s


@triton.jit
def count_below(IDX, num, limit, PAD: tl.constexpr):
    """How many of the first `num` (ascending) block indices at IDX are below `limit`."""
    offs = tl.arange(0, PAD)
    idx = tl.load(IDX + offs, mask=offs < num, other=limit)
    return tl.sum((idx < limit).to(tl.int32), 0)


@triton.jit
def visit_counts(PART_NUM, PART_IDX, FULL_NUM, FULL_IDX, row, NKB, start_m,
                 BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr, PAD: tl.constexpr):
    """How many partial and full kv blocks a query tile visits (causal: blocks that start after its
    last row are skipped)."""
    n_part = tl.load(PART_NUM + row)
    n_full = tl.load(FULL_NUM + row)
    if IS_CAUSAL:
        limit = (start_m + BLOCK_M - 1) // BLOCK + 1
        n_part = count_below(PART_IDX + row * NKB, n_part, limit, PAD=PAD)
        n_full = count_below(FULL_IDX + row * NKB, n_full, limit, PAD=PAD)
    return n_part, n_full


@triton.jit
def visit(IDX, t, end, SUB: tl.constexpr):
    """The block of tile t of a visit list (0 once t reaches `end`: a look-ahead past the last tile).

    The loops over full blocks may ask for the next tile's block one tile ahead (LOOK_AHEAD): the
    tile's loads depend on it, and a load whose address waits on another load takes a pipeline
    stage. At D = 128 in the forward the stage it frees lets K and V be triple-buffered instead of
    double. Never over partial blocks (their extra registers cost a program per SM at low density),
    and in the backward only at D <= 64 (at 128 it halves the programs per SM)."""
    return tl.load(IDX + t // SUB, mask=t < end, other=0)


@triton.jit
def full_visit(IDX, nxt, t, end, SUB: tl.constexpr, LOOK_AHEAD: tl.constexpr):
    """(block of full tile t, the look-ahead to carry to tile t + 1); `nxt` starts as visit(IDX, first, ...)."""
    if LOOK_AHEAD:
        return nxt, visit(IDX, t + 1, end, SUB=SUB)
    else:
        return tl.load(IDX + t // SUB), nxt


# ------------------------------------------------------------------------------------- row split
@triton.jit
def split_tile(LONG_INDEX, LONG_ROWS, slot, NB, N_CHUNKS, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Where a program of a split launch works (`Layout.split`): (its first row, the block's position among
    the long blocks or -1, chunk, valid). Programs below NB * BLOCK // ROWS are the usual tiles of ROWS
    rows (chunk 0); those after them take chunks 1 .. N_CHUNKS - 1 of a long block's list, and are not
    valid where this slot of the tables has fewer long blocks than the widest one."""
    SUBM: tl.constexpr = BLOCK // ROWS
    pid = tl.program_id(0)
    tiles = NB * SUBM
    extra = pid >= tiles
    e = tl.maximum(pid - tiles, 0)
    li_x = e // SUBM // (N_CHUNKS - 1)
    blk_x = tl.load(LONG_ROWS + slot * NB + li_x, mask=extra, other=1) - 1  # the tables hold blocks plus one
    li_main = tl.load(LONG_INDEX + slot * NB + tl.minimum(pid, tiles - 1) // SUBM, mask=pid < tiles, other=0) - 1
    start = tl.where(extra, tl.maximum(blk_x, 0) * BLOCK + (e % SUBM) * ROWS, pid * ROWS)
    li = tl.where(extra, li_x, li_main)
    chunk = tl.where(extra, 1 + (e // SUBM) % (N_CHUNKS - 1), 0)
    return start, li, chunk, (pid < tiles) | (blk_x >= 0)


@triton.jit
def query_rows(T, O_LONG_INDEX, O_LONG_ROWS, H, SLOT_B, SLOT_H, NQB, N_CHUNKS, SPLIT: tl.constexpr,
               BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    """Where a forward or dq program's BLOCK_M query rows sit: (batch, head) slot (int64: whole slices can
    pass 2**31 elements), batch, head, the tables' slot, first row, layout block, rows within that
    block, rows, head-dim lanes, and with SPLIT the long row's position, chunk and validity of
    `split_tile` (without: -1, 0, True)."""
    pid_bh = tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    slot = b * SLOT_B + h * SLOT_H
    if SPLIT:
        start_m, li, chunk, valid = split_tile(T + O_LONG_INDEX, T + O_LONG_ROWS, slot, NQB, N_CHUNKS,
                                               BLOCK=BLOCK, ROWS=BLOCK_M)
    else:
        start_m, li, chunk, valid = tl.program_id(0) * BLOCK_M, -1, 0, True
    qb = start_m // BLOCK
    offs_m = start_m + tl.arange(0, BLOCK_M)
    return pid_bh, b, h, slot, start_m, qb, offs_m - qb * BLOCK, offs_m, tl.arange(0, D_PAD), li, chunk, valid


@triton.jit
def chunk_range(p_first, p_end, f_first, f_end, li, chunk, CHUNK, valid):
    """The entries of a visit list (partial ones p_first .. p_end, then full ones f_first .. f_end)
    that `chunk` of a long block walks: entries chunk * CHUNK .. + CHUNK of the two read as one list,
    all of them where li < 0 (not a long block), none where not valid: (p0, p1, f0, f1)."""
    n_p = p_end - p_first
    total = n_p + f_end - f_first
    hi = tl.where(li >= 0, tl.minimum(chunk * CHUNK + CHUNK, total), total)
    hi = tl.where(valid, hi, 0)
    lo = tl.minimum(tl.where(li >= 0, chunk * CHUNK, 0), hi)
    return (p_first + tl.minimum(lo, n_p), p_first + tl.minimum(hi, n_p), f_first + tl.maximum(lo - n_p, 0),
            f_first + tl.maximum(hi - n_p, 0))


@triton.jit
def sum_chunks_kernel(
    Dst, T, Work, O_LONG, SLOT_B, SLOT_H, HEADS, G, NB, N, N_LONG, N_CHUNKS, W_STRIDE, W_OFF, factor,
    DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """Dst (contiguous [B, HEADS, N, DIM]) rows of one long block: factor times the sum of its N_CHUNKS
    chunks' partial gradients in the workspace (entries of W_STRIDE floats, this one at W_OFF). The
    block's slot of the tables is that of head h * G (the first query head of a kv head's group)."""
    SUBM: tl.constexpr = BLOCK // ROWS
    pid = tl.program_id(1).to(tl.int64)
    b, h = pid // HEADS, pid % HEADS
    li = tl.program_id(0) // SUBM
    blk = tl.load(T + O_LONG + (b * SLOT_B + h * G * SLOT_H) * NB + li) - 1
    rows_in_block = (tl.program_id(0) % SUBM) * ROWS + tl.arange(0, ROWS)
    offs = tl.maximum(blk, 0) * BLOCK + rows_in_block
    cols = tl.arange(0, DIM_PAD)
    keep = (offs[:, None] < N) & (cols[None, :] < DIM) & (blk >= 0)
    acc = tl.zeros([ROWS, DIM_PAD], tl.float32)
    for c in range(N_CHUNKS):
        at = (((pid * N_LONG + li) * N_CHUNKS + c) * BLOCK + rows_in_block) * W_STRIDE + W_OFF
        acc += tl.load(Work + at[:, None] + cols[None, :], mask=keep, other=0.0)
    tl.store(Dst + pid * N * DIM + offs[:, None] * DIM + cols[None, :], (acc * factor).to(Dst.dtype.element_ty),
             mask=keep)
