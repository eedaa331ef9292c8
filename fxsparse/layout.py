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

import functools
import math
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


def _table_view(data: torch.Tensor, bl: int, hl: int, block_size: int, shape: tuple, name: str) -> torch.Tensor:
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


def _block_lists(sel: torch.Tensor):
    """For a bool [..., R, C] selection: per row the count and the column indices, ascending, padded."""
    num = sel.sum(-1, dtype=torch.int32)
    cols = torch.arange(sel.shape[-1], device=sel.device, dtype=torch.int32)
    # selected columns first, in ascending order: sort by (not selected, column)
    key = (~sel).to(torch.int32) * sel.shape[-1] + cols
    idx = key.sort(dim=-1).values % sel.shape[-1]
    return num.contiguous(), idx.to(torch.int32).contiguous()


def _pack_bits(blocks: torch.Tensor) -> torch.Tensor:
    """bool [P, bs, bs] -> int32 [P, bs, bs // 32]; bit j of word w is column 32 * w + j."""
    p, r, c = blocks.shape
    weights = torch.ones(32, dtype=torch.int64, device=blocks.device) << torch.arange(32, device=blocks.device)
    words = (blocks.reshape(p, r, c // 32, 32).to(torch.int64) * weights).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack_bits(words: torch.Tensor) -> torch.Tensor:
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
    # refinements of this layout already built (block size -> Layout), see `refine`
    refined: dict = field(default_factory=dict, init=False, repr=False)

    def __getattr__(self, name):  # the named tables, as views of `data`
        if name in TABLE_NAMES and "data" in self.__dict__:
            return _table_view(self.data, self.batch, self.num_heads, self.block_size, self.shape, name)
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
        bs = _check_block_size(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
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
            uniq, inverse = torch.unique(packed.reshape(packed.shape[0], -1), dim=0, return_inverse=True)
            bits = uniq.reshape(-1, bs, bs // 32).contiguous()
            mask_id[partial] = inverse.to(torch.int32)
        else:
            bits = torch.zeros(1, bs, bs // 32, dtype=torch.int32, device=m4.device)
        return cls._from_kinds(kinds, mask_id, bits, bs, (nq, nk))

    @classmethod
    def dense(cls, q_len: int, kv_len: int, block_size: int | None = None, device=None) -> "Layout":
        """The all-True layout, built with no data-dependent step (so torch.compile can trace it)."""
        bs = _check_block_size(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
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
        return cls._from_kinds(kinds, mask_id, bits, bs, (q_len, kv_len), density=1.0)

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, block_size: int, shape: tuple | None = None) -> "Layout":
        """Layout from a bool block map [NQB, NKB] (or [H|1, ...], [B|1, H|1, ...]): True blocks are computed whole.

        ``shape`` = (q_len, kv_len) defaults to the block map times ``block_size``; when it is not a
        multiple of the block, the blocks on the edge are cut to the sequence.
        """
        if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.bool:
            raise TypeError("blocks must be a bool tensor [NQB, NKB] (True = compute this block)")
        bs = _check_block_size(block_size)
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
    def _from_kinds(cls, kinds, mask_id, bits, bs, shape, density: float | None = None) -> "Layout":
        full, partial = kinds == FULL, kinds == PARTIAL
        full_num, full_idx = _block_lists(full)
        part_num, part_idx = _block_lists(partial)
        t_full_num, t_full_idx = _block_lists(full.transpose(-1, -2))
        t_part_num, t_part_idx = _block_lists(partial.transpose(-1, -2))
        # the kernels read a partial block's mask id beside its index, not through it: a load whose
        # address waits on another load stalls the pipeline (padding entries point at real blocks)
        part_mid = mask_id.gather(-1, part_idx.long())
        t_part_mid = mask_id.transpose(-1, -2).gather(-1, t_part_idx.long())
        nq, nk = shape
        if density is None:  # scores computed: every visited block, cut to the sequence
            rows = torch.full((kinds.shape[-2],), bs, dtype=torch.float64, device=kinds.device)
            cols = torch.full((kinds.shape[-1],), bs, dtype=torch.float64, device=kinds.device)
            rows[-1] = nq - bs * (kinds.shape[-2] - 1)
            cols[-1] = nk - bs * (kinds.shape[-1] - 1)
            visited = (kinds != EMPTY).to(torch.float64)
            density = float((visited * rows[:, None] * cols[None, :]).sum((-1, -2)).mean()) / (nq * nk)
        tables = dict(kinds=kinds, mask_id=mask_id, full_num=full_num, full_idx=full_idx, part_num=part_num,
                      part_idx=part_idx, part_mid=part_mid, t_full_num=t_full_num, t_full_idx=t_full_idx,
                      t_part_num=t_part_num, t_part_idx=t_part_idx, t_part_mid=t_part_mid, bits=bits,
                      t_bits=_pack_bits(_unpack_bits(bits).transpose(-1, -2)))
        data = torch.cat([tables[n].reshape(-1).to(torch.int32) for n in TABLE_NAMES])  # the order of table_offsets
        return cls(block_size=bs, shape=(int(nq), int(nk)), batch=kinds.shape[0], num_heads=kinds.shape[1],
                   data=data, density=density)

    def refine(self, block_size: int) -> "Layout":
        """The same mask in smaller blocks (``block_size`` divides this layout's block size).

        The parts of a partial block that are all True or all False become full or empty blocks, so a
        kernel whose tiles are smaller than the block skips them: a local window in 128-blocks visits
        three blocks a row, two of them partial; in 64-blocks five, two of them partial (a sixth of
        the work less, and half the element masks). The result is cached on this layout.
        """
        fine = _check_block_size(block_size)
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
            uniq, inverse = torch.unique(sub[sub_part].flatten(1), dim=0, return_inverse=True)
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
                       data=self.data.to(device), density=self.density)
        moved.refined.update({bs: fine.to(device) for bs, fine in self.refined.items()})
        return moved

    def to_mask(self) -> torch.Tensor:
        """The exact token mask this layout encodes, bool [Bl, Hl, q_len, kv_len]."""
        return block_mask(self.data, self.batch, self.num_heads, self.block_size, self.shape, 0, self.num_blocks[0])

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
    kinds, mask_id, bits = (_table_view(data, bl, hl, block_size, shape, n) for n in ("kinds", "mask_id", "bits"))
    nq, nk = shape
    bs = block_size
    k = kinds[:, :, qb_start:qb_end]  # [Bl,Hl,nb,NKB]
    mid = mask_id[:, :, qb_start:qb_end]
    elems = _unpack_bits(bits[mid.clamp(min=0).long()])  # [Bl,Hl,nb,NKB,bs,bs]
    full = (k == FULL)[..., None, None]
    part = (k == PARTIAL)[..., None, None]
    tiles = full | (part & elems)
    bl, hl, nb, nkb = k.shape
    tok = tiles.transpose(3, 4).reshape(bl, hl, nb * bs, nkb * bs)
    return tok[:, :, : min(nb * bs, nq - qb_start * bs), :nk]


def _check_block_size(bs) -> int:
    if not isinstance(bs, int) or bs not in (32, 64, 128, 256):
        raise ValueError(f"block_size must be one of 32, 64, 128, 256, got {bs!r}")
    return bs
