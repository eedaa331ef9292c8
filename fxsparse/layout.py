"""Layout: the compiled form of an attention mask for one (q_len, kv_len).

The token mask (True = may attend) is cut into square blocks of ``block_size``:

* a *full* block has every entry True: the kernels run it with no per-element work;
* a *partial* block has some True entries: its element mask is packed into bits
  (``block_size // 32`` int32 words a row) and applied inside the kernel;
* an *empty* block is never visited.

Positions past ``q_len`` / ``kv_len`` count as False, so the last block of a
sequence that is not a multiple of the block size is partial at most and full
blocks never need bounds checks. Identical partial blocks share one packed mask.

For the forward pass each query block lists the kv blocks it visits (partial and
full separately, ascending); for the backward pass each kv block lists the query
blocks that visit it. Tables are per (batch, head) of the mask, where either may
be 1 and broadcast.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import numbers
from dataclasses import dataclass, field

import torch

DEFAULT_BLOCK_SIZE = 128
EMPTY, PARTIAL, FULL = 0, 1, 2

# The tables live in one flat int32 tensor (`Layout.data`), in this order, so the op takes a
# single tensor whatever the mask. Shapes in blocks: Bl, Hl = the mask's batch and heads (1 or B, 1 or H),
# NQB, NKB = query and kv blocks, P = distinct partial-block masks.
TABLE_SHAPES = (
    ("kinds", ("bl", "hl", "nqb", "nkb")),  # EMPTY / PARTIAL / FULL
    ("mask_id", ("bl", "hl", "nqb", "nkb")),  # row of `bits` of a partial block, else -1
    ("full_num", ("bl", "hl", "nqb")),
    ("full_idx", ("bl", "hl", "nqb", "nkb")),  # kv blocks, ascending, padded
    ("part_num", ("bl", "hl", "nqb")),
    ("part_idx", ("bl", "hl", "nqb", "nkb")),
    ("part_mid", ("bl", "hl", "nqb", "nkb")),  # mask_id of each part_idx entry (one load, not two chained)
    ("t_full_num", ("bl", "hl", "nkb")),  # transposed, for dk / dv
    ("t_full_idx", ("bl", "hl", "nkb", "nqb")),
    ("t_part_num", ("bl", "hl", "nkb")),
    ("t_part_idx", ("bl", "hl", "nkb", "nqb")),
    ("t_part_mid", ("bl", "hl", "nkb", "nqb")),  # mask_id of each t_part_idx entry
    # query blocks whose visit list is split across programs (`Layout.split`), and kv blocks likewise in
    # the transposed lists; stored plus one, so that zeros (no split) are neutral
    ("long_index", ("bl", "hl", "nqb")),  # 1 + the block's position among the long query blocks, else 0
    ("long_rows", ("bl", "hl", "nqb")),  # 1 + the long query blocks, ascending, then 0
    ("t_long_index", ("bl", "hl", "nkb")),
    ("t_long_cols", ("bl", "hl", "nkb")),
)
# bits: [P, block, block // 32], the packed masks (row = query, bit = key); t_bits: the same masks
# transposed (row = key, bit = query), for the dk / dv kernel
TABLE_NAMES = tuple(n for n, _ in TABLE_SHAPES) + ("bits", "t_bits")


@functools.lru_cache(maxsize=None)
def table_offsets(bl: int, hl: int, nqb: int, nkb: int) -> dict:
    """name -> (offset, shape) in the flat table tensor; "bits" starts where the others end, and
    "t_bits" fills the second half of what follows (see `bits_offsets`)."""
    dims = dict(bl=bl, hl=hl, nqb=nqb, nkb=nkb)
    out, pos = {}, 0
    for name, shape in TABLE_SHAPES:
        size = tuple(dims[d] for d in shape)
        out[name] = (pos, size)
        pos += math.prod(size)
    out["bits"] = (pos, None)
    return out


def bits_offsets(numel: int, bl: int, hl: int, nqb: int, nkb: int) -> tuple:
    """Offsets of "bits" and "t_bits" in a flat table tensor of `numel` int32s."""
    off = table_offsets(bl, hl, nqb, nkb)["bits"][0]
    return off, off + (numel - off) // 2


def table_view(data: torch.Tensor, bl: int, hl: int, block_size: int, shape: tuple, name: str) -> torch.Tensor:
    """One named table as a view of the flat tensor."""
    nqb, nkb = math.ceil(shape[0] / block_size), math.ceil(shape[1] / block_size)
    if name in ("bits", "t_bits"):
        bits, t_bits = bits_offsets(data.numel(), bl, hl, nqb, nkb)
        part = data[bits:t_bits] if name == "bits" else data[t_bits:]
        return part.view(-1, block_size, block_size // 32)
    off, size = table_offsets(bl, hl, nqb, nkb)[name]
    return data[off : off + math.prod(size)].view(size)


def _as_4d(mask: torch.Tensor) -> torch.Tensor:
    if mask.dim() < 2 or mask.dim() > 4:
        raise ValueError(
            f"mask must have 2 to 4 dims ([Nq, Nk], [H, Nq, Nk] or [B, H, Nq, Nk]), got shape {tuple(mask.shape)}"
        )
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _lists_into(sel: torch.Tensor, dim: int, index: torch.Tensor, num_out: torch.Tensor, idx_out: torch.Tensor):
    """Block lists of a bool selection along ``dim`` written into table views: ``num_out`` (``sel`` without
    ``dim``) the count, ``idx_out`` (``sel``'s shape) the selected ``index`` values ascending, then the
    unselected ones ascending (so every entry names a real block). ``index``: int32 along ``dim``.
    Returns where each block went (int64, ``sel``'s shape)."""
    csum = sel.cumsum(dim, dtype=torch.int32)
    num = csum.narrow(dim, csum.shape[dim] - 1, 1)
    pos = torch.where(sel, csum - 1, num + index - csum).long()  # an unselected block goes after every selected one
    num_out.copy_(num.squeeze(dim))
    idx_out.scatter_(dim, pos, index.expand(sel.shape))
    return pos


def _pack_bits(blocks: torch.Tensor) -> torch.Tensor:
    """bool [P, bs, bs] -> int32 [P, bs, bs // 32]; bit j of word w is column 32 * w + j."""
    p, r, c = blocks.shape
    shifts = torch.arange(8, device=blocks.device, dtype=torch.uint8)
    octets = (blocks.reshape(p, r, c // 8, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)
    return octets.contiguous().view(torch.int32)  # four bytes a word, little-endian: byte k holds bits 8k..8k+7


pack_bits = _pack_bits  # the public name, for layouts built elsewhere (fxsparse.masks)


_HASH_WEIGHTS: dict = {}


def unique_rows(rows: torch.Tensor) -> tuple:
    """The distinct rows of an integer [R, W] tensor and, per row, the index of its copy among them
    (``torch.unique(rows, dim=0, return_inverse=True)`` by another road: on a GPU that one sorts whole
    rows and costs milliseconds). Rows are grouped by a 64-bit hash (fixed odd weights; the distinct
    rows come in the order of their hashes, the same for the same set of rows), then checked against
    their group's row, exactly: two distinct rows with one hash fall back to the row sort."""
    r, w = rows.shape
    key = (w, str(rows.device))
    weights = _HASH_WEIGHTS.get(key)
    if weights is None:
        g = torch.Generator().manual_seed(15)
        weights = torch.randint(-2**62, 2**62, (w,), generator=g, dtype=torch.int64) * 2 + 1
        weights = _HASH_WEIGHTS[key] = weights.to(rows.device)
    hashes, inverse = torch.unique((rows.long() * weights).sum(-1), return_inverse=True)  # wraps modulo 2^64
    first = torch.empty(hashes.shape[0], dtype=torch.int64, device=rows.device)
    first.scatter_(0, inverse, torch.arange(r, device=rows.device))  # a row of each hash
    uniq = rows[first]
    if not bool((uniq[inverse] == rows).all()):
        return torch.unique(rows, dim=0, return_inverse=True)
    return uniq, inverse


def unpack_bits(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> bool [..., 32 * W]."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 32).bool()


@dataclass(eq=False)
class Layout:
    """Block-sparse form of a bool attention mask [B|1, H|1, q_len, kv_len]; build once, reuse every call."""

    block_size: int
    shape: tuple  # (q_len, kv_len)
    batch: int  # 1 or B
    num_heads: int  # 1 or H
    data: torch.Tensor  # flat int32: the tables of TABLE_NAMES, see table_offsets
    density: float = 1.0
    # the mask lies inside the top-left causal triangle (key j <= query i): the op's causal flag adds nothing
    causal: bool = False
    # refinements of this layout already built (block size -> Layout), see `refine`
    refined: dict = field(default_factory=dict, init=False, repr=False)
    # (chunk, long rows, chunks) for the query blocks, then the same for the kv blocks: a query block
    # that visits more than 2 * chunk kv blocks (`long_rows`) is walked by several programs, `chunk`
    # blocks each, whose partial results are then merged, so that one long row (a global token's)
    # does not finish long after the others; a kv block visited by as many query blocks likewise in
    # the backward (`t_long_cols`). Long rows (columns) 0 = none; () = no split at all
    split: tuple = ()
    # the mask function this layout was built from, if any (to_block_mask hands it to FlexAttention)
    mask_mod: object = field(default=None, init=False, repr=False)
    # what the `kinds` table holds for each block (the module's constants, here for code that
    # gets a Layout without importing this module)
    EMPTY = EMPTY
    PARTIAL = PARTIAL
    FULL = FULL

    def __getattr__(self, name):  # the named tables, as views of `data`
        if name in TABLE_NAMES and "data" in self.__dict__:
            return table_view(self.data, self.batch, self.num_heads, self.block_size, self.shape, name)
        raise AttributeError(name)

    # ---------------------------------------------------------------- building
    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int | None = None) -> "Layout":
        """Exact layout of a bool token mask [Nq, Nk], [H, Nq, Nk] or [B, H, Nq, Nk] (True = may attend)."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}; "
                "for an additive float mask pass it as `bias=` instead"
            )
        bs = check_block_size(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
        m4 = _as_4d(mask)
        bl, hl, nq, nk = m4.shape
        if nq == 0 or nk == 0:
            raise ValueError(f"mask has an empty sequence axis: shape {tuple(mask.shape)}")
        nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
        padded = torch.zeros(bl, hl, nqb * bs, nkb * bs, dtype=torch.bool, device=m4.device)
        padded[:, :, :nq, :nk] = m4
        tiles = padded.reshape(bl, hl, nqb, bs, nkb, bs).transpose(3, 4)  # [Bl,Hl,NQB,NKB,bs,bs]
        counts = tiles.sum((-1, -2))
        full = counts == bs * bs
        partial = (counts > 0) & ~full
        kinds = torch.where(full, FULL, torch.where(partial, PARTIAL, EMPTY)).to(torch.int8)
        mask_id = torch.full(kinds.shape, -1, dtype=torch.int32, device=m4.device)
        if partial.any():
            packed = _pack_bits(tiles[partial])
            uniq, inverse = unique_rows(packed.reshape(packed.shape[0], -1))
            bits = uniq.reshape(-1, bs, bs // 32).contiguous()
            mask_id[partial] = inverse.to(torch.int32)
        else:
            bits = torch.zeros(1, bs, bs // 32, dtype=torch.int32, device=m4.device)
        return cls._from_kinds(kinds, mask_id, bits, bs, (nq, nk))

    @classmethod
    def dense(cls, q_len: int, kv_len: int, block_size: int | None = None, device=None) -> "Layout":
        """The all-True layout, built with no data-dependent step (so torch.compile can trace it)."""
        bs = check_block_size(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
        nqb, nkb = math.ceil(q_len / bs), math.ceil(kv_len / bs)
        rows_left, cols_left = q_len - (nqb - 1) * bs, kv_len - (nkb - 1) * bs  # in the last block row / column
        kinds = torch.full((1, 1, nqb, nkb), FULL, dtype=torch.int8, device=device)
        mask_id = torch.full((1, 1, nqb, nkb), -1, dtype=torch.int32, device=device)
        r = torch.arange(bs, device=device)
        rows_ok = (r < rows_left)[:, None].expand(bs, bs)
        cols_ok = (r < cols_left)[None, :].expand(bs, bs)
        bits = _pack_bits(torch.stack([rows_ok, cols_ok, rows_ok & cols_ok]))  # last row, last column, corner
        if rows_left < bs:
            kinds[..., -1, :] = PARTIAL
            mask_id[..., -1, :] = 0
        if cols_left < bs:
            kinds[..., :, -1] = PARTIAL
            mask_id[..., :, -1] = 1
        if rows_left < bs and cols_left < bs:
            mask_id[..., -1, -1] = 2
        return cls._from_kinds(kinds, mask_id, bits, bs, (q_len, kv_len), density=1.0, causal=False)

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, block_size: int, shape: tuple | None = None) -> "Layout":
        """Layout from a bool block map [NQB, NKB] (or [H|1, ...], [B|1, H|1, ...]): True blocks are computed whole.

        ``shape`` = (q_len, kv_len) defaults to the block map times ``block_size``; when it is not a
        multiple of the block, the blocks on the edge are cut to the sequence.
        """
        if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.bool:
            raise TypeError("blocks must be a bool tensor [NQB, NKB] (True = compute this block)")
        bs = check_block_size(block_size)
        b4 = _as_4d(blocks)
        nqb, nkb = b4.shape[-2:]
        nq, nk = shape if shape is not None else (nqb * bs, nkb * bs)
        if math.ceil(nq / bs) != nqb or math.ceil(nk / bs) != nkb:
            raise ValueError(
                f"block map of {nqb}x{nkb} blocks of {bs} does not cover shape {(nq, nk)}: "
                f"expected {math.ceil(nq / bs)}x{math.ceil(nk / bs)} blocks"
            )
        if nq % bs == 0 and nk % bs == 0:
            kinds = torch.where(b4, FULL, EMPTY).to(torch.int8)
            mask_id = torch.full(kinds.shape, -1, dtype=torch.int32, device=b4.device)
            bits = torch.zeros(1, bs, bs // 32, dtype=torch.int32, device=b4.device)
            return cls._from_kinds(kinds, mask_id, bits, bs, (nq, nk))
        # ragged edges: go through the exact token mask
        tok = b4.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :nq, :nk]
        return cls.from_mask(tok, bs)

    @classmethod
    def _from_kinds(cls, kinds, mask_id, bits, bs, shape, density: float | None = None,
                    causal: bool | None = None) -> "Layout":
        """The flat tables from block kinds [Bl, Hl, NQB, NKB], mask ids (the same shape, -1 where not
        partial; or a pair (flat positions, ids) of the partial blocks) and distinct packed masks.
        ``density`` and ``causal`` (the mask lies in the top-left causal triangle) are computed unless given."""
        def fill(kinds_out, mid_out):
            kinds_out.copy_(kinds)
            if isinstance(mask_id, tuple):  # (flat block positions, ids) of the partial blocks; -1 elsewhere
                mid_out.fill_(-1)
                mid_out.view(-1)[mask_id[0]] = mask_id[1].to(torch.int32)
            else:
                mid_out.copy_(mask_id)

        return _assemble(kinds.shape, bits, bs, shape, kinds.device, fill, density, causal)

    @classmethod
    def from_mask_mod(cls, mask_mod, q_len: int, kv_len: int, *, batch: int | None = None, heads: int | None = None,
                      block_size: int = DEFAULT_BLOCK_SIZE, device=None) -> "Layout":
        """Exact layout of a mask function, FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

        It is called as FlexAttention's ``create_mask`` calls it: under ``torch.vmap``, each index a 0-d
        integer tensor, so index arithmetic and indexing a captured tensor (``doc_ids[b, q_idx]``) work.
        ``batch`` / ``heads``: None when the mask does not depend on ``b`` / ``h`` (it is called with 0
        and the layout broadcasts), else the count to evaluate. Built on ``device`` (default CPU) a
        bounded tile at a time: memory is O(blocks + distinct partial blocks x block_size^2), never an
        [q_len, kv_len] tensor. A mask_mod from ``fxsparse.patterns`` (``pattern.mask_mod(q_len, kv_len)``)
        knows which blocks are full or empty without evaluating them; only its partial blocks are
        evaluated. A generic mask_mod is evaluated at every position (O(q_len x kv_len) work).
        """
        if not callable(mask_mod):
            raise TypeError(f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}")
        nq, nk = check_count(q_len, "q_len", 1), check_count(kv_len, "kv_len", 1)
        bl = 1 if batch is None else check_count(batch, "batch", 1)
        hl = 1 if heads is None else check_count(heads, "heads", 1)
        bs = check_block_size_any(block_size)
        classify = None
        if hasattr(mask_mod, "block_kinds"):
            classify = mask_mod.block_kinds(nq, nk, bs, torch.device("cpu") if device is None else torch.device(device))
        out = build_tables(mask_mod, nq, nk, bl, hl, bs, device, classify)
        out.mask_mod = mask_mod
        return out

    @classmethod
    def from_block_mask(cls, block_mask, mask_mod=None) -> "Layout":
        """The layout of a FlexAttention ``BlockMask``: its full blocks stay full, its other listed blocks
        are evaluated with ``mask_mod`` (default: the BlockMask's own), unlisted blocks are empty.
        The BlockMask's query and kv block sizes must be equal and one of 32, 64, 128, 256."""
        qbs, kbs = block_mask.BLOCK_SIZE
        if qbs != kbs:
            raise ValueError(f"from_block_mask: the BlockMask's query and kv block sizes differ ({qbs}, {kbs}); "
                             "build it with one BLOCK_SIZE of 32, 64, 128 or 256")
        bs = check_block_size_any(qbs, "the BlockMask's BLOCK_SIZE")
        nq, nk = (int(n) for n in block_mask.seq_lengths)
        mask_mod = block_mask.mask_mod if mask_mod is None else mask_mod
        num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
        bl, hl, nqb = num.shape
        nkb = math.ceil(nk / bs)
        if nqb != math.ceil(nq / bs):
            raise ValueError(f"from_block_mask: the BlockMask lists {nqb} query blocks for {nq} queries in blocks of "
                             f"{bs}; expected {math.ceil(nq / bs)} (was it sliced?)")
        kinds = torch.zeros(bl, hl, nqb, nkb + 1, dtype=torch.int8, device=num.device)  # column nkb: unused slots

        def mark(num, idx, kind):
            slots = torch.arange(idx.shape[-1], device=idx.device)
            cols = torch.where(slots < num[..., None], idx.long(), nkb)
            kinds.scatter_(-1, cols, torch.full(cols.shape, kind, dtype=torch.int8, device=cols.device))

        mark(num, idx, PARTIAL)
        if block_mask.full_kv_num_blocks is not None:
            mark(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, FULL)
        kinds = kinds[..., :nkb].contiguous()
        out = build_tables(mask_mod, nq, nk, bl, hl, bs, num.device, lambda qb0, qb1: kinds[:, :, qb0:qb1])
        out.mask_mod = mask_mod
        return out

    def to_block_mask(self):
        """This layout as a FlexAttention ``BlockMask`` (same blocks; its mask_mod gives the exact mask)."""
        from torch.nn.attention.flex_attention import BlockMask

        mod = self.mask_mod if self.mask_mod is not None else _TableMaskMod(self)
        return BlockMask.from_kv_blocks(
            self.part_num.clone(), self.part_idx.clone(), self.full_num.clone(), self.full_idx.clone(),
            BLOCK_SIZE=self.block_size, mask_mod=mod, seq_lengths=tuple(self.shape))

    def __and__(self, other: "Layout") -> "Layout":
        """The intersection: allowed where both layouts allow (batch and heads broadcast)."""
        return _combine(self, other, True)

    def __or__(self, other: "Layout") -> "Layout":
        """The union: allowed where either layout allows (batch and heads broadcast)."""
        return _combine(self, other, False)

    def fold_causal(self) -> "Layout":
        """This layout with the op's ``causal=True`` folded in (key j <= query i, top-left as SDPA's
        ``is_causal``). The result has ``causal`` True, so ``sparse_attention(..., causal=True)`` skips
        the kernels' per-element causal test: the layout already holds it."""
        if self.causal:
            return self
        nq, nk = self.shape
        tri = build_tables(_causal_mod(0), nq, nk, 1, 1, self.block_size, self.device,
                     _causal_classify(nq, nk, self.block_size, self.device))
        return self & tri

    def refine(self, block_size: int) -> "Layout":
        """The same mask in smaller blocks (``block_size`` divides this layout's block size).

        The parts of a partial block that are all True or all False become full or empty blocks, so a
        kernel whose tiles are smaller than the block skips them: a local window in 128-blocks visits
        three blocks a row, two of them partial; in 64-blocks five, two of them partial (a sixth of
        the work less, and half the element masks). The result is cached on this layout.
        """
        fine = check_block_size(block_size)
        bs = self.block_size
        if fine == bs:
            return self
        if fine > bs:
            raise ValueError(f"refine: block_size {fine} is larger than this layout's {bs}")
        if fine in self.refined:
            return self.refined[fine]
        r = bs // fine
        kinds, mask_id = self.kinds, self.mask_id
        # every distinct partial mask cut into r x r sub-blocks; the packed words of a sub-block are a
        # slice of its block's words (32 divides the sub-block), so nothing is unpacked
        sub = self.bits.reshape(-1, r, fine, r, fine // 32).transpose(2, 3)  # [P, r, r, fine, fine // 32]
        all_true, all_false = (sub == -1).all(-1).all(-1), (sub == 0).all(-1).all(-1)
        sub_kind = torch.where(all_true, FULL, torch.where(all_false, EMPTY, PARTIAL)).to(torch.int8)
        sub_mid = torch.full(sub_kind.shape, -1, dtype=torch.int32, device=sub.device)
        sub_part = sub_kind == PARTIAL
        if sub_part.any():
            uniq, inverse = unique_rows(sub[sub_part].flatten(1))
            sub_mid[sub_part] = inverse.to(torch.int32)
            bits = uniq.reshape(-1, fine, fine // 32).contiguous()
        else:
            bits = torch.zeros(1, fine, fine // 32, dtype=torch.int32, device=sub.device)
        # the coarse tables blown up r x r: full and empty blocks stay as they are, partial ones take their parts
        bl, hl, nqb, nkb = kinds.shape
        coarse = kinds[:, :, :, None, :, None].expand(bl, hl, nqb, r, nkb, r)
        mid = mask_id.clamp(min=0).long()
        part_kind = sub_kind[mid].permute(0, 1, 2, 4, 3, 5)  # [Bl, Hl, NQB, r, NKB, r]
        part_mid = sub_mid[mid].permute(0, 1, 2, 4, 3, 5)
        is_part = coarse == PARTIAL
        fine_kinds = torch.where(is_part, part_kind, coarse).reshape(bl, hl, nqb * r, nkb * r)
        fine_mid = torch.where(is_part, part_mid, -1).reshape(bl, hl, nqb * r, nkb * r)
        nqf, nkf = math.ceil(self.shape[0] / fine), math.ceil(self.shape[1] / fine)  # sub-blocks past the end go
        out = Layout._from_kinds(fine_kinds[:, :, :nqf, :nkf].contiguous(), fine_mid[:, :, :nqf, :nkf].contiguous(),
                                 bits, fine, self.shape)
        self.refined[fine] = out
        return out

    # ---------------------------------------------------------------- use
    @property
    def num_blocks(self) -> tuple:
        return math.ceil(self.shape[0] / self.block_size), math.ceil(self.shape[1] / self.block_size)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device) -> "Layout":
        moved = Layout(block_size=self.block_size, shape=self.shape, batch=self.batch, num_heads=self.num_heads,
                       data=self.data.to(device), density=self.density, causal=self.causal, split=self.split)
        moved.mask_mod = self.mask_mod
        moved.refined.update({bs: fine.to(device) for bs, fine in self.refined.items()})
        return moved

    def to_mask(self) -> torch.Tensor:
        """The exact token mask this layout encodes, bool [Bl, Hl, q_len, kv_len]."""
        return block_mask(self.data, self.batch, self.num_heads, self.block_size, self.shape, 0, self.num_blocks[0])

    def plot(self, path=None, **kwargs):
        """A picture of this layout (full / partial / empty blocks; needs matplotlib): ``fxsparse.plot.plot_layout``."""
        from .plot import plot_layout
        return plot_layout(self, path, **kwargs)

    def __repr__(self) -> str:
        kinds = self.kinds
        n_full = int((kinds == FULL).sum())
        n_part = int((kinds == PARTIAL).sum())
        total = kinds.numel()
        return (
            f"Layout(shape={self.shape}, block_size={self.block_size}, batch={self.batch}, heads={self.num_heads}, "
            f"blocks={self.num_blocks[0]}x{self.num_blocks[1]}, full={n_full}, partial={n_part}, "
            f"empty={total - n_full - n_part}, density={self.density:.2%}, device={self.device})"
        )


def block_mask(data, bl: int, hl: int, block_size: int, shape: tuple, qb_start: int, qb_end: int) -> torch.Tensor:
    """Token mask of query blocks [qb_start, qb_end) from the flat tables: bool [Bl, Hl, rows, kv_len]."""
    kinds, mask_id, bits = (table_view(data, bl, hl, block_size, shape, n) for n in ("kinds", "mask_id", "bits"))
    nq, nk = shape
    bs = block_size
    k = kinds[:, :, qb_start:qb_end]  # [Bl,Hl,nb,NKB]
    mid = mask_id[:, :, qb_start:qb_end]
    elems = unpack_bits(bits[mid.clamp(min=0).long()])  # [Bl,Hl,nb,NKB,bs,bs]
    full = (k == FULL)[..., None, None]
    part = (k == PARTIAL)[..., None, None]
    tiles = full | (part & elems)
    bl, hl, nb, nkb = k.shape
    tok = tiles.transpose(3, 4).reshape(bl, hl, nb * bs, nkb * bs)
    return tok[:, :, : min(nb * bs, nq - qb_start * bs), :nk]


def check_block_size(bs) -> int:
    if not isinstance(bs, int) or bs not in (32, 64, 128, 256):
        raise ValueError(f"block_size must be one of 32, 64, 128, 256, got {bs!r}")
    return bs


def check_block_size_any(bs, what: str = "block_size") -> int:
    """An integral block size (Python or numpy int, or an integral 0-d tensor), as an int."""
    if isinstance(bs, bool) or not isinstance(bs, numbers.Integral):
        if not (isinstance(bs, torch.Tensor) and bs.dim() == 0 and not bs.is_floating_point() and bs.dtype != torch.bool):
            raise ValueError(f"{what} must be one of 32, 64, 128, 256, got {bs!r}")
    return check_block_size(int(bs))


def layout_from_kinds(kinds, mask_id, bits, block_size: int, shape: tuple, *, density: float | None = None,
                      causal: bool | None = None) -> "Layout":
    """A Layout from its block kinds (int8 [Bl, Hl, NQB, NKB]), the partial blocks' mask ids (int32, the
    same shape, -1 elsewhere) and their packed masks (int32 [P, bs, bs // 32]; a mask need not be
    distinct). With ``density`` and ``causal`` given nothing is read back to the host, so a layout
    derived from a runtime mask costs no synchronisation (``fxsparse.masks``)."""
    return Layout._from_kinds(kinds, mask_id, bits, block_size, shape, density=density, causal=causal)


# ------------------------------------------------------------------------------ sizes and checks
_CHUNK = 1 << 20  # elements (blocks or mask entries) handled at once while building: bounds the scratch memory


def _assemble(dims, bits, bs: int, shape, device, fill, density=None, causal=None) -> "Layout":
    """A Layout's flat tables, written straight into one preallocated tensor.

    ``dims`` = (Bl, Hl, NQB, NKB); ``bits``: the distinct packed partial masks [P, bs, bs // 32];
    ``fill(kinds, mask_id)`` writes the int32 block kinds and mask ids into their tables (views of the
    result). The block lists are derived from them a bounded number of block rows (columns) at a time,
    so the memory beyond the result is O(_CHUNK) whatever the number of blocks; ``density`` and
    ``causal`` are then read off the lists (O(block rows), one synchronisation) unless given."""
    bl, hl, nqb, nkb = dims
    nq, nk = int(shape[0]), int(shape[1])
    offsets = table_offsets(bl, hl, nqb, nkb)
    words = bits.numel()
    data = torch.empty(offsets["bits"][0] + 2 * words, dtype=torch.int32, device=device)

    def view(name):
        off, size = offsets[name]
        return data[off: off + math.prod(size)].view(size)

    kinds, mask_id = view("kinds"), view("mask_id")
    fill(kinds, mask_id)
    bits_at = offsets["bits"][0]
    data[bits_at: bits_at + words] = bits.reshape(-1)
    if build_kernels(data.device):  # three Triton launches (fxsparse.kernels.build), the same tables
        from .kernels.build import write_lists

        write_lists(data, offsets, dims, bs, bits.shape[0])
    else:
        _write_lists(view, kinds, mask_id, bits, dims, data, bits_at + words)
    split = ()
    data[offsets["long_index"][0]: offsets["bits"][0]].zero_()  # no split until _facts finds one
    if density is None or causal is None:
        got_density, got_causal, split = _facts(view, kinds, mask_id, bits, bs, nq, nk)
        density = got_density if density is None else density
        causal = got_causal if causal is None else causal
    return Layout(block_size=bs, shape=(nq, nk), batch=bl, num_heads=hl, data=data, density=density,
                  causal=causal, split=split)


def build_kernels(device) -> bool:
    """Whether a build runs Triton kernels (``fxsparse.kernels.build``: on a GPU) or torch operations."""
    return torch.device(device).type == "cuda"


def _write_lists(view, kinds, mask_id, bits, dims, data, t_bits_at: int) -> None:
    """`_assemble`'s lists and transposed masks in torch operations, a bounded number of block rows
    (columns) at a time: the path for CPU tensors and the oracle of ``fxsparse.kernels.build``."""
    bl, hl, nqb, nkb = dims
    device = data.device
    cols = torch.arange(nkb, device=device, dtype=torch.int32)
    step = max(1, _CHUNK // max(1, bl * hl * nkb))
    for qb0 in range(0, nqb, step):  # forward tables: per query block, its kv blocks
        k = kinds[:, :, qb0: qb0 + step]
        for kind, name in ((FULL, "full"), (PARTIAL, "part")):
            pos = _lists_into(k == kind, -1, cols, view(name + "_num")[:, :, qb0: qb0 + step],
                              view(name + "_idx")[:, :, qb0: qb0 + step])
        # a partial block's mask id beside its index (see part_mid above); the blocks listed after the
        # partial ones are not partial: their id is -1, as a gather by index would give
        view("part_mid")[:, :, qb0: qb0 + step].scatter_(-1, pos, mask_id[:, :, qb0: qb0 + step])
    rows = torch.arange(nqb, device=device, dtype=torch.int32)
    step = max(1, _CHUNK // max(1, bl * hl * nqb))
    for kb0 in range(0, nkb, step):  # backward tables: per kv block, the query blocks visiting it
        # the chunk's kv blocks as rows of a contiguous copy: the scans run along memory, not across it
        k = kinds[:, :, :, kb0: kb0 + step].transpose(-1, -2).contiguous()
        for kind, name in ((FULL, "full"), (PARTIAL, "part")):
            pos = _lists_into(k == kind, -1, rows, view("t_" + name + "_num")[:, :, kb0: kb0 + step],
                              view("t_" + name + "_idx")[:, :, kb0: kb0 + step])
        view("t_part_mid")[:, :, kb0: kb0 + step].scatter_(-1, pos, mask_id[:, :, :, kb0: kb0 + step].transpose(-1, -2))
    data[t_bits_at:] = _pack_bits(unpack_bits(bits).transpose(-1, -2)).reshape(-1)


_UPPER: dict = {}


def _strict_upper(bs: int, device) -> torch.Tensor:
    """The packed [bs, bs // 32] mask of a block's entries above its diagonal (key > query), kept per device."""
    key = (bs, str(device))
    if key not in _UPPER:
        r = torch.arange(bs, device=device)
        _UPPER[key] = _pack_bits((r[None, :] > r[:, None])[None])[0]
    return _UPPER[key]


# A query block is split across programs when it visits more than 2 * chunk kv blocks, chunk being twice
# the mean visit count and at least SPLIT_MIN_CHUNK blocks (see `Layout.split`)
SPLIT_MIN_CHUNK = 16


def _split_lists(index_out: torch.Tensor, rows_out: torch.Tensor, row_len: torch.Tensor, chunk: int) -> torch.Tensor:
    """Writes the positions (``index_out``) and lists (``rows_out``) of the long blocks of ``row_len``
    (int32 [Bl, Hl, N], how many blocks each one's list holds), those with more than 2 * chunk, both
    plus one (0: not long, no more). Returns the number of long blocks in the widest (batch, head), on
    the device."""
    long = row_len > 2 * chunk
    count = long.sum(-1, dtype=torch.int32)
    index_out.copy_(torch.where(long, long.cumsum(-1, dtype=torch.int32), 0))
    block = torch.arange(row_len.shape[-1], device=row_len.device, dtype=torch.int32)
    _lists_into(long, -1, block, torch.empty_like(count), rows_out)
    rows_out.add_(1).masked_fill_(block >= count[..., None], 0)
    return count.max()


def _split(view, row_len: torch.Tensor, col_len: torch.Tensor, stats: list) -> tuple:
    """`Layout.split` from the lists' lengths (query blocks: ``row_len``, kv blocks: ``col_len``) and
    their sums and maxima (``stats``, read already); writes the tables of the long blocks. Nothing more
    is read back unless some list is long (then the long blocks are counted, one more synchronisation)."""
    sides = []
    for (total, longest), length, names in zip((stats[:2], stats[2:]), (row_len, col_len),
                                               (("long_index", "long_rows"), ("t_long_index", "t_long_cols"))):
        chunk = max(SPLIT_MIN_CHUNK, math.ceil(2 * total / length.numel()))
        sides.append((chunk, int(longest), length, names))
    if all(longest <= 2 * chunk for chunk, longest, _, _ in sides):
        return ()
    counts = [_split_lists(view(names[0]), view(names[1]), length, chunk) if longest > 2 * chunk
              else torch.zeros((), dtype=torch.int32, device=length.device)
              for chunk, longest, length, names in sides]
    counts = torch.stack(counts).tolist()
    return tuple(x for (chunk, longest, _, _), n in zip(sides, counts) for x in (chunk, n, -(-longest // chunk)))


def _facts(view, kinds, mask_id, bits, bs: int, nq: int, nk: int) -> tuple:
    """(density, causal, split) of freshly written tables, from the per-row lists (O(block rows)), read in
    one synchronisation. density: the share of the [nq, nk] scores the visited blocks compute (edge blocks
    cut to the sequence), averaged over the mask's batch and heads; causal: every allowed entry has
    key j <= query i (token indices, top-left as SDPA's is_causal); split: `Layout.split`."""
    bl, hl, nqb, nkb = kinds.shape
    dev = kinds.device
    full_num, part_num = view("full_num"), view("part_num")
    # scores per query row of each block row (the last kv block cut to the sequence), int32: < nk
    row_cols = (full_num + part_num) * bs - (kinds[..., nkb - 1] != EMPTY) * (bs * nkb - nk)
    total = row_cols.sum(-1, dtype=torch.int64) * bs - row_cols[..., -1] * (bs * nqb - nq)  # the last block row cut
    total = total.double().mean()
    # full blocks must lie below the diagonal, partial ones on it at most, and a partial diagonal block's
    # mask below the diagonal
    kb = torch.arange(nkb, device=dev)  # the query blocks visiting a kv block are listed ascending
    first_full, first_part = view("t_full_idx")[..., 0], view("t_part_idx")[..., 0]
    above = ((view("t_full_num") > 0) & (first_full <= kb)) | ((view("t_part_num") > 0) & (first_part < kb))
    upper = (bits & _strict_upper(bs, dev)).flatten(1).any(1)  # per mask: any key > query
    diag_kinds, diag_mid = kinds.diagonal(dim1=-2, dim2=-1), mask_id.diagonal(dim1=-2, dim2=-1)
    above_diag = (diag_kinds == PARTIAL) & upper[diag_mid.clamp(min=0).long()]
    bad = above.any() | above_diag.any()
    row_len, col_len = full_num + part_num, view("t_full_num") + view("t_part_num")
    lens = [f(x).double() for x in (row_len, col_len) for f in (lambda t: t.sum(dtype=torch.int64), torch.max)]
    total, bad, *lens = torch.stack([total, bad.double(), *lens]).tolist()
    return total / (nq * nk), not bad, _split(view, row_len, col_len, lens)


def check_count(x, what: str, minimum: int = 0) -> int:
    """An integral count (Python or numpy int), as an int; a clear error otherwise."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {x!r}")
    if int(x) < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {int(x)}")
    return int(x)


# ------------------------------------------------------------------------------ mask functions
try:  # FlexAttention evaluates mask_mods under this context so that `tensor[idx]` works inside vmap
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex as _getitem_as_index
except ImportError:  # pragma: no cover - older torch
    _getitem_as_index = contextlib.nullcontext


def _mod_error(mask_mod, err) -> ValueError:
    name = getattr(mask_mod, "__name__", type(mask_mod).__name__)
    return ValueError(
        f"mask_mod {name} failed: {type(err).__name__}: {err}. A mask_mod is called as FlexAttention calls it, "
        "mask_mod(b, h, q_idx, kv_idx) -> bool, each index a 0-d integer tensor under torch.vmap: use tensor "
        "operations (&, |, ~, torch.where, indexing a captured tensor), not Python `if`, `and` or `.item()`")


def _run_mod(mask_mod, fn, dims, args) -> torch.Tensor:
    """fn(*args) vmapped over ``dims`` (innermost first), each 0-d to the mask_mod; a bool tensor."""
    for d in dims:
        fn = torch.vmap(fn, in_dims=d, out_dims=0)
    try:
        with _getitem_as_index():
            out = fn(*args)
    except Exception as err:
        raise _mod_error(mask_mod, err) from err
    if out.dtype != torch.bool:
        raise TypeError(f"mask_mod {getattr(mask_mod, '__name__', '')} returned {out.dtype}; it must return a "
                        "bool tensor (True = may attend)")
    return out


def _broadcasts(mask_mod) -> bool:
    """fxsparse's own mask_mods (patterns, runtime masks) take broadcasting index tensors directly:
    they skip torch.vmap, whose per-call cost dominates small tiles."""
    return getattr(mask_mod, "broadcasts", False)


def eval_grid(mask_mod, b, h, q, kv) -> torch.Tensor:
    """mask_mod on the grid b x h x q x kv (1-D index tensors): bool [len(b), len(h), len(q), len(kv)]."""
    if _broadcasts(mask_mod):
        out = mask_mod(b[:, None, None, None], h[None, :, None, None], q[None, None, :, None], kv[None, None, None, :])
        return out.expand(len(b), len(h), len(q), len(kv))
    dims = [(None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)]
    return _run_mod(mask_mod, mask_mod, dims, (b, h, q, kv))


def _eval_tiles(mask_mod, b, h, q0, k0, bs: int, nq: int, nk: int) -> torch.Tensor:
    """mask_mod on P blocks of bs x bs starting at (q0[p], k0[p]) for batch b[p], head h[p]: bool [P, bs, bs];
    positions past the sequence are False (and the mask_mod sees the last position there instead)."""
    r = torch.arange(bs, device=q0.device)
    ragged = nq % bs or nk % bs  # else every block lies inside both sequences
    if _broadcasts(mask_mod):
        rows, cols = q0[:, None, None] + r[None, :, None], k0[:, None, None] + r[None, None, :]
        if ragged:
            rows, cols = rows.clamp(max=nq - 1), cols.clamp(max=nk - 1)
        out = mask_mod(b[:, None, None], h[:, None, None], rows, cols).expand(len(q0), bs, bs)
    else:
        def one(b, h, q0, k0, i, j):
            return mask_mod(b, h, torch.clamp(q0 + i, max=nq - 1), torch.clamp(k0 + j, max=nk - 1))

        dims = [(None, None, None, None, None, 0), (None, None, None, None, 0, None), (0, 0, 0, 0, None, None)]
        out = _run_mod(mask_mod, one, dims, (b, h, q0, k0, r, r))
    if not ragged:
        return out.contiguous()
    inside = ((q0[:, None] + r) < nq)[:, :, None] & ((k0[:, None] + r) < nk)[:, None, :]
    return out & inside


def build_tables(mask_mod, nq: int, nk: int, bl: int, hl: int, bs: int, device, classify=None) -> "Layout":
    """The exact Layout of ``mask_mod`` on [bl, hl, nq, nk], in bs-blocks.

    ``classify(qb0, qb1)``, when given, says per block of query blocks [qb0, qb1) x all kv blocks
    (int8 [bl|1, hl|1, qb1 - qb0, NKB]) which blocks are surely EMPTY or FULL; PARTIAL means "evaluate":
    only those blocks are evaluated, element by element. Without it every block is evaluated, a
    bounded tile at a time. Either way evaluated blocks that turn out all True or all False become
    FULL or EMPTY, so the result equals ``from_mask`` of the materialized mask.

    ``mask_mod.tile_keys(b, h, qb, kb, bs, nq, nk)``, when the mask_mod has it, gives each block to
    evaluate a key (int64 [C, K]) such that blocks with equal keys hold equal masks: one block per key
    is evaluated (a sliding window evaluates one block per block diagonal, packed documents one per
    document boundary). Memory with classify: the tables, the distinct partial blocks' packed masks,
    and O(_CHUNK) scratch (the block kinds go straight into the tables).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    if classify is None:
        return _evaluate_all(mask_mod, nq, nk, bl, hl, bs, device)
    step = max(1, _CHUNK // max(1, bl * hl * nkb))
    chunks = [(qb0, min(nqb, qb0 + step)) for qb0 in range(0, nqb, step)]
    # the kinds are kept between the two passes up to _KEEP blocks, classified again past that
    kept = [] if bl * hl * nqb * nkb <= _KEEP else None
    todo = []  # (b, h, qb, kb) of the blocks to evaluate
    for qb0, qb1 in chunks:
        k = classify(qb0, qb1)
        if kept is not None:
            kept.append(k)
        at = (k == PARTIAL).expand(bl, hl, qb1 - qb0, nkb).nonzero()
        if qb0:
            at[:, 2] += qb0
        todo.append(at)
    todo = torch.cat(todo) if len(todo) > 1 else todo[0]
    kind_of, mid_of, bits = _evaluate_blocks(mask_mod, todo, bs, nq, nk)

    def fill(kinds, mask_id):
        for i, (qb0, qb1) in enumerate(chunks):
            kinds[:, :, qb0:qb1] = kept[i] if kept is not None else classify(qb0, qb1)
        mask_id.fill_(-1)
        if todo.numel():
            at = tuple(todo.t())
            kinds[at] = kind_of
            mask_id[at] = mid_of

    return _assemble((bl, hl, nqb, nkb), bits, bs, (nq, nk), device, fill)


_KEEP = 1 << 24  # blocks (int8 kinds, 16 MiB) build_tables keeps between its two passes


def _evaluate_blocks(mask_mod, todo, bs: int, nq: int, nk: int):
    """Evaluate the blocks at ``todo`` (int64 [C, 4]: b, h, qb, kb): their kinds and mask ids (int32 [C])
    and the distinct partial masks, packed and in ``unique_rows`` order (as ``Layout.from_mask``)."""
    device = todo.device
    b, h, qb, kb = todo.unbind(1)
    keys = None
    if todo.shape[0] and callable(getattr(mask_mod, "tile_keys", None)):
        keys = mask_mod.tile_keys(b, h, qb, kb, bs, nq, nk)
    if keys is not None:  # one block per key stands for all blocks of that key
        uniq, inverse = unique_rows(keys)
        rep = torch.empty(uniq.shape[0], dtype=torch.int64, device=device)  # any block of each key
        rep.scatter_(0, inverse, torch.arange(todo.shape[0], device=device))
        b, h, qb, kb = todo[rep].unbind(1)
    per = max(1, _CHUNK // (bs * bs))
    kinds, packed = [], []
    for p0 in range(0, b.numel(), per):
        tiles = _eval_tiles(mask_mod, b[p0: p0 + per], h[p0: p0 + per], qb[p0: p0 + per] * bs,
                            kb[p0: p0 + per] * bs, bs, nq, nk)
        flat = tiles.flatten(1)
        full = flat.all(1)
        kinds.append(torch.where(full, FULL, torch.where(flat.any(1), PARTIAL, EMPTY)).to(torch.int32))
        packed.append(_pack_bits(tiles))
    if kinds:
        kinds = torch.cat(kinds) if len(kinds) > 1 else kinds[0]
        packed = torch.cat(packed) if len(packed) > 1 else packed[0]
    else:
        kinds = torch.zeros(0, dtype=torch.int32, device=device)
        packed = torch.zeros(0, bs, bs // 32, dtype=torch.int32, device=device)
    part = kinds == PARTIAL
    mids = torch.full(kinds.shape, -1, dtype=torch.int32, device=device)
    partial = packed[part]
    if partial.shape[0]:
        uniq, ids = unique_rows(partial.flatten(1))
        mids[part] = ids.to(torch.int32)
        bits = uniq.reshape(-1, bs, bs // 32).contiguous()
    else:
        bits = torch.zeros(1, bs, bs // 32, dtype=torch.int32, device=device)
    if keys is not None:
        kinds, mids = kinds[inverse], mids[inverse]
    return kinds, mids, bits


def diagonal_keys(b, h, qb, kb, bs: int, nq: int, nk: int):
    """tile_keys of a mask that depends on q_idx - kv_idx alone (and not on b or h): blocks inside both
    sequences on one block diagonal share a key; a block on a ragged edge is keyed by itself."""
    inner = ((qb + 1) * bs <= nq) & ((kb + 1) * bs <= nk)
    return torch.stack([torch.where(inner, 0, 1 + qb), torch.where(inner, qb - kb, kb)], 1)


def _evaluate_all(mask_mod, nq: int, nk: int, bl: int, hl: int, bs: int, device) -> "Layout":
    """build_tables without block kinds: every block evaluated, a bounded tile at a time."""
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    kinds = torch.empty(bl, hl, nqb, nkb, dtype=torch.int8, device=device)
    packed, where = [], []  # packed masks of partial blocks, and their flat block positions
    b, h = torch.arange(bl, device=device), torch.arange(hl, device=device)
    kv_step = max(1, min(nkb, _CHUNK // (bl * hl * bs * bs)))
    q_step = max(1, _CHUNK // (bl * hl * bs * bs * kv_step))
    for qb0 in range(0, nqb, q_step):
        qb1 = min(nqb, qb0 + q_step)
        rows = torch.arange(qb0 * bs, qb1 * bs, device=device)
        for kb0 in range(0, nkb, kv_step):
            kb1 = min(nkb, kb0 + kv_step)
            cols = torch.arange(kb0 * bs, kb1 * bs, device=device)
            m = eval_grid(mask_mod, b, h, rows.clamp(max=nq - 1), cols.clamp(max=nk - 1))
            m = m & (rows < nq)[:, None] & (cols < nk)[None, :]
            tiles = m.reshape(bl, hl, qb1 - qb0, bs, kb1 - kb0, bs).transpose(3, 4)
            bh = torch.arange(bl * hl, device=device)[:, None, None] * nqb
            qbs = torch.arange(qb0, qb1, device=device)[None, :, None]
            blocks = (bh + qbs) * nkb + torch.arange(kb0, kb1, device=device)[None, None, :]
            _sort_tiles(tiles.reshape(-1, bs, bs), blocks.reshape(-1), kinds.view(-1), packed, where)
    if packed:
        allp = torch.cat(packed)
        uniq, inverse = unique_rows(allp.reshape(allp.shape[0], -1))
        mask_id = (torch.cat(where), inverse)
        bits = uniq.reshape(-1, bs, bs // 32).contiguous()
    else:
        mask_id = (torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int32, device=device))
        bits = torch.zeros(1, bs, bs // 32, dtype=torch.int32, device=device)
    del packed, where
    return Layout._from_kinds(kinds, mask_id, bits, bs, (nq, nk))


def _sort_tiles(tiles, flat, kinds_flat, packed: list, where: list) -> None:
    """Evaluated blocks (bool [P, bs, bs] at flat positions ``flat``) into FULL / EMPTY / PARTIAL;
    the partial ones' packed masks and positions are appended to ``packed`` and ``where``."""
    flat_tiles = tiles.flatten(1)
    full = flat_tiles.all(1)
    part = flat_tiles.any(1) & ~full
    kinds_flat[flat] = torch.where(full, FULL, torch.where(part, PARTIAL, EMPTY)).to(torch.int8)
    if bool(part.any()):
        packed.append(_pack_bits(tiles[part]))
        where.append(flat[part])


def _causal_classify(nq: int, nk: int, bs: int, device, offset: int = 0):
    """classify for key j <= query i + offset (offset 0: top-left as SDPA's is_causal)."""
    nkb = math.ceil(nk / bs)
    c = torch.arange(nkb, device=device)

    def classify(qb0, qb1):
        a = torch.arange(qb0, qb1, device=device)[:, None]
        first_q, last_q = a * bs + offset, torch.clamp((a + 1) * bs, max=nq) - 1 + offset
        first_k, last_k = c * bs, torch.clamp((c + 1) * bs, max=nk) - 1
        full = (last_k <= first_q) & ((a + 1) * bs <= nq) & ((c + 1) * bs <= nk)
        empty = first_k > last_q
        return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)[None, None]
    return classify


def _causal_mod(offset: int = 0):
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset
    causal.broadcasts = True
    causal.tile_keys = diagonal_keys
    return causal


class _TableMaskMod:
    """A mask_mod that reads a Layout's tables: the exact mask, for FlexAttention."""

    def __init__(self, layout: "Layout"):
        self.kinds, self.mask_id, self.bits = layout.kinds, layout.mask_id, layout.bits
        self.bs, self.batch, self.heads = layout.block_size, layout.batch, layout.num_heads
        self.__name__ = "layout_mask"

    def __call__(self, b, h, q_idx, kv_idx):
        b = b if self.batch > 1 else b * 0
        h = h if self.heads > 1 else h * 0
        kind = self.kinds[b, h, q_idx // self.bs, kv_idx // self.bs]
        mid = self.mask_id[b, h, q_idx // self.bs, kv_idx // self.bs].clamp(min=0)
        word = self.bits[mid, q_idx % self.bs, (kv_idx % self.bs) // 32]
        bit = (word >> (kv_idx % 32)) & 1
        return (kind == FULL) | ((kind == PARTIAL) & (bit == 1))


def _codes(layout: "Layout", bl: int, hl: int) -> torch.Tensor:
    """Per block: its partial mask id, -1 for full, -2 for empty (int64 [bl, hl, NQB, NKB])."""
    k = layout.kinds.expand(bl, hl, -1, -1)
    mid = layout.mask_id.expand(bl, hl, -1, -1).long()
    return torch.where(k == PARTIAL, mid, torch.where(k == FULL, -1, -2))


def _words(bits: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Packed masks of blocks by code (see _codes): [U, bs, bs // 32]."""
    w = bits[code.clamp(min=0)]
    return torch.where((code >= 0)[:, None, None], w, torch.where((code == -1)[:, None, None], -1, 0).to(w.dtype))


def _combine(a: "Layout", b: "Layout", both: bool) -> "Layout":
    if not isinstance(b, Layout):
        return NotImplemented
    op = "&" if both else "|"
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"layout {op} layout: shapes (q_len, kv_len) differ, {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"layout {op} layout: devices differ, {a.device} and {b.device}; move one with .to()")
    for what, x, y in (("batch", a.batch, b.batch), ("heads", a.num_heads, b.num_heads)):
        if x != y and 1 not in (x, y):
            raise ValueError(f"layout {op} layout: {what} {x} and {y} do not broadcast (each must be equal or 1)")
    bs = min(a.block_size, b.block_size)
    a, b = a.refine(bs), b.refine(bs)
    bl, hl = max(a.batch, b.batch), max(a.num_heads, b.num_heads)
    ca, cb = _codes(a, bl, hl), _codes(b, bl, hl)
    if both:
        full, empty = (ca == -1) & (cb == -1), (ca == -2) | (cb == -2)
    else:
        full, empty = (ca == -1) | (cb == -1), (ca == -2) & (cb == -2)
    kinds = torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)
    mask_id = torch.full(kinds.shape, -1, dtype=torch.int32, device=kinds.device)
    cand = kinds == PARTIAL
    bits = torch.zeros(1, bs, bs // 32, dtype=torch.int32, device=kinds.device)
    if bool(cand.any()):
        width = b.bits.shape[0] + 2
        pairs, inverse = torch.unique((ca[cand] + 2) * width + (cb[cand] + 2), return_inverse=True)
        wa, wb = _words(a.bits, pairs // width - 2), _words(b.bits, pairs % width - 2)
        words = wa & wb if both else wa | wb
        is_full, is_empty = (words == -1).flatten(1).all(1), (words == 0).flatten(1).all(1)
        pair_kind = torch.where(is_full, FULL, torch.where(is_empty, EMPTY, PARTIAL)).to(torch.int8)
        pair_mid = torch.full(pair_kind.shape, -1, dtype=torch.int32, device=kinds.device)
        part = pair_kind == PARTIAL
        if bool(part.any()):
            uniq, ids = unique_rows(words[part].flatten(1))
            pair_mid[part] = ids.to(torch.int32)
            bits = uniq.reshape(-1, bs, bs // 32).contiguous()
        kinds[cand] = pair_kind[inverse]
        mask_id[cand] = pair_mid[inverse]
    return Layout._from_kinds(kinds, mask_id, bits, bs, a.shape)


# ------------------------------------------------------------------------------ one layout per mask and shape
LAYOUT_CACHE_SIZE = 32  # layouts kept by `cached_layout` (least recently used dropped first)
_LAYOUTS: "collections.OrderedDict" = collections.OrderedDict()


def cached_layout(key, build) -> "Layout":
    """The layout cached under ``key`` (hashable: pattern, lengths, heads, batch, block size, device),
    built with ``build()`` on a miss. At most LAYOUT_CACHE_SIZE layouts are kept; clear them with
    ``fxsparse.clear_caches()``."""
    hit = _LAYOUTS.get(key)
    if hit is not None:
        _LAYOUTS.move_to_end(key)
        return hit
    layout = build()
    _LAYOUTS[key] = layout
    while len(_LAYOUTS) > LAYOUT_CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return layout


def clear_layout_cache() -> None:
    """Forget the layouts patterns built (``fxsparse.clear_caches()`` clears the op's too)."""
    _LAYOUTS.clear()


def resolve_mask(result, *, q_len: int, kv_len: int, num_heads: int, batch: int = 1, device=None,
                 block_size: int | None = None, where: str = "mask_fn") -> "Layout | None":
    """Any accepted mask (a mask_fn's result, or ``sparse_attention``'s ``mask``) as a checked Layout.

    ``result``: None (dense: returns None); a ``Layout`` (checked against the lengths, ``num_heads`` and
    ``batch``; refined to ``block_size`` when that is smaller); a bool token mask broadcastable to
    [batch|1, num_heads|1, q_len, kv_len]; a pattern from ``fxsparse.patterns`` (its cached layout); or a
    FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``, evaluated for every head (fxsparse cannot see
    whether it reads ``h``; the layout keeps one head when all heads agree) and batch index 0.
    ``block_size`` None: 128 for new layouts, a Layout's own otherwise. The Layout is on ``device``.
    Errors are ValueError / TypeError starting with ``where``.
    """
    dev = None if device is None else torch.device(device)
    bs = None if block_size is None else check_block_size_any(block_size)
    if result is None:
        return None
    if not isinstance(result, Layout) and callable(getattr(result, "at", None)):  # a pattern (fxsparse.patterns)
        try:
            out = result.at(q_len, kv_len, num_heads=num_heads, device=dev, block_size=bs)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        return None if out is None else resolve_mask(out, q_len=q_len, kv_len=kv_len, num_heads=num_heads,
                                                     batch=batch, device=dev, block_size=bs, where=where)
    if isinstance(result, Layout):
        problems = []
        if tuple(result.shape) != (q_len, kv_len):
            problems.append(f"(q_len, kv_len) = {tuple(result.shape)} instead of {(q_len, kv_len)}")
        if result.num_heads not in (1, num_heads):
            problems.append(f"{result.num_heads} heads where the attention has {num_heads} (1 broadcasts)")
        if result.batch not in (1, batch):
            problems.append(f"batch {result.batch} where the attention has {batch} (1 broadcasts)")
        if problems:
            raise ValueError(f"{where}: the Layout was built for {'; '.join(problems)}")
        if bs is not None and bs < result.block_size:
            result = result.refine(bs)
        return result if dev is None or result.device == dev else result.to(dev)
    if isinstance(result, torch.Tensor):
        if result.dtype != torch.bool:
            raise TypeError(f"{where}: a mask must be bool (True = may attend), got a tensor of {result.dtype}; an "
                            "additive float mask belongs in `bias=`")
        target = (batch, num_heads, q_len, kv_len)
        try:
            ok = 1 <= result.dim() <= 4 and torch.broadcast_shapes(result.shape, target) == target
        except RuntimeError:
            ok = False
        if not ok:
            lead = [f"batch {'1' if batch == 1 else f'{batch} or 1'}", f"heads {'1' if num_heads == 1 else f'{num_heads} or 1'}"]
            raise ValueError(f"{where}: a bool mask of shape {tuple(result.shape)} does not broadcast to "
                             f"[{lead[0]}, {lead[1]}, {q_len}, {kv_len}]")
        m4 = result.reshape((1,) * (4 - result.dim()) + tuple(result.shape))
        m4 = m4.expand(*m4.shape[:2], q_len, kv_len)
        return Layout.from_mask(m4 if dev is None else m4.to(dev), bs)
    if callable(result):
        try:
            out = Layout.from_mask_mod(result, q_len, kv_len, heads=num_heads if num_heads > 1 else None,
                                       block_size=bs or DEFAULT_BLOCK_SIZE, device=dev)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{where}: {err}") from err
        if out.num_heads > 1:
            kinds, mid = out.kinds, out.mask_id
            if bool((kinds == kinds[:, :1]).all()) and bool((mid == mid[:, :1]).all()):
                one = Layout._from_kinds(kinds[:, :1].to(torch.int8), mid[:, :1].contiguous(), out.bits.contiguous(),
                                         out.block_size, out.shape, causal=out.causal)
                one.mask_mod = result
                return one
        return out
    raise TypeError(f"{where}: expected None, a bool tensor, a fxsparse.Layout, a pattern or a mask_mod "
                    f"(b, h, q_idx, kv_idx) -> bool, got {type(result).__name__}")
