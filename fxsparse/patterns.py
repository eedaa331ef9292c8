"""Mask factories: named, picklable mask functions for ``fxsparse.transform`` and the op.

Each factory returns a small object that is at once

* a ``mask_fn``: called with an ``AttentionSite`` it returns the site's ``Layout`` (or None to keep
  the site dense), built once per distinct pattern and shape and shared by every site that asks
  (``fxsparse.clear_caches()`` forgets them);
* a mask function in FlexAttention's convention: ``pattern.mask_mod(q_len, kv_len)`` is a
  ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (hand it to ``flex_attention.create_block_mask`` or to
  ``Layout.from_mask_mod``);
* a layout builder: ``pattern.layout(q_len, kv_len, block_size=..., device=...)``. Patterns know
  which blocks are full and empty without evaluating them (a sliding window at 128k tokens is built
  in O(blocks)); only the blocks the pattern cuts are evaluated element by element;
* a token mask for short sequences: ``pattern.mask(q_len, kv_len)``, bool ``[q_len, kv_len]``.

Patterns compare equal, hash and pickle by their parameters, and print as the call that made them:

    mask_fn = patterns.only(
        patterns.local_2d(window=2, prefix_tokens=1),   # CLS is global, patches see a 5x5 window
        layers=range(6), block_size=32)                 # the last layers stay dense; 32-token blocks

Every factory and ``only`` / ``union`` / ``intersect`` take ``block_size=`` (32, 64, 128 or 256;
default 128). The ``<name>_mask(q_len, kv_len, ...)`` functions return the token mask directly.

Where the queries sit: with ``q_len < kv_len`` (decoding with a KV cache) the queries are the
*last* ``q_len`` positions of the keys: query ``i`` sits at position ``kv_len - q_len + i``
(bottom-right alignment). The 1-D patterns (``sliding_window``, ``causal``, ``global_tokens``)
compare positions, so a decode step sees exactly the rows of the full mask it stands for; with
``q_len == kv_len`` position and index are the same. ``bigbird`` compares token indices;
``local_2d`` needs ``q_len == kv_len``.

Speed comes from whole blocks of the mask being empty, not from its token density. Patches are
in row-major order, so a 2-D window of radius w spans about ``2 * w + 1`` grid rows of tokens:
at 197 tokens (ViT-B/16, 224 px) a window-1 mask holds 5 % of the scores but touches every
128-token block and 65 % of 32-token blocks: pass ``block_size=32`` for short sequences.
"""
from __future__ import annotations

import fnmatch
import math

import torch

from .layout import (
    DEFAULT_BLOCK_SIZE,
    EMPTY,
    FULL,
    PARTIAL,
    Layout,
    cached_layout,
    check_block_size_any,
    check_count,
    diagonal_keys,
    eval_grid,
    resolve_mask,
)

__all__ = [
    "MaskFn",
    "local_2d", "local_2d_mask",
    "sliding_window", "sliding_window_mask",
    "causal", "causal_mask",
    "global_tokens", "global_tokens_mask",
    "bigbird", "bigbird_mask",
    "dense", "dense_mask",
    "union", "intersect", "only",
]


def _call_name(factory: str, **kwargs) -> str:
    """``local_2d(window=2, prefix_tokens=1)``: the arguments that are not None."""
    return f"{factory}({', '.join(f'{k}={v!r}' for k, v in kwargs.items() if v is not None)})"


def _block_size(bs):
    return None if bs is None else check_block_size_any(bs)


class MaskFn:
    """A mask_fn with a readable name: ``repr(fn) == fn.__name__``, e.g. ``"local_2d(window=2)"``.

    ``MaskFn(fn, name)`` wraps any ``site -> mask`` function under a name; the factories of this
    module return subclasses that also pickle and compare by their parameters.
    """

    block_size = None

    def __init__(self, fn, name: str):
        self._fn = fn
        self._name = name
        self.__doc__ = fn.__doc__

    @property
    def __name__(self) -> str:
        return self._name

    def __call__(self, site):
        return self._fn(site)

    def __repr__(self) -> str:
        return self.__name__

    def at(self, q_len: int, kv_len: int, *, num_heads: int = 1, device=None, block_size=None, site=None):
        """The Layout (or None) this mask_fn gives for these lengths, in ``block_size`` blocks (default:
        this mask_fn's own, else 128), on ``device``. Plain ``MaskFn``s need the ``site``."""
        if site is None:
            raise TypeError(f"{self.__name__} is a plain mask_fn: call it with a site")
        out = self(site)
        bs = block_size or self.block_size
        return resolve_mask(out, q_len=q_len, kv_len=kv_len, num_heads=num_heads, device=device, block_size=bs,
                            where=self.__name__)


class _Named(MaskFn):
    """Base of the factories' results: named, picklable, equal and hashed by (class, parameters)."""

    factory = ""

    def __init__(self, **params):
        self._params = params

    @property
    def __name__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items() if v is not None)
        return f"{self.factory}({args})"

    @property
    def block_size(self):
        return self._params.get("block_size")

    def _key(self):
        return (type(self),) + tuple(_hashable(v) for v in self._params.values())

    def __eq__(self, other):
        return type(other) is type(self) and other._key() == self._key()

    def __hash__(self):
        return hash(self._key())

    def __getstate__(self):
        return {"_params": self._params}

    def __setstate__(self, state):
        self._params = state["_params"]


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, (set, frozenset, range)):
        return frozenset(v)
    return v


class Pattern(_Named):
    """A mask defined at every (q_len, kv_len) by a mask function (and, where it can, block by block).

    Subclasses define ``_context(q_len, kv_len)`` (checks, and what the mask needs: offsets, grids),
    ``_mod(ctx, b, h, q_idx, kv_idx)`` and optionally ``_classify(ctx, q_len, kv_len, bs, device)``.
    """

    # The site roles (AttentionSite.role) whose token positions this pattern speaks of: self-attention
    # over one sequence, within windows, or a site the graph does not tell. Channel, cross,
    # learned-query and pooled sites are kept dense (None): report() says why. None: every role.
    roles = ("self", "window", "?")

    def applies(self, site) -> bool:
        """Whether this pattern speaks of ``site`` (by its role); otherwise it keeps the site dense."""
        return self.roles is None or getattr(site, "role", "?") in self.roles

    def __call__(self, site):
        if not self.applies(site):
            return None
        return self.layout(site.q_len, site.kv_len, device=getattr(site, "device", None))

    def at(self, q_len, kv_len, *, num_heads=1, device=None, block_size=None, site=None):
        if site is not None and not self.applies(site):
            return None
        return self.layout(q_len, kv_len, device=device, block_size=block_size)

    def mask_mod(self, q_len: int, kv_len: int) -> "BoundMaskMod":
        """This pattern at these lengths as FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool``."""
        return BoundMaskMod(self, check_count(q_len, "q_len", 1), check_count(kv_len, "kv_len", 1))

    def layout(self, q_len: int, kv_len: int, *, device=None, block_size=None) -> Layout:
        """This pattern's Layout at these lengths (cached: one per pattern, shape, block size, device)."""
        bs = _block_size(block_size) or self.block_size or DEFAULT_BLOCK_SIZE
        dev = torch.device("cpu") if device is None else torch.device(device)
        q_len, kv_len = check_count(q_len, "q_len", 1), check_count(kv_len, "kv_len", 1)
        key = (self, q_len, kv_len, 1, 1, bs, str(dev))
        return cached_layout(key, lambda: Layout.from_mask_mod(self.mask_mod(q_len, kv_len), q_len, kv_len,
                                                               block_size=bs, device=dev))

    def mask(self, q_len: int, kv_len: int) -> torch.Tensor:
        """The token mask, bool ``[q_len, kv_len]`` (materialized: for short sequences)."""
        mod = self.mask_mod(q_len, kv_len)
        out = torch.empty(q_len, kv_len, dtype=torch.bool)
        zero = torch.zeros(1, dtype=torch.int64)
        step = max(1, (1 << 22) // kv_len)
        for r0 in range(0, q_len, step):
            rows = torch.arange(r0, min(q_len, r0 + step))
            out[r0: r0 + step] = eval_grid(mod, zero, zero, rows, torch.arange(kv_len))[0, 0]
        return out

    def _context(self, q_len, kv_len):
        return kv_len - q_len  # bottom-right alignment: query i sits at position i + offset

    def _classify(self, ctx, q_len, kv_len, bs, device):
        return None

    _diagonal = False  # the mask depends on q_idx - kv_idx alone


class BoundMaskMod:
    """``pattern.mask_mod(q_len, kv_len)``: a FlexAttention mask_mod that also knows its blocks."""

    def __init__(self, pattern: Pattern, q_len: int, kv_len: int):
        self.pattern, self.q_len, self.kv_len = pattern, q_len, kv_len
        self.ctx = pattern._context(q_len, kv_len)

    @property
    def __name__(self):
        return f"{self.pattern.__name__}.mask_mod({self.q_len}, {self.kv_len})"

    def __repr__(self):
        return self.__name__

    def __call__(self, b, h, q_idx, kv_idx):
        return self.pattern._mod(self.ctx, b, h, q_idx, kv_idx)

    broadcasts = True  # patterns' masks take broadcasting index tensors as well as vmap's 0-d ones

    @property
    def tile_keys(self):
        """For a mask that depends on q_idx - kv_idx alone: blocks on one block diagonal hold one mask,
        so layouts evaluate one block a diagonal (see layout.build_tables); else None."""
        return diagonal_keys if self.pattern._diagonal else None

    def block_kinds(self, q_len, kv_len, bs, device):
        """classify(qb0, qb1) for Layout building (see layout.build_tables), or None: evaluate every block."""
        if (q_len, kv_len) != (self.q_len, self.kv_len):
            raise ValueError(f"{self.__name__} was made for (q_len, kv_len) = {(self.q_len, self.kv_len)}, "
                             f"not {(q_len, kv_len)}")
        return self.pattern._classify(self.ctx, q_len, kv_len, bs, device)

    def __eq__(self, other):
        return type(other) is BoundMaskMod and (self.pattern, self.q_len, self.kv_len) == (
            other.pattern, other.q_len, other.kv_len)

    def __hash__(self):
        return hash((self.pattern, self.q_len, self.kv_len))


def _spans(qb0, qb1, q_len, kv_len, bs, device, offset=0):
    """Per query block a (column) and kv block c (row): first/last positions inside the sequences, and
    whether the block is whole (no position past either end). Query positions are shifted by offset."""
    a = torch.arange(qb0, qb1, device=device)[:, None]
    c = torch.arange(math.ceil(kv_len / bs), device=device)[None, :]
    q_first, q_last = a * bs + offset, torch.clamp((a + 1) * bs, max=q_len) - 1 + offset
    k_first, k_last = c * bs, torch.clamp((c + 1) * bs, max=kv_len) - 1
    whole = ((a + 1) * bs <= q_len) & ((c + 1) * bs <= kv_len)
    return q_first, q_last, k_first, k_last, whole


def _kinds(full, empty):
    return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)[None, None]


# ---------------------------------------------------------------------------------------------
# 1-D patterns


class SlidingWindow(Pattern):
    """Query at position ``p`` attends to keys ``j`` with ``|p - j| <= window``; with ``causal=True`` to
    ``p - window <= j <= p`` (itself and the ``window`` keys before it). ``p = i + kv_len - q_len``."""

    factory = "sliding_window"
    _diagonal = True

    def _mod(self, offset, b, h, q_idx, kv_idx):
        d = q_idx + offset - kv_idx
        w = self._params["window"]
        return (d >= 0) & (d <= w) if self._params["causal"] else (d <= w) & (d >= -w)

    def _classify(self, offset, q_len, kv_len, bs, device):
        w, causal = self._params["window"], self._params["causal"]

        def classify(qb0, qb1):
            qf, ql, kf, kl, whole = _spans(qb0, qb1, q_len, kv_len, bs, device, offset)
            dmin, dmax = qf - kl, ql - kf  # the smallest and largest p - j in the block
            lo = 0 if causal else -w
            return _kinds(whole & (dmin >= lo) & (dmax <= w), (dmax < lo) | (dmin > w))
        return classify


def sliding_window(window: int, causal: bool = False, *, block_size: int | None = None) -> SlidingWindow:
    """Pattern: :class:`SlidingWindow` (query at position ``p`` sees keys ``j``, ``|p - j| <= window``;
    with ``causal=True`` ``p - window <= j <= p``). Queries sit at the last positions of the keys."""
    if not isinstance(causal, bool):
        raise ValueError(f"sliding_window: causal must be True or False, got {causal!r}")
    return SlidingWindow(window=check_count(window, "sliding_window: window"), causal=causal or None,
                         block_size=_block_size(block_size))


def sliding_window_mask(q_len: int, kv_len: int, *, window: int, causal: bool = False) -> torch.Tensor:
    """Bool ``[q_len, kv_len]`` token mask of :func:`sliding_window`."""
    return sliding_window(window, causal).mask(q_len, kv_len)


class Causal(Pattern):
    """Query at position ``p = i + kv_len - q_len`` attends to keys ``j <= p`` (with ``q_len == kv_len``:
    SDPA's ``is_causal``; at a decode step the new tokens see the whole cache)."""

    factory = "causal"
    _diagonal = True

    def _mod(self, offset, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    def _classify(self, offset, q_len, kv_len, bs, device):
        def classify(qb0, qb1):
            qf, ql, kf, kl, whole = _spans(qb0, qb1, q_len, kv_len, bs, device, offset)
            return _kinds(whole & (kl <= qf), kf > ql)
        return classify


def causal(*, block_size: int | None = None) -> Causal:
    """Pattern: :class:`Causal`, key ``j`` allowed for the query at position ``p`` when ``j <= p``."""
    return Causal(block_size=_block_size(block_size))


def causal_mask(q_len: int, kv_len: int) -> torch.Tensor:
    """Bool ``[q_len, kv_len]`` token mask of :func:`causal` (bottom-right aligned)."""
    return causal().mask(q_len, kv_len)


class GlobalTokens(Pattern):
    """The first ``n`` positions are global: queries at positions ``p < n`` attend to every key, and
    every query attends to keys ``j < n``. Nothing else; combine it with :func:`union`."""

    factory = "global_tokens"

    def _mod(self, offset, b, h, q_idx, kv_idx):
        n = self._params["n"]
        return (q_idx + offset < n) | (kv_idx < n)

    def _classify(self, offset, q_len, kv_len, bs, device):
        n = self._params["n"]

        def classify(qb0, qb1):
            qf, ql, kf, kl, whole = _spans(qb0, qb1, q_len, kv_len, bs, device, offset)
            return _kinds(whole & ((ql < n) | (kl < n)), (qf >= n) & (kf >= n))
        return classify


def global_tokens(n: int, *, block_size: int | None = None) -> GlobalTokens:
    """Pattern: :class:`GlobalTokens` (the first ``n`` positions attend to and are seen by all)."""
    return GlobalTokens(n=check_count(n, "global_tokens: n"), block_size=_block_size(block_size))


def global_tokens_mask(q_len: int, kv_len: int, *, n: int) -> torch.Tensor:
    """Bool ``[q_len, kv_len]`` token mask of :func:`global_tokens`."""
    return global_tokens(n).mask(q_len, kv_len)


class Dense(Pattern):
    """Every query attends to every key. The site is still rewritten to the sparse op (unlike
    returning None from a mask_fn, which keeps the original attention)."""

    factory = "dense"
    _diagonal = True
    roles = None  # every site: dense speaks of no position

    def _mod(self, offset, b, h, q_idx, kv_idx):
        return kv_idx >= 0

    def _classify(self, offset, q_len, kv_len, bs, device):
        def classify(qb0, qb1):
            *_, whole = _spans(qb0, qb1, q_len, kv_len, bs, device)
            return _kinds(whole, torch.zeros_like(whole))
        return classify


def dense(*, block_size: int | None = None) -> Dense:
    """Pattern: :class:`Dense`, an all-True mask (the site is rewritten, not kept as it was)."""
    return Dense(block_size=_block_size(block_size))


def dense_mask(q_len: int, kv_len: int) -> torch.Tensor:
    """Every query attends to every key: an all-True ``[q_len, kv_len]`` mask."""
    return torch.ones(q_len, kv_len, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# local_2d: windows on a grid of image patches


def _infer_grid(n_tokens: int, prefix_tokens: int | None):
    """(prefix_tokens, (h, w)) for a square grid. Without prefix_tokens: the smallest prefix
    count, fewer than a grid row, that leaves a square (so that 12 text tokens are not read as
    3 prefix tokens and a 3x3 grid)."""
    candidates = [prefix_tokens] if prefix_tokens is not None else range(n_tokens)
    for p in candidates:
        side = math.isqrt(max(n_tokens - p, 0))
        if prefix_tokens is None and p >= side:
            break
        if side > 0 and side * side == n_tokens - p:
            return p, (side, side)
    if prefix_tokens is not None:
        what = f"{n_tokens} tokens minus {prefix_tokens} prefix tokens are not a square grid"
    else:
        what = (f"{n_tokens} tokens are not a square grid of patches after fewer prefix tokens "
                f"than a grid row")
    raise ValueError(f"local_2d: {what}; pass prefix_tokens= or grid=(h, w)")


class Local2d(Pattern):
    """Local windows on image patches (self-attention: ``q_len == kv_len``).

    The tokens are ``prefix_tokens`` leading tokens (CLS, distillation, registers) followed by
    ``h * w`` patches in row-major order (timm, torchvision, HuggingFace ViT). A patch attends
    to the patches within Chebyshev distance ``window`` on the grid (``window=1``: the 3x3
    neighbourhood). Prefix tokens are global: they attend to every token and every token
    attends to them.

    ``grid=None`` takes a square grid: with ``prefix_tokens`` given, of ``q_len - prefix_tokens``
    patches; with neither given, the prefix is the smallest count that leaves a square and is
    smaller than the grid's side (197 → 1 + 14x14, 18 → 2 + 4x4; 12 is an error, not 3 + 3x3).
    Pass ``prefix_tokens`` when you know it. With ``grid`` given, the prefix is ``q_len - h * w``.
    """

    factory = "local_2d"

    def _context(self, q_len, kv_len):
        if q_len != kv_len:
            raise ValueError(f"local_2d needs self-attention (q_len == kv_len), got q_len={q_len}, kv_len={kv_len}; "
                             "select the sites it fits with patterns.only(...)")
        grid, prefix_tokens = self._params["grid"], self._params["prefix_tokens"]
        if grid is None:
            return _infer_grid(q_len, prefix_tokens)
        h, w = grid
        prefix = q_len - h * w
        if prefix < 0 or (prefix_tokens is not None and prefix != prefix_tokens):
            given = "" if prefix_tokens is None else f" and {prefix_tokens} prefix tokens"
            raise ValueError(f"local_2d: a grid of {h}x{w} patches{given} does not make {q_len} tokens")
        return prefix, (h, w)

    def _mod(self, ctx, b, h, q_idx, kv_idx):
        prefix, (_, gw) = ctx
        w = self._params["window"]
        qi, ki = q_idx - prefix, kv_idx - prefix
        near = ((qi // gw - ki // gw).abs() <= w) & ((qi % gw - ki % gw).abs() <= w)
        return (qi < 0) | (ki < 0) | near

    def _classify(self, ctx, q_len, kv_len, bs, device):
        prefix, (_, gw) = ctx
        w = self._params["window"]

        def classify(qb0, qb1):
            qf, ql, kf, kl, whole = _spans(qb0, qb1, q_len, kv_len, bs, device)
            full = whole & ((ql < prefix) | (kl < prefix))
            # grid rows spanned by each block's patches: blocks more than `window` rows apart see nothing
            q_rows = ((qf - prefix).clamp(min=0) // gw, (ql - prefix) // gw)
            k_rows = ((kf - prefix).clamp(min=0) // gw, (kl - prefix) // gw)
            apart = (q_rows[0] - k_rows[1] > w) | (k_rows[0] - q_rows[1] > w)
            return _kinds(full, (qf >= prefix) & (kf >= prefix) & apart)
        return classify


def local_2d(window: int, grid: tuple[int, int] | None = None, prefix_tokens: int | None = None, *,
             block_size: int | None = None) -> Local2d:
    """Pattern: :class:`Local2d`, windows of Chebyshev radius ``window`` on a grid of patches."""
    window = check_count(window, "local_2d: window")
    if grid is not None:
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise ValueError(f"local_2d: grid must be (h, w), got {grid!r}")
        grid = (check_count(grid[0], "local_2d: grid height", 1), check_count(grid[1], "local_2d: grid width", 1))
    if prefix_tokens is not None:
        prefix_tokens = check_count(prefix_tokens, "local_2d: prefix_tokens")
    return Local2d(window=window, grid=grid, prefix_tokens=prefix_tokens, block_size=_block_size(block_size))


def local_2d_mask(q_len: int, kv_len: int | None = None, *, window: int, grid: tuple[int, int] | None = None,
                  prefix_tokens: int | None = None) -> torch.Tensor:
    """Bool ``[q_len, q_len]`` token mask of :func:`local_2d` (see :class:`Local2d`)."""
    return local_2d(window, grid, prefix_tokens).mask(q_len, q_len if kv_len is None else kv_len)


# ---------------------------------------------------------------------------------------------
# bigbird


class BigBird(Pattern):
    """BigBird's block pattern (token indices, not positions).

    Tokens are cut into blocks of ``block`` tokens (the last one may be short). Query block
    ``a`` attends to key blocks ``b`` with ``|a - b| <= num_window // 2`` (``num_window`` is the
    odd count of window blocks, 3 = left, self, right); the first ``num_global`` blocks are
    global (they attend to all, all attend to them); and each query block that is not global
    attends to ``num_random`` further key blocks drawn without replacement from those not
    already chosen (fewer when fewer are left), by a ``torch.Generator`` seeded with ``seed``.
    The same seed gives the same mask, at every site of the same lengths.
    """

    factory = "bigbird"

    def _context(self, q_len, kv_len):
        p = self._params
        block = p["block"]
        qb, kb = -(-q_len // block), -(-kv_len // block)
        a, c = torch.arange(qb)[:, None], torch.arange(kb)[None, :]
        blocks = ((a - c).abs() <= p["num_window"] // 2) | (a < p["num_global"]) | (c < p["num_global"])
        gen = torch.Generator().manual_seed(p["seed"])
        for row in range(p["num_global"], qb):
            free = (~blocks[row]).nonzero().flatten()
            pick = free[torch.randperm(len(free), generator=gen)[: p["num_random"]]]
            blocks[row, pick] = True
        return blocks

    def _mod(self, blocks, b, h, q_idx, kv_idx):
        block = self._params["block"]
        return blocks.to(q_idx.device)[q_idx // block, kv_idx // block]

    def _classify(self, blocks, q_len, kv_len, bs, device):
        block = self._params["block"]
        if block % bs:
            return None  # layout blocks straddle BigBird's blocks: evaluate them
        r = block // bs
        fine = blocks.to(device).repeat_interleave(r, 0).repeat_interleave(r, 1)
        nqb, nkb = math.ceil(q_len / bs), math.ceil(kv_len / bs)
        fine = fine[:nqb, :nkb]

        def classify(qb0, qb1):
            *_, whole = _spans(qb0, qb1, q_len, kv_len, bs, device)
            sel = fine[qb0:qb1]
            return _kinds(sel & whole, ~sel)
        return classify


def bigbird(block: int, num_random: int, num_window: int, num_global: int, seed: int = 0, *,
            block_size: int | None = None) -> BigBird:
    """Pattern: :class:`BigBird` (window, global and seeded random blocks of ``block`` tokens)."""
    block = check_count(block, "bigbird: block", 1)
    num_random, num_global = check_count(num_random, "bigbird: num_random"), check_count(num_global, "bigbird: num_global")
    num_window = check_count(num_window, "bigbird: num_window", 1)
    if num_window % 2 == 0:
        raise ValueError(f"bigbird: num_window is the odd number of window blocks (1, 3, 5, ...), got {num_window}")
    return BigBird(block=block, num_random=num_random, num_window=num_window, num_global=num_global,
                   seed=check_count(seed, "bigbird: seed"), block_size=_block_size(block_size))


def bigbird_mask(q_len: int, kv_len: int, *, block: int, num_random: int, num_window: int,
                 num_global: int, seed: int = 0) -> torch.Tensor:
    """Bool ``[q_len, kv_len]`` token mask of :func:`bigbird` (see :class:`BigBird`)."""
    return bigbird(block, num_random, num_window, num_global, seed).mask(q_len, kv_len)


# ---------------------------------------------------------------------------------------------
# combinators


def _fn_name(f) -> str:
    return f.__name__ if isinstance(f, MaskFn) else getattr(f, "__name__", repr(f))


class _Combine(Pattern):
    """union / intersect. Of patterns only: a pattern itself (mask_mod, blocks known where the
    parts know theirs). With plain mask_fns among the parts: a mask_fn that combines the parts'
    layouts at each site."""

    both = False

    def __init__(self, *fns, block_size=None):
        if not fns:
            raise ValueError(f"{self.factory}: needs at least one mask_fn")
        for f in fns:
            if not callable(f):
                raise TypeError(f"{self.factory}: expected mask_fns, got {type(f).__name__}")
        super().__init__(fns=tuple(fns), block_size=_block_size(block_size))

    @property
    def __name__(self):
        parts = ", ".join(_fn_name(f) for f in self._params["fns"])
        bs = self._params["block_size"]
        return f"{self.factory}({parts}{'' if bs is None else f', block_size={bs}'})"

    @property
    def _diagonal(self) -> bool:
        return self._patterns_only and all(f._diagonal for f in self._params["fns"])

    @property
    def _patterns_only(self) -> bool:
        return all(isinstance(f, Pattern) for f in self._params["fns"])

    def applies(self, site) -> bool:
        return all(f.applies(site) for f in self._params["fns"] if isinstance(f, Pattern))

    def __call__(self, site):
        if self._patterns_only:
            return super().__call__(site)
        return self.at(site.q_len, site.kv_len, num_heads=site.num_heads, site=site,
                       device=getattr(site, "device", None))

    def at(self, q_len, kv_len, *, num_heads=1, device=None, block_size=None, site=None):
        bs = block_size or self.block_size
        if self._patterns_only:
            if site is not None and not self.applies(site):
                return None
            return self.layout(q_len, kv_len, device=device, block_size=bs)
        if site is None:
            raise TypeError(f"{self.__name__} combines plain mask_fns: call it with a site")
        result = None
        for f in self._params["fns"]:
            if isinstance(f, MaskFn):
                out = f.at(q_len, kv_len, num_heads=num_heads, device=device, block_size=bs, site=site)
            else:
                out = resolve_mask(f(site), q_len=q_len, kv_len=kv_len, num_heads=num_heads, device=device,
                                   block_size=bs, where=_fn_name(f))
            if out is None:
                if not self.both:
                    return None  # dense already allows everything
                continue
            if result is not None and out.block_size != result.block_size:  # to the finer of the two
                fine = min(out.block_size, result.block_size)
                out, result = out.refine(fine), result.refine(fine)
            result = out if result is None else (result & out if self.both else result | out)
        return result

    def _context(self, q_len, kv_len):
        if not self._patterns_only:
            plain = [_fn_name(f) for f in self._params["fns"] if not isinstance(f, Pattern)]
            raise TypeError(f"{self.__name__}: {', '.join(plain)} are plain mask_fns, which have no mask_mod")
        return [f.mask_mod(q_len, kv_len) for f in self._params["fns"]]

    def _mod(self, mods, b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = out & m(b, h, q_idx, kv_idx) if self.both else out | m(b, h, q_idx, kv_idx)
        return out

    def _classify(self, mods, q_len, kv_len, bs, device):
        parts = [m.block_kinds(q_len, kv_len, bs, device) for m in mods]
        if any(p is None for p in parts):
            if self.both and any(p is not None for p in parts):
                parts = [p for p in parts if p is not None]  # an empty block of any part is empty
                return lambda qb0, qb1: _demote([p(qb0, qb1) for p in parts], both=True, only_empty=True)
            return None

        return lambda qb0, qb1: _demote([p(qb0, qb1) for p in parts], both=self.both)


def _demote(kinds: list, both: bool, only_empty: bool = False):
    """Combined block kinds: for an intersection a block is FULL when every part's is, EMPTY when any
    part's is; for a union the other way round; PARTIAL otherwise (evaluated)."""
    full = [k == FULL for k in kinds]
    empty = [k == EMPTY for k in kinds]
    pick = (lambda xs: torch.stack(torch.broadcast_tensors(*xs)).all(0)) if both else (
        lambda xs: torch.stack(torch.broadcast_tensors(*xs)).any(0))
    other = (lambda xs: torch.stack(torch.broadcast_tensors(*xs)).any(0)) if both else (
        lambda xs: torch.stack(torch.broadcast_tensors(*xs)).all(0))
    f, e = pick(full), other(empty)
    if only_empty:
        f = torch.zeros_like(f)
    return torch.where(f, FULL, torch.where(e, EMPTY, PARTIAL)).to(torch.int8)


class Union(_Combine):
    """A key may be attended when any part allows it. A part that returns None (keep dense) makes
    the union None: dense already allows everything."""

    factory = "union"


class Intersect(_Combine):
    """A key may be attended when every part allows it. A part that returns None (keep dense) does not
    restrict; when all parts return None so does the intersection."""

    factory = "intersect"
    both = True


def union(*fns, block_size: int | None = None) -> Union:
    """mask_fn: a key may be attended when any of ``fns`` allows it (see :class:`Union`)."""
    return Union(*fns, block_size=block_size)


def intersect(*fns, block_size: int | None = None) -> Intersect:
    """mask_fn: a key may be attended when every one of ``fns`` allows it (see :class:`Intersect`)."""
    return Intersect(*fns, block_size=block_size)


class Only(_Named):
    """``fn`` on the selected sites, None (dense) on every other one (see :func:`only`)."""

    factory = "only"

    @property
    def __name__(self):
        p = self._params
        parts = [_fn_name(p["fn"])]
        for k in ("layers", "names", "block_size"):
            if p[k] is not None:
                parts.append(f"{k}={p[k]!r}")
        if p["where"] is not None:
            parts.append(f"where={_fn_name(p['where'])}")
        return f"only({', '.join(parts)})"

    def selected(self, site) -> bool:
        p = self._params
        if p["layers"] is not None and site.index not in _hashable(p["layers"]):
            return False
        names = p["names"]
        if names is not None and not any(fnmatch.fnmatchcase(site.name, n) for n in names):
            return False
        return p["where"] is None or bool(p["where"](site))

    def __call__(self, site):
        if not self.selected(site):
            return None
        fn, bs = self._params["fn"], self.block_size
        if bs is None:
            return fn(site)
        return self.at(site.q_len, site.kv_len, num_heads=site.num_heads, site=site,
                       device=getattr(site, "device", None))

    def at(self, q_len, kv_len, *, num_heads=1, device=None, block_size=None, site=None):
        if site is None:
            raise TypeError(f"{self.__name__} selects sites: call it with a site")
        if not self.selected(site):
            return None
        fn, bs = self._params["fn"], block_size or self.block_size
        if isinstance(fn, MaskFn):
            return fn.at(q_len, kv_len, num_heads=num_heads, device=device, block_size=bs, site=site)
        return resolve_mask(fn(site), q_len=q_len, kv_len=kv_len, num_heads=num_heads, device=device,
                            block_size=bs, where=_fn_name(fn))


def only(fn, *, layers=None, names=None, where=None, block_size: int | None = None) -> Only:
    """mask_fn: ``fn`` on the selected sites, None (dense) on every other one.

    A site is selected when it passes every selector given:
    ``layers``: site indices (``site.index``, the order of the attentions in the graph: one per
    block in a plain transformer), e.g. ``range(6)`` for the first six;
    ``names``: module paths, exact or shell-style patterns (``"blocks.*.attn"``,
    ``"text_model.*"``); a single string is one name;
    ``where``: a predicate ``site -> bool`` (a module-level function keeps the mask_fn picklable).
    ``block_size``: the selected sites' layouts in blocks of this size (``fn``'s own otherwise).
    """
    if not callable(fn):
        raise TypeError(f"only: fn must be a mask_fn (site -> mask), got {type(fn).__name__}")
    if layers is None and names is None and where is None:
        raise ValueError("only: give layers=, names= or where=")
    if layers is not None:
        if not isinstance(layers, (range, list, tuple, set, frozenset)):
            layers = (layers,) if isinstance(layers, int) or hasattr(layers, "__index__") else tuple(layers)
        layers = layers if isinstance(layers, range) else type(layers)(check_count(i, "only: a layer index", -2**62)
                                                                        for i in layers)
        if any(i < 0 for i in layers):
            raise ValueError("only: layers are site indices counted from 0; negative indices "
                             "are not supported (the number of sites is not known to a mask_fn)")
    if names is not None:
        names = (names,) if isinstance(names, str) else tuple(names)
    return Only(fn=fn, layers=layers, names=names, where=where, block_size=_block_size(block_size))
