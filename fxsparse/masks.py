"""Runtime masks that skip blocks: padding and packed documents as Layouts, built on the device each step.

A model's own masks change with every batch (which tokens are padding, where each packed document
starts). Passed as an additive bias they cost the whole [Nq, Nk] of scores; as a Layout the blocks
they remove are never visited. Each helper here is vectorised (no Python loop over blocks or
documents), evaluates only the blocks the mask cuts, and returns an exact Layout with batch = B:

* :func:`padding_layout`: right padding given by each sample's length;
* :func:`key_padding_layout`: any key padding, a bool [B, Nk] (True = a real token, as in
  HuggingFace's ``attention_mask``; nn.MultiheadAttention's ``key_padding_mask`` is the opposite: pass
  ``~key_padding_mask``);
* :func:`model_mask_layout`: the mask a model passes its attention (bool, or additive with -inf /
  the dtype's minimum for "masked"), [B|1, H|1, Nq|1, Nk]: a key-padding mask ([..., 1, Nk], or
  expanded along the queries) in O(N), a full [Nq, Nk] one by one reshape and reductions;
* :func:`packed_layout`: packed sequences given by their documents' lengths (tokens attend within
  their document, causally by default);
* :func:`document_layout`: packed sequences, a document id per token (tokens attend within their
  document; ``causal=True`` adds causality), with :func:`document_ids` to make ids from lengths.

The tables of key padding, of a model's 4-D mask and of packed lengths are built with nothing read
back to the host (``key_padding_tables``, ``block_tables``, ``interval_tables``): the fold of a
model's own mask into a site's layout (``SiteAttention.skip_padding``) uses them at every forward, and
``packed_layout``'s whole build can be captured in a CUDA graph and replayed each step.

Compose with a pattern's layout by intersection, ``pattern.layout(n, n) & padding_layout(...)``
(batch broadcasts), and pass the result as ``sparse_attention``'s ``mask``. Where a layout holds
causality (``document_layout(causal=True)``, ``layout.fold_causal()``) leave the op's ``causal`` flag
off or on: it is skipped either way (``Layout.causal``).

A query row that can see no key (a padding query whose keys are all padding) gives 0, where an
additive mask of finfo.min would give the mean of the values: such rows are padding and their
outputs are usually discarded, but they are not bit-equal.
"""
from __future__ import annotations

import math
import os

import torch

from . import layout as layout_module
from .layout import (
    DEFAULT_BLOCK_SIZE,
    EMPTY,
    FULL,
    PARTIAL,
    Layout,
    build_tables,
    check_block_size_any,
    check_count,
    layout_from_kinds,
    pack_bits,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # packed_layout's Triton build runs there on any device

__all__ = ["padding_layout", "key_padding_layout", "document_layout", "document_ids", "packed_layout", "model_mask_layout"]


def _lengths(lengths, what: str) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-D integer tensor (one length per sample), got "
                         f"{lengths.dtype} of shape {tuple(lengths.shape)}")
    return lengths


def padding_layout(lengths, q_len: int, kv_len: int | None = None, *, block_size: int = DEFAULT_BLOCK_SIZE,
                   causal: bool = False, device=None) -> Layout:
    """Right padding: sample ``b`` has ``lengths[b]`` real keys, the rest are padding.

    Every query attends to keys ``j < lengths[b]`` (with ``causal=True`` also ``j <= i``, top-left);
    the padding queries too (their rows are as in the model: only padding keys are removed).
    Returns a Layout with batch ``len(lengths)``, built on ``device`` (default: the lengths' device).
    """
    lengths = _lengths(lengths, "padding_layout: lengths")
    kv_len = q_len if kv_len is None else kv_len
    device = lengths.device if device is None else torch.device(device)
    keep = torch.arange(check_count(kv_len, "kv_len", 1), device=device)[None, :] < lengths.to(device)[:, None]
    return key_padding_layout(keep, q_len, block_size=block_size, causal=causal)


def key_padding_layout(keep: torch.Tensor, q_len: int, *, block_size: int = DEFAULT_BLOCK_SIZE,
                       causal: bool = False) -> Layout:
    """Key padding: ``keep`` bool [B, kv_len], True = a real key that may be attended.

    Every query of sample ``b`` attends to the keys with ``keep[b]`` (with ``causal=True`` also
    ``j <= i``, top-left). Built on keep's device in a fixed number of vectorised steps whatever the
    mask (no Python loop, no block evaluated one by one): the mask of a block is that of its kv block's
    keys (cut by the triangle on the diagonal, by the sequence's end on the last query block), so
    there are at most four per (sample, kv block), built at once. Returns a Layout with batch B.
    """
    _check_keep(keep, "key_padding_layout: keep")
    bs, nq = check_block_size_any(block_size), check_count(q_len, "q_len", 1)
    kinds, mask_id, bits = key_padding_tables(keep, nq, bs, bool(causal))
    return layout_from_kinds(kinds, mask_id, bits, bs, (nq, keep.shape[1]), causal=True if causal else None)


def _check_keep(keep, what: str) -> None:
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 2 or keep.shape[1] == 0:
        got = f"{keep.dtype} of shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"{what} must be a bool [batch, kv_len] tensor (True = real key), got {got}")


_VARIANTS: dict = {}  # (bs, rows in the last query block, causal, nqb, nkb, device) -> row masks and block variants


def _variants(bs: int, rows_left: int, causal: bool, nqb: int, nkb: int, device):
    """What key padding tables share, whatever the keys: the packed row masks of the four block
    variants, int32 [4, bs, bs // 32] (index 2 * last-query-block + diagonal: all rows, or the rows
    before the sequence's end; all keys, or the causal triangle), the variant of each block (int64
    [NQB, NKB]) and the blocks above the diagonal when causal (bool [NQB, NKB])."""
    key = (bs, rows_left, causal, nqb, nkb, str(device))
    hit = _VARIANTS.get(key)
    if hit is None:
        r = torch.arange(bs, device=device)
        rows = torch.stack([r >= 0, r < rows_left])[:, None, :, None]  # [2 (last query block), 1, bs, 1]
        tri = torch.stack([torch.ones(bs, bs, dtype=torch.bool, device=device), r[None, :] <= r[:, None]])[None]
        words = pack_bits((rows & tri).reshape(4, bs, bs))
        qb, kb = torch.arange(nqb, device=device)[:, None], torch.arange(nkb, device=device)[None, :]
        last = (qb == nqb - 1) & (rows_left < bs)
        variant = 2 * last.long() + ((qb == kb) & causal).long()
        hit = _VARIANTS[key] = (words, variant.expand(nqb, nkb), (kb > qb) & causal)
        while len(_VARIANTS) > 16:
            _VARIANTS.pop(next(iter(_VARIANTS)))
    return hit


KERNEL_PADDING_BYTES = 32 << 20  # key padding's tables by the Triton pass when every block's mask fits in this


def key_padding_tables(keep: torch.Tensor, nq: int, bs: int, causal: bool = False):
    """(kinds [B, 1, NQB, NKB], mask ids, packed masks) of key padding; nothing is read back to the host.
    Per sample and kv block, its keys' packed mask in at most four variants (edge rows, causal cuts). On a
    GPU, where every block's own mask takes at most ``KERNEL_PADDING_BYTES`` (twice, with the transposed
    copy), not causal: ``block_tables`` of the padding expanded along the queries, one Triton pass, where
    these torch steps are ~20 host-bound launches."""
    b, nk = keep.shape
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    if (not causal and layout_module.build_kernels(keep.device)
            and 2 * b * nqb * nkb * bs * bs // 8 <= KERNEL_PADDING_BYTES):
        return block_tables(keep[:, None, None, :].expand(b, 1, nq, nk), bs)
    words, variant, above = _variants(bs, nq - (nqb - 1) * bs, causal, nqb, nkb, keep.device)
    padded = keep
    if nkb * bs != nk:
        padded = torch.zeros(b, nkb * bs, dtype=torch.bool, device=keep.device)
        padded[:, :nk] = keep
    cols = pack_bits(padded.reshape(b * nkb, 1, bs)).view(b, nkb, 1, 1, bs // 32)  # a kv block's keys, as words
    bits = (cols & words).view(b, nkb, 4, bs * bs // 32)  # every variant of every (sample, kv block)
    vkind = torch.where((bits == -1).all(-1), FULL, torch.where((bits == 0).all(-1), EMPTY, PARTIAL))  # [B, NKB, 4]
    kb = torch.arange(nkb, device=keep.device)
    kinds = torch.where(above, EMPTY, vkind[:, kb[None, :], variant])  # [B, NQB, NKB]
    sample = torch.arange(b, device=keep.device)[:, None, None]
    mask_id = torch.where(kinds == PARTIAL, (sample * nkb + kb) * 4 + variant, -1)
    return (kinds[:, None].to(torch.int8), mask_id[:, None].to(torch.int32),
            bits.view(b * nkb * 4, bs, bs // 32))


def document_ids(lengths, total: int | None = None) -> torch.Tensor:
    """Document ids for packed sequences: ``lengths`` [D] (or [B, D], zero-padded) of documents in order,
    as int [total] (or [B, total]): document d's tokens get id d. Positions past the documents (when
    ``total`` is longer) get id -1: padding, which ``document_layout`` gives no keys."""
    lengths = torch.as_tensor(lengths)
    if lengths.dim() not in (1, 2) or lengths.is_floating_point():
        raise ValueError(f"document_ids: lengths must be an integer [documents] or [batch, documents] tensor, "
                         f"got {lengths.dtype} of shape {tuple(lengths.shape)}")
    two_d = lengths.dim() == 2
    lengths = lengths if two_d else lengths[None]
    if bool((lengths < 0).any()):
        raise ValueError("document_ids: lengths must be >= 0")
    ends = lengths.cumsum(-1)  # [B, D]
    n = int(ends[:, -1].max()) if total is None else check_count(total, "document_ids: total", 1)
    if total is not None and int(ends[:, -1].max()) > n:
        raise ValueError(f"document_ids: the documents hold {int(ends[:, -1].max())} tokens, more than total={n}")
    pos = torch.arange(n, device=lengths.device)
    ids = torch.searchsorted(ends, pos.expand(ends.shape[0], n).contiguous(), right=True)
    ids = torch.where(pos[None, :] < ends[:, -1:], ids, -1)
    return ids if two_d else ids[0]


def document_layout(doc_ids: torch.Tensor, *, causal: bool = False, block_size: int = DEFAULT_BLOCK_SIZE,
                    q_doc_ids: torch.Tensor | None = None) -> Layout:
    """Packed documents: query ``i`` attends to key ``j`` when both carry the same document id (ids < 0
    are padding: they attend to nothing and nothing attends to them); with ``causal=True`` also
    ``j <= i`` (top-left, as the op's causal flag, which this layout then makes free).

    ``doc_ids``: int [N] or [B, N] (per sample), the keys' ids, and the queries' too unless
    ``q_doc_ids`` (int [Nq] or [B, Nq]) is given. Ids need not be sorted; sorted ids (packing) are the
    fast case: a block pair whose id ranges do not overlap is empty, one of a single shared id is full,
    and only the blocks on document boundaries (and the diagonal, when causal) are evaluated. Built on
    doc_ids' device. Returns a Layout with batch B (1 for 1-D ids).
    """
    kv = _doc_tensor(doc_ids, "doc_ids")
    q = kv if q_doc_ids is None else _doc_tensor(q_doc_ids, "q_doc_ids").to(kv.device)
    if q.shape[0] != kv.shape[0] and 1 not in (q.shape[0], kv.shape[0]):
        raise ValueError(f"document_layout: doc_ids has batch {kv.shape[0]} and q_doc_ids {q.shape[0]}")
    bs = check_block_size_any(block_size)
    b = max(q.shape[0], kv.shape[0])
    q, kv = q.expand(b, -1), kv.expand(b, -1)
    nq, nk = q.shape[1], kv.shape[1]
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    k_lo, k_hi, k_pad = _block_ranges(kv, bs)
    q_lo, q_hi, q_pad = (k_lo, k_hi, k_pad) if q_doc_ids is None else _block_ranges(q, bs)
    kl, kh, kp = k_lo[:, None, :], k_hi[:, None, :], k_pad[:, None, :]
    k_first = torch.arange(nkb, device=kv.device) * bs  # causal: a pair is full when the kv block's last
    k_last = k_first + (bs - 1)  # key is at most the query block's first query, empty when its first is past the last

    def classify(qb0, qb1):
        ql, qh, qp = q_lo[:, qb0:qb1, None], q_hi[:, qb0:qb1, None], q_pad[:, qb0:qb1, None]
        empty = (qh < kl) | (kh < ql) | (qh < 0) | (kh < 0)  # id ranges apart, or all padding
        full = (ql == qh) & (kl == kh) & (ql == kl) & ~qp & ~kp  # one document, no padding: whole blocks
        if causal:
            first_q = torch.arange(qb0, qb1, device=kv.device)[:, None] * bs
            full = full & (k_last <= first_q)
            empty = empty | (k_first > (first_q + (bs - 1)).clamp(max=nq - 1))
        return torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.int8)[:, None]

    def mask_mod(bi, h, q_idx, kv_idx):
        qd = q[bi, q_idx]
        same = (qd == kv[bi, kv_idx]) & (qd >= 0)
        return same & (kv_idx <= q_idx) if causal else same

    # A block whose ids are all one document d: every row of a block pair with such a query block is
    # (key id == d), so the pair's mask depends on (d, the kv block) alone; the same for kv blocks, and
    # for two such blocks on (d, d'). The causal part depends on qb - kb, where it cuts the block.
    q_one = torch.where((q_lo == q_hi) & ~q_pad, q_lo, -1)
    k_one = torch.where((k_lo == k_hi) & ~k_pad, k_lo, -1)

    def tile_keys(bi, h, qb, kb, bs_, nq_, nk_):
        qd, kd = q_one[bi, qb], k_one[bi, kb]
        left = torch.where(qd >= 0, qd, -1 - (bi * nqb + qb))  # ids >= 0, a block of its own < 0
        right = torch.where(kd >= 0, kd, -1 - (bi * nkb + kb))
        cut = causal & ((kb + 1) * bs - 1 > qb * bs)  # the causal mask is not all True on this pair
        return torch.stack([left, right, torch.where(cut, qb - kb, nqb + nkb)], 1)

    mask_mod.broadcasts = True
    mask_mod.tile_keys = tile_keys
    return build_tables(mask_mod, nq, nk, b, 1, bs, kv.device, classify)


def _doc_tensor(ids, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool or ids.dim() not in (1, 2):
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"document_layout: {what} must be an integer [N] or [batch, N] tensor, got {got}")
    if ids.shape[-1] == 0:
        raise ValueError(f"document_layout: {what} is empty")
    return ids if ids.dim() == 2 else ids[None]


def _block_ranges(ids: torch.Tensor, bs: int):
    """Per block of ``bs`` tokens: the smallest and largest id (padding ids < 0 and positions past the end
    ignored where the block has real ones; -1 where it has none), and whether it holds padding or is cut."""
    b, n = ids.shape
    nb = math.ceil(n / bs)
    padded = torch.full((b, nb * bs), -1, dtype=torch.int64, device=ids.device)
    padded[:, :n] = ids
    blocks = padded.view(b, nb, bs)
    real = blocks >= 0
    big = torch.iinfo(torch.int64).max
    lo = torch.where(real, blocks, big).amin(-1)
    hi = blocks.amax(-1)
    lo = torch.where(real.any(-1), lo, -1)
    return lo, hi, ~real.all(-1)


def packed_layout(lengths, total: int | None = None, *, causal: bool = True,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> Layout:
    """Packed documents given by their lengths, in order (FlashAttention's ``cu_seqlens`` as lengths):
    each token attends to the tokens of its own document (with ``causal=True``, the default, to those
    at or before it). ``lengths``: int [D] or [B, D] (zero-padded rows; each >= 0, checked where that
    reads nothing more back: for CPU lengths, and with the longest sum when ``total`` is not given);
    ``total``: the sequence length (default: the longest sum; give it, with CUDA lengths, to read nothing
    back to the host); tokens past the documents are padding: they attend to nothing and nothing attends
    to them.

    Every query row attends to one interval of keys, so the layout is built from per-row bounds and
    nothing is read back to the host (the partial blocks' masks take a fixed number of slots, by the
    intervals' order): for lengths that change every training step. On a CUDA device (and under
    ``TRITON_INTERPRET=1``) two Triton kernels write the tables (``fxsparse.kernels.tables``: four
    launches in all, cheap enough to build eagerly every step); on the CPU a fixed number of vectorised
    torch steps give the same tables. Either can be captured in a CUDA graph. ``density`` is not
    computed (NaN: it would be read back); ``Layout.causal`` is ``causal``. The mask is ``document_layout(document_ids(lengths, total), causal=causal)``'s, which
    takes any document ids. Returns a Layout with batch B (1 for 1-D lengths).
    """
    lengths = torch.as_tensor(lengths)
    if lengths.dim() not in (1, 2) or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"packed_layout: lengths must be an integer [documents] or [batch, documents] tensor, "
                         f"got {lengths.dtype} of shape {tuple(lengths.shape)}")
    lengths = lengths if lengths.dim() == 2 else lengths[None]
    if lengths.shape[1] == 0:
        raise ValueError("packed_layout: lengths holds no documents; give at least one length per sample "
                         "(a length of 0 is an empty document)")
    bs = check_block_size_any(block_size)
    if total is None or not lengths.is_cuda:  # one read either way: the longest sum and the smallest length
        longest, least = torch.stack([lengths.sum(-1).max().long(), lengths.min().long()]).tolist()
        if least < 0:
            raise ValueError(f"packed_layout: lengths must be >= 0, got {least}; a document's length is its "
                             "number of tokens (0 for an empty one)")
    n = longest if total is None else check_count(total, "packed_layout: total", 1)
    if lengths.is_cuda or _INTERPRET:
        from .kernels.tables import packed_layout_tables

        return packed_layout_tables(lengths, n, bs, bool(causal))
    return _packed_layout_torch(lengths, n, bs, bool(causal))


def _packed_layout_torch(lengths: torch.Tensor, n: int, bs: int, causal: bool) -> Layout:
    """packed_layout's build in torch operations (int lengths [B, D], D >= 1): the path for CPU tensors,
    and the oracle of the Triton build (``fxsparse.kernels.tables``), whose tables it equals bit for bit."""
    ends = lengths.cumsum(-1)
    pos = torch.arange(n, device=lengths.device)
    doc = torch.searchsorted(ends, pos.expand(ends.shape[0], n).contiguous(), right=True)  # [B, n]
    inside = doc < lengths.shape[1]
    doc = doc.clamp(max=lengths.shape[1] - 1)
    end = ends.gather(1, doc)
    lo = torch.where(inside, end - lengths.gather(1, doc), n)  # padding rows: the empty interval [n, n - 1]
    hi = torch.where(inside, pos if causal else end - 1, n - 1)
    return layout_from_kinds(*interval_tables(lo, hi, n, bs), bs, (n, n), density=float("nan"), causal=causal)


def interval_tables(lo: torch.Tensor, hi: torch.Tensor, nk: int, bs: int):
    """(kinds, mask ids, packed masks) of the mask where query row ``i`` of sample ``b`` attends to the
    keys ``lo[b, i] <= j <= hi[b, i]`` (int [B, Nq], both nondecreasing along the rows and within
    [0, Nk]; lo > hi: none), with nothing read back to the host. Block rows r0..r1, columns c0..c1:
    full when the last row's ``lo`` and the first row's ``hi`` enclose the columns; empty when the
    first row reaching c0 starts after c1. A partial block either cuts the rows' ``lo`` (block row qb
    holds at most (lo[r1] - lo[r0]) / bs + 2 of those), or their ``hi`` (likewise), or is cut by a
    sequence's end (one per block row and column): at most 5 per block row plus 3 per block column
    in all, so each partial block gets a slot of a fixed-size array, in order, by a cumulative sum,
    with no count read back."""
    b, nq = lo.shape
    dev = lo.device
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    r0 = torch.arange(nqb, device=dev) * bs
    r1 = torch.clamp(r0 + bs, max=nq) - 1
    c0 = torch.arange(nkb, device=dev) * bs
    c1 = torch.clamp(c0 + bs, max=nk) - 1
    whole = (r0 + bs <= nq)[:, None] & (c0 + bs <= nk)[None, :]
    full = (lo[:, r1][:, :, None] <= c0) & (hi[:, r0][:, :, None] >= c1) & whole  # [B, NQB, NKB]
    first = torch.searchsorted(hi.contiguous(), c0.expand(b, nkb).contiguous())  # first row with hi >= c0, [B, NKB]
    row = torch.maximum(first[:, None, :], r0[None, :, None])  # [B, NQB, NKB]
    reach = (row <= r1[:, None]) & (lo.gather(1, row.clamp(max=nq - 1).flatten(1)).view(row.shape) <= c1)
    kinds = torch.where(full, FULL, torch.where(reach, PARTIAL, EMPTY))
    partial = (kinds == PARTIAL).flatten(1)  # [B, NQB * NKB]
    slots = 5 * nqb + 3 * nkb + 2
    at = partial.long().cumsum(1) - 1
    where = torch.zeros(b, slots + 1, dtype=torch.long, device=dev)  # slot -> block (slot `slots`: unused)
    block = torch.arange(nqb * nkb, device=dev).expand(b, -1)
    where.scatter_(1, torch.where(partial, at.clamp(max=slots), slots), block)
    where = where[:, :slots]
    sample = torch.arange(b, device=dev)[:, None]
    mask_id = torch.where(partial, sample * slots + at, -1).view(b, 1, nqb, nkb)
    # the packed masks of the slots: row i keeps columns lo..hi of its block, 32 to a word
    rows = (where // nkb)[..., None] * bs + torch.arange(bs, device=dev)  # [B, slots, bs]
    cols = (where % nkb)[..., None, None] * bs + torch.arange(0, bs, 32, device=dev)  # [B, slots, 1, words]
    valid = (rows < nq) & (torch.arange(slots, device=dev) < partial.sum(1, keepdim=True))[..., None]  # unused slots: 0
    rows = rows.clamp(max=nq - 1)
    row_lo = torch.where(valid, lo.gather(1, rows.flatten(1)).view(rows.shape), nk)[..., None]
    row_hi = torch.where(valid, hi.gather(1, rows.flatten(1)).view(rows.shape).clamp(max=nk - 1), -1)[..., None]
    first_bit = (row_lo - cols).clamp(0, 32)
    past_bit = (row_hi - cols + 1).clamp(0, 32)
    ones = torch.ones((), dtype=torch.long, device=dev)
    word = ((ones << past_bit) - (ones << first_bit)).clamp(min=0)  # bits first..past-1 (none when past <= first)
    word = torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)  # as a signed 32-bit word
    return kinds[:, None].to(torch.int8), mask_id.to(torch.int32), word.view(b * slots, bs, bs // 32)


def model_mask_layout(mask: torch.Tensor, q_len: int, *, block_size: int = DEFAULT_BLOCK_SIZE) -> Layout:
    """The Layout of the mask a model hands its attention: bool (True = may attend) or additive float
    (an entry at or below half the dtype's minimum, or -inf, is masked; other values stay a bias the
    caller still adds), shaped [B|1, H|1, Nq|1, Nk] or [B|1, Nk] (HuggingFace's 2-D padding mask,
    1 = a real token).

    A mask that does not vary along the queries (key padding: [..., 1, Nk], or a query axis expanded
    with stride 0) goes through :func:`key_padding_layout`, O(B x Nk); any other is cut into blocks by
    one reshape and reductions, each block keeping its own packed mask (no search for distinct ones),
    so nothing but the density and whether it lies in the causal triangle is read back to the host. Skipping a masked block is exact:
    exp(finfo.min) is 0 in every float dtype, except in a row with no allowed key (see the module's note).
    """
    keep = mask_keep(mask, q_len, "model_mask_layout: mask")
    bs = check_block_size_any(block_size)
    if keep.dim() == 2:
        return key_padding_layout(keep, q_len, block_size=bs)
    kinds, mask_id, bits = block_tables(keep.expand(*keep.shape[:2], q_len, keep.shape[3]), bs)
    return layout_from_kinds(kinds, mask_id, bits, bs, (q_len, keep.shape[3]))


def mask_keep(mask: torch.Tensor, q_len: int, what: str) -> torch.Tensor:
    """A model's mask (see :func:`model_mask_layout`) as bool, True = may attend: [B|1, Nk] when it is
    the same for every query (and head), else [B|1, H|1, Nq|1, Nk]. Axes expanded with stride 0 are
    read once, not compared element by element."""
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4) or mask.shape[-1] == 0:
        got = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{what} must be [batch, kv_len] or [batch|1, heads|1, q_len|1, kv_len], got {got}")
    q_len = check_count(q_len, "q_len", 1)
    if mask.dim() == 4:
        if mask.shape[2] not in (1, q_len):
            raise ValueError(f"{what} has {mask.shape[2]} query rows, expected 1 or {q_len}")
        for axis in (1, 2):  # an expanded axis holds one value along it
            if mask.shape[axis] > 1 and mask.stride(axis) == 0:
                mask = mask.narrow(axis, 0, 1)
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_floating_point():
        keep = mask > torch.finfo(mask.dtype).min / 2
    elif mask.dim() == 2:  # HuggingFace's attention_mask: 1 = token, 0 = padding
        keep = mask != 0
    else:
        raise ValueError(f"{what}: a 4-D mask must be bool or additive float, got {mask.dtype}")
    if keep.dim() == 4 and keep.shape[1] == 1 and keep.shape[2] == 1:
        keep = keep[:, 0, 0]
    return keep


def block_tables(keep: torch.Tensor, bs: int):
    """(kinds, mask ids, packed masks) of a bool token mask [Bl, Hl, Nq, Nk] in blocks of ``bs``, with
    nothing read back to the host, every block its own packed mask (P = all blocks; the partial ones
    point to theirs). On a GPU one Triton pass over the mask (``fxsparse.kernels.build``), else
    `_block_tables_torch`."""
    if layout_module.build_kernels(keep.device):
        from .kernels.build import block_tables as build

        return build(keep, bs)
    return _block_tables_torch(keep, bs)


def _block_tables_torch(keep: torch.Tensor, bs: int):
    """block_tables in torch operations: kinds by one reshape and two reductions, the masks packed from
    the same reshape. Memory: a few bytes per mask entry. The CPU path and the Triton build's oracle."""
    bl, hl, nq, nk = keep.shape
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    padded = keep
    if nqb * bs != nq or nkb * bs != nk:  # past the sequences: False, so edge blocks are never full
        padded = torch.zeros(bl, hl, nqb * bs, nkb * bs, dtype=torch.bool, device=keep.device)
        padded[:, :, :nq, :nk] = keep
    tiles = padded.reshape(bl, hl, nqb, bs, nkb, bs).transpose(3, 4).reshape(-1, bs, bs)
    kinds = torch.where(tiles.all(2).all(1), FULL, torch.where(tiles.any(2).any(1), PARTIAL, EMPTY))
    kinds = kinds.view(bl, hl, nqb, nkb).to(torch.int8)
    index = torch.arange(kinds.numel(), device=keep.device, dtype=torch.int32).view(kinds.shape)
    mask_id = torch.where(kinds == PARTIAL, index, -1)
    return kinds, mask_id, pack_bits(tiles)
