"""Block-skipping attention in plain PyTorch: the CPU path of the op, forward and backward.

Only the blocks a layout visits are computed. Query blocks that visit about as many key blocks
are taken together (a *chunk*); for each chunk the visited key and value blocks are gathered
into one tensor ``[B, heads, C, M * block, D]`` (M: the most blocks a query block of the chunk
visits; shorter lists point at a zero block and are masked), so the scores, the softmax and the
product with the values are a few batched matmuls over ``C`` query blocks at once. A chunk whose
blocks are all full runs with no mask at all; the others apply one cached bool mask (partial
blocks' element masks, causality, the padding of shorter lists).

The plan (chunks, gathered block indices, masks) depends only on the layout, the lengths and
causality: it is built once per layout and kept while the layout's tables are alive.

Where the layout is the same for every head (``Hl == 1``), the query heads that share a kv head
(grouped-query attention) are stacked as rows of one matmul, so the kv blocks are gathered once
per kv head. Results match ``fxsparse.reference`` (the exact chunked oracle) to rounding: scores
and softmax in float32 (float64 for float64 inputs), the output in q's dtype, an empty query row
gives 0 with gradient 0, and the row statistics have the reference's form.
"""
from __future__ import annotations

import functools
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .layout import EMPTY, FULL, PARTIAL, table_view, unpack_bits
from .reference import acc_dtype

# scores held at once per chunk (float32: 4 MiB): small enough to stay near the CPU's caches
_CHUNK_ELEMENTS = 1 << 21
_MASK_BYTES = 256 << 20  # per plan: masks kept (bool, then their additive form); past it they are rebuilt per call
_WASTE = 1.25  # a chunk takes query blocks visiting up to this many times its first block's count
_PLANS: "OrderedDict[tuple, tuple]" = OrderedDict()
_MAX_PLANS = 64


@dataclass
class _Chunk:
    q_blocks: torch.Tensor  # long [C]: the query blocks of this chunk
    kv_blocks: torch.Tensor  # long [C, Bl, Hl, M]: visited kv blocks; padding points at the zero block NKB
    masked: bool  # some score of the chunk is masked out (partial blocks, causality, padding slots)
    blocked: Optional[torch.Tensor]  # bool [C, Bl, Hl, 1, bs, M * bs], True = masked out; None: see rebuild
    rebuild: Optional[Callable]  # () -> blocked, for masks past the plan's memory budget (built at each call)
    budget: list  # [bytes left] shared by the plan's chunks for the masks they keep
    additive: dict = field(default_factory=dict)  # dtype -> blocked as 0 / -inf

    @property
    def width(self) -> int:
        return self.kv_blocks.shape[-1]

    def mask(self, dtype) -> torch.Tensor:
        """The mask as an additive 0 / -inf tensor (adding is several times faster than masked_fill);
        kept while the plan's budget lasts, else built for this call."""
        if dtype in self.additive:
            return self.additive[dtype]
        blocked = self.blocked if self.blocked is not None else self.rebuild()
        add = torch.zeros(blocked.shape, dtype=dtype).masked_fill_(blocked, float("-inf"))
        size = add.numel() * add.element_size()
        if self.budget[0] >= size:
            self.budget[0] -= size
            self.additive[dtype] = add
        return add


def _plan(data, bl, hl, bs, nq, nk, causal, rows_per_block, heads):
    """The chunks of a layout (cached per tables tensor, lengths, causality and problem width)."""
    key = (id(data), data._version, bl, hl, bs, nq, nk, causal, rows_per_block, heads, str(data.device))
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is data:
        _PLANS.move_to_end(key)
        return hit[1]
    chunks = _build_plan(data, bl, hl, bs, nq, nk, causal, rows_per_block * heads)
    try:
        ref = weakref.ref(data)
    except TypeError:  # tensors that take no weak reference are planned on every call
        return chunks
    _PLANS[key] = (ref, chunks)
    while len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return chunks


def _build_plan(data, bl, hl, bs, nq, nk, causal, rows_per_block):
    shape = (nq, nk)
    kinds = table_view(data, bl, hl, bs, shape, "kinds").long()
    mask_id = table_view(data, bl, hl, bs, shape, "mask_id").long()
    bits = table_view(data, bl, hl, bs, shape, "bits")
    nqb, nkb = kinds.shape[-2:]
    dev = data.device
    visit = kinds != EMPTY
    qb = torch.arange(nqb, device=dev)
    kb = torch.arange(nkb, device=dev)
    if causal:  # a kv block whose first key comes after the query block's last row is never reached
        last_row = torch.clamp(qb * bs + bs - 1, max=nq - 1)
        visit = visit & (kb[None, :] * bs <= last_row[:, None])
    counts = visit.sum(-1)  # [Bl, Hl, NQB]
    widest = counts.flatten(0, 1).amax(0)  # [NQB]
    # visited kv blocks first, ascending; the rest point at the zero block
    order = (~visit).long() * nkb + kb
    lists = order.sort(-1).values
    lists = torch.where(lists >= nkb, nkb, lists)
    chunks, budget = [], [_MASK_BYTES]
    by_width = torch.argsort(widest, stable=True).tolist()
    widest = widest.tolist()
    i = 0
    while i < len(by_width):
        first = widest[by_width[i]]
        j = i + 1
        if first == 0:  # query blocks with no key at all: output 0, never computed
            while j < len(by_width) and widest[by_width[j]] == 0:
                j += 1
            i = j
            continue
        while j < len(by_width):
            w = widest[by_width[j]]
            if w > first * _WASTE + 1 or (j - i + 1) * w * rows_per_block * bs * bs > _CHUNK_ELEMENTS:
                break
            j += 1
        members = torch.tensor(sorted(by_width[i:j]), dtype=torch.long, device=dev)
        width = widest[by_width[j - 1]]
        idx = lists[:, :, members, :width]  # [Bl, Hl, C, M]
        rebuild = functools.partial(_blocked, idx, kinds, mask_id, bits, members, bs, nkb, causal)
        blocked = rebuild()
        masked = blocked is not None
        if masked and budget[0] >= blocked.numel():
            budget[0] -= blocked.numel()
        else:  # past the budget (long sequences with per-head layouts): the mask is rebuilt at each call
            blocked = None
        chunks.append(_Chunk(members, idx.permute(2, 0, 1, 3).contiguous(), masked, blocked,
                             rebuild if masked and blocked is None else None, budget))
        i = j
    return chunks


def _blocked(idx, kinds, mask_id, bits, members, bs, nkb, causal):
    """bool [C, Bl, Hl, 1, bs, M * bs], True where a score is masked out; None when nothing is."""
    pad = idx == nkb
    safe = idx.clamp(max=nkb - 1)
    kind = torch.where(pad, EMPTY, _take(kinds, members, safe))
    need = bool((kind != FULL).any())
    rows = members[:, None] * bs + torch.arange(bs, device=idx.device)  # [C, bs]
    cols = idx[..., None] * bs + torch.arange(bs, device=idx.device)  # [Bl, Hl, C, M, bs]
    if causal:  # a key after the first row of its query block is masked for that row
        need = need or bool((cols.amax((-1, -2)) > rows[:, 0]).any())
    if not need:
        return None
    bl, hl, c, m = idx.shape
    allowed = (kind == FULL)[..., None, None].expand(bl, hl, c, m, bs, bs).clone()  # [Bl,Hl,C,M,bs(q),bs(k)]
    part = kind == PARTIAL
    if part.any():
        mid = _take(mask_id, members, safe)[part]
        allowed[part] = unpack_bits(bits[mid])
    allowed = allowed.permute(0, 1, 2, 4, 3, 5).reshape(bl, hl, c, bs, m * bs)
    if causal:
        allowed &= cols.reshape(bl, hl, c, 1, m * bs) <= rows[None, None, :, :, None]
    return (~allowed).unsqueeze(3).permute(2, 0, 1, 3, 4, 5).contiguous()


def _take(table, members, idx):
    """table [Bl, Hl, NQB, NKB] at rows `members` and, per row, columns idx [Bl, Hl, C, M]."""
    return table[:, :, members].gather(-1, idx)


# ------------------------------------------------------------------------------------ helpers
_WORKSPACE = threading.local()


def _buffer(role: str, shape, dtype) -> torch.Tensor:
    """A reused scratch tensor of this shape (one per role, dtype and thread, grown as needed).

    A chunk's gathered blocks and scores are a few MiB; taking fresh memory for each of them on
    every chunk costs the CPU as much as the arithmetic (page faults), so they are reused."""
    cache = getattr(_WORKSPACE, "buffers", None)
    if cache is None:
        cache = _WORKSPACE.buffers = {}
    n = math.prod(shape)
    buf = cache.get((role, dtype))
    if buf is None or buf.numel() < n:
        buf = cache[(role, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


class _Problem:
    """Shapes and index maps shared by the forward and the backward of one call.

    Everything runs query-block-major: rows are stored ``[NQB, B, Hx, Gr * bs, X]`` and a chunk's
    tensors are ``[C, B, Hx, ...]``, so whole query blocks and kv blocks are taken and put back
    as contiguous slabs (``index_select`` into reused buffers, and ``index_copy_``)."""

    def __init__(self, q, k, tables, bs, causal):
        data, self.bl, self.hl = tables[:3]  # a row split (tables[3]) is the kernels' scheduling
        self.b, self.h, self.nq, self.d = q.shape
        self.hkv, self.nk = k.shape[1], k.shape[2]
        self.bs = bs
        self.nqb, self.nkb = math.ceil(self.nq / bs), math.ceil(self.nk / bs)
        g = self.h // self.hkv
        # Hl == 1: the G query heads of a kv head are rows of one matmul; else one matmul per query head
        self.hx, self.gr = (self.hkv, g) if self.hl == 1 else (self.h, 1)
        self.kv_head = torch.arange(self.hx, device=q.device) // (1 if self.hl == 1 else g)
        self.chunks = _plan(data, self.bl, self.hl, bs, self.nq, self.nk, causal, self.gr, self.b * self.hx)
        self.acc = acc_dtype(q)

    def rows(self, t, scale=None):
        """[B, H, Nq, X] -> padded, in the accumulation dtype, [NQB, B * Hx * Gr * bs * X] (times scale):
        one copy into place, the padding rows zero."""
        x, bs = t.shape[-1], self.bs
        out = torch.empty(self.nqb, self.b, self.hx, self.gr, bs, x, dtype=self.acc)
        view = out.permute(1, 2, 3, 0, 4, 5)  # [B, Hx, Gr, NQB, bs, X]
        whole, rest = divmod(self.nq, bs)
        shape = (self.b, self.hx, self.gr)
        view[:, :, :, :whole] = t[:, :, : whole * bs].reshape(*shape, whole, bs, x)
        if rest:
            view[:, :, :, whole, :rest] = t[:, :, whole * bs:].reshape(*shape, rest, x)
            view[:, :, :, whole, rest:] = 0
        if scale is not None:
            out.mul_(scale)
        return out.view(self.nqb, -1)

    def new_rows(self, x):
        return torch.zeros(self.nqb, self.b * self.h * self.bs * x, dtype=self.acc)

    def unrows(self, t, x):
        """The inverse of rows: [NQB, ...] -> [B, H, Nq, X]."""
        t = t.view(self.nqb, self.b, self.hx, self.gr, self.bs, x).permute(1, 2, 3, 0, 4, 5)
        return t.reshape(self.b, self.h, self.nqb * self.bs, x)[:, :, : self.nq]

    def take_rows(self, t, chunk, x, role):
        """The chunk's rows [C, B, Hx, Gr * bs, X] of rows(...), in the scratch buffer `role`."""
        out = _buffer(role, (len(chunk.q_blocks), t.shape[1]), self.acc)
        torch.index_select(t, 0, chunk.q_blocks, out=out)
        return out.view(len(chunk.q_blocks), self.b, self.hx, self.gr * self.bs, x)

    def put_rows(self, t, chunk, val):
        t.index_copy_(0, chunk.q_blocks, val.reshape(len(chunk.q_blocks), -1))

    def kv_blocks(self, t):
        """[B, Hkv, Nk, X] -> padded with one extra zero block, [B * Hkv * (NKB + 1), bs * X] (one copy)."""
        x = t.shape[-1]
        out = torch.empty(self.b, self.hkv, (self.nkb + 1) * self.bs, x, dtype=self.acc)
        out[:, :, self.nk:] = 0
        out[:, :, : self.nk] = t
        return out.view(-1, self.bs * x)

    def flat_kv_index(self, chunk):
        """Row of each visited block in kv_blocks(...), [C * B * Hx * M] in the chunk's order."""
        bi = torch.arange(self.b).view(1, -1, 1, 1)
        hi = self.kv_head.view(1, 1, -1, 1)
        idx = (bi * self.hkv + hi) * (self.nkb + 1) + chunk.kv_blocks  # kv_blocks: [C, Bl, Hl, M]
        return idx.expand(len(chunk.q_blocks), self.b, self.hx, chunk.width).reshape(-1)

    def gather_kv(self, blocks, chunk, flat, x, role):
        """The chunk's visited blocks [C, B, Hx, M * bs, X], in the scratch buffer `role`."""
        out = _buffer(role, (len(flat), blocks.shape[1]), self.acc)
        torch.index_select(blocks, 0, flat, out=out)
        return out.view(len(chunk.q_blocks), self.b, self.hx, chunk.width * self.bs, x)

    def score_index(self, chunk):
        """Index tensors (batch, head, row, column) of a chunk's scores [C, B, Hx, Gr, bs, M * bs] into
        [B, H, NQB * bs, (NKB + 1) * bs]."""
        c, m, bs = len(chunk.q_blocks), chunk.width, self.bs
        bi = torch.arange(self.b).view(1, -1, 1, 1, 1, 1)
        hi = self.query_heads().view(1, 1, self.hx, self.gr, 1, 1)
        ri = (chunk.q_blocks[:, None] * bs + torch.arange(bs)).view(c, 1, 1, 1, bs, 1)
        ci = (chunk.kv_blocks[..., None] * bs + torch.arange(bs)).reshape(c, *chunk.kv_blocks.shape[1:3], 1, 1, m * bs)
        return bi, hi, ri, ci

    def query_heads(self):
        """[Hx, Gr]: the query head of each (matmul head, row group)."""
        x = torch.arange(self.hx).view(-1, 1)
        return x * self.gr + torch.arange(self.gr) if self.hl == 1 else x

    def bias_tiles(self, bias):
        """The bias [B|1, H|1, Nq|1, Nk|1] as tiles [Bb, Hb, NQB|1, NKB|1, bs|1, bs|1] (a view where the
        lengths are whole blocks; dims the bias broadcasts, by size 1 or stride 0, stay 1)."""
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        for dim in range(4):  # an expanded bias (stride 0) is the same values: keep one
            if bias.shape[dim] > 1 and bias.stride(dim) == 0:
                bias = bias.narrow(dim, 0, 1)
        bs = self.bs
        rows, cols = bias.shape[2] > 1, bias.shape[3] > 1
        pad_r = self.nqb * bs - self.nq if rows else 0
        pad_c = self.nkb * bs - self.nk if cols else 0
        if pad_r or pad_c:
            bias = torch.nn.functional.pad(bias, (0, pad_c, 0, pad_r))
        tiles = bias.unflatten(3, (self.nkb, bs) if cols else (1, 1)).unflatten(2, (self.nqb, bs) if rows else (1, 1))
        return tiles.permute(0, 1, 2, 4, 3, 5)  # [Bb, Hb, NQB, NKB, bs, bs]

    def chunk_bias(self, tiles, chunk):
        """The bias of a chunk's scores, broadcastable to [C, B, Hx, Gr, bs, M, bs]: whole tiles taken
        by index (the padding slots take tile 0; they are masked out)."""
        zero = torch.zeros((1,) * 5, dtype=torch.long)
        c = len(chunk.q_blocks)
        bi = torch.arange(self.b).view(1, -1, 1, 1, 1) if tiles.shape[0] > 1 else zero
        hi = self.query_heads().view(1, 1, self.hx, self.gr, 1) if tiles.shape[1] > 1 else zero
        qi = chunk.q_blocks.view(c, 1, 1, 1, 1) if tiles.shape[2] > 1 else zero
        if tiles.shape[3] > 1:
            ki = chunk.kv_blocks.clamp(max=self.nkb - 1).unsqueeze(3)  # [C, Bl, Hl, 1, M]
        else:
            ki = zero
        return tiles[bi, hi, qi, ki].permute(0, 1, 2, 3, 5, 4, 6)  # [C, B|1, Hx|1, Gr|1, bs|1, M|1, bs|1]

    def scores(self, qc, kc, tiles, chunk):
        """Scores with scale (in q), bias and mask, [C, B, Hx, Gr * bs, M * bs]."""
        s = _bmm(qc, kc, "scores", tb=True)
        if tiles is not None or chunk.masked:
            s6 = s.view(*s.shape[:3], self.gr, self.bs, s.shape[-1])
            if tiles is not None:
                s6.view(*s6.shape[:-1], chunk.width, self.bs).add_(self.chunk_bias(tiles, chunk))
            if chunk.masked:
                s6.add_(chunk.mask(self.acc))
        return s

    def probabilities(self, s):
        """softmax over the scores [..., R, S] in a scratch buffer; the row max (0 for an empty row),
        [..., R, 1]; the rows with no allowed key ([..., R, 1] bool, or None when there are none), whose
        probabilities are 0."""
        m = s.amax(-1, keepdim=True)
        prob = _buffer("prob", s.shape, s.dtype)
        torch.ops.aten._softmax.out(s, -1, False, out=prob)  # one fused pass; an empty row gives NaN
        empty = m == float("-inf")
        if not bool(empty.any()):
            return prob, m, None
        rows = empty.view(-1).nonzero().view(-1)
        prob.view(-1, prob.shape[-1]).index_fill_(0, rows, 0.0)
        return prob, m.masked_fill_(empty, 0.0), empty


def _bmm(a, b, role, *, ta: bool = False, tb: bool = False):
    """a @ b over the leading dims (a, b contiguous; ta / tb: use aᵀ / bᵀ, transposed as views so that
    no copy is made), into the scratch buffer `role`."""
    a3, b3 = a.view(-1, *a.shape[-2:]), b.view(-1, *b.shape[-2:])
    a3, b3 = a3.transpose(1, 2) if ta else a3, b3.transpose(1, 2) if tb else b3
    out = _buffer(role, (*a.shape[:-2], a3.shape[1], b3.shape[2]), a.dtype)
    torch.bmm(a3, b3, out=out.view(-1, *out.shape[-2:]))
    return out



# --------------------------------------------------------------------------------- forward
def forward(q, k, v, tables, bias, scale: float, block_size: int, causal: bool, out):
    """The interface of ``fxsparse.reference.forward``: writes out, returns the row statistics
    [B, H, 2, Nq] (row max; log of the row sum, +inf for an empty row with max 0)."""
    p = _Problem(q, k, tables, block_size, causal)
    d, dv = p.d, v.shape[-1]
    q_rows = p.rows(q, scale)
    kb, vb = p.kv_blocks(k), p.kv_blocks(v)
    o_rows, stat_rows = p.new_rows(dv), p.new_rows(2)
    stat_rows.view(-1, 2)[:, 1] = float("inf")  # rows no chunk reaches are empty
    tiles = None if bias is None else p.bias_tiles(bias)
    for chunk in p.chunks:
        flat = p.flat_kv_index(chunk)
        s = p.scores(p.take_rows(q_rows, chunk, d, "q"), p.gather_kv(kb, chunk, flat, d, "k"), tiles, chunk)
        prob, m, _ = p.probabilities(s)
        p.put_rows(o_rows, chunk, _bmm(prob, p.gather_kv(vb, chunk, flat, dv, "v"), "o"))
        # a row's largest probability is exp(max - max) / sum = 1 / sum: the log-sum is -log of it (+inf
        # for an empty row, whose probabilities are all 0); amax is a fast pass, max with its index is not
        p.put_rows(stat_rows, chunk, torch.cat([m, prob.amax(-1, keepdim=True).log_().neg_()], -1))
    out.copy_(p.unrows(o_rows, dv))
    return p.unrows(stat_rows, 2).transpose(-1, -2).contiguous()


# -------------------------------------------------------------------------------- backward
def backward(dout, q, k, v, out, lse, tables, bias, scale: float, block_size: int, causal: bool, bias_grad: bool):
    """The interface of ``fxsparse.reference.backward``: (dq, dk, dv, dbias [B, H, Nq, Nk] or None)."""
    p = _Problem(q, k, tables, block_size, causal)
    b, h, nq, nk, bs, d, dv_dim = p.b, p.h, p.nq, p.nk, p.bs, p.d, v.shape[-1]
    q_rows, do_rows = p.rows(q, scale), p.rows(dout)
    kb, vb = p.kv_blocks(k), p.kv_blocks(v)
    delta_rows = p.rows((out.to(p.acc) * dout.to(p.acc)).sum(-1, keepdim=True))
    dq_rows = p.new_rows(d)
    dk, dv = torch.zeros_like(kb), torch.zeros_like(vb)
    dbias = torch.zeros(b, h, p.nqb * bs, (p.nkb + 1) * bs, dtype=p.acc) if bias_grad else None
    tiles = None if bias is None else p.bias_tiles(bias)
    for chunk in p.chunks:
        flat = p.flat_kv_index(chunk)
        qc, doc = p.take_rows(q_rows, chunk, d, "q"), p.take_rows(do_rows, chunk, dv_dim, "do")
        kc, vc = p.gather_kv(kb, chunk, flat, d, "k"), p.gather_kv(vb, chunk, flat, dv_dim, "v")
        # the forward's probabilities again (the same fused softmax over the same scores)
        prob = p.probabilities(p.scores(qc, kc, tiles, chunk))[0]
        dv.index_add_(0, flat, _bmm(prob, doc, "dkv", ta=True).view(len(flat), -1))
        ds = _bmm(doc, vc, "ds", tb=True).sub_(p.take_rows(delta_rows, chunk, 1, "delta")).mul_(prob)
        p.put_rows(dq_rows, chunk, _bmm(ds, kc, "o").mul_(scale))
        dk.index_add_(0, flat, _bmm(ds, qc, "dkv", ta=True).view(len(flat), -1))  # qc carries the scale
        if dbias is not None:
            # padding slots all point at the zero block's columns, where ds = 0: repeated writes agree
            dbias[p.score_index(chunk)] = ds.view(*ds.shape[:3], p.gr, bs, ds.shape[-1])
    dq = p.unrows(dq_rows, d)
    dk = dk.view(b, p.hkv, (p.nkb + 1) * bs, d)[:, :, :nk]
    dv = dv.view(b, p.hkv, (p.nkb + 1) * bs, dv_dim)[:, :, :nk]
    if dbias is not None:
        dbias = dbias[:, :, :nq, :nk]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias
