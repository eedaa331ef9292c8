"""Mask factories: small functions that return a ``mask_fn`` for ``fxsparse.transform``.

A ``mask_fn`` takes an ``AttentionSite`` and returns a bool token mask ``[q_len, kv_len]``
(or ``[H, q_len, kv_len]``) where True means "may attend", or None to keep that site dense.
Every factory here has a plain builder beside it, ``<name>_mask(q_len, kv_len, ...)``, that
returns the same tensor for use with ``fxsparse.sparse_attention`` directly.

    mask_fn = patterns.only(
        patterns.local_2d(window=2, prefix_tokens=1),   # CLS is global, patches see a 5x5 window
        layers=range(6))                                # the last layers stay dense

Positions are token indices, as in FlexAttention's ``mask_mod`` and SDPA's ``is_causal``:
query ``i`` and key ``j`` are compared as ``i`` and ``j`` even when ``q_len != kv_len``.
Masks are built on the CPU; the transform moves them where the model runs.

Speed comes from whole blocks of the mask being empty, not from its token density. Patches are
in row-major order, so a 2-D window of radius w spans about ``2 * w + 1`` grid rows of tokens:
at 197 tokens (ViT-B/16, 224 px) a window-1 mask holds 5 % of the scores but touches every
128-token block and 65 % of 32-token blocks. Return ``Layout.from_mask(mask, block_size=32)``
from the mask_fn for short sequences; long sequences skip most blocks at any block size.
"""
from __future__ import annotations

import fnmatch
import math

import torch

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


class MaskFn:
    """A mask_fn with a readable name: ``repr(fn) == fn.__name__ == "local_2d(window=2)"``."""

    def __init__(self, fn, name: str):
        self._fn = fn
        self.__name__ = name
        self.__qualname__ = name
        self.__doc__ = fn.__doc__

    def __call__(self, site):
        return self._fn(site)

    def __repr__(self):
        return self.__name__


def _call_name(factory: str, **kwargs) -> str:
    """``local_2d(window=2, prefix_tokens=1)``: the arguments that are not None."""
    return f"{factory}({', '.join(f'{k}={v!r}' for k, v in kwargs.items() if v is not None)})"


# Errors say what does not fit; fxsparse.transform adds the name of the site.


def _check_self_attention(site, factory: str):
    if site.q_len != site.kv_len:
        raise ValueError(
            f"{factory} needs self-attention (q_len == kv_len), got q_len={site.q_len}, "
            f"kv_len={site.kv_len}; select the sites it fits with patterns.only(...)")


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


def local_2d_mask(q_len: int, kv_len: int | None = None, *, window: int,
                  grid: tuple[int, int] | None = None,
                  prefix_tokens: int | None = None) -> torch.Tensor:
    """Local windows on image patches, as a bool ``[q_len, q_len]`` mask.

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
    kv_len = q_len if kv_len is None else kv_len
    if q_len != kv_len:
        raise ValueError(f"local_2d: needs q_len == kv_len, got {q_len} and {kv_len}")
    if window < 0:
        raise ValueError(f"local_2d: window must be >= 0, got {window}")
    if grid is None:
        prefix, (h, w) = _infer_grid(q_len, prefix_tokens)
    else:
        h, w = grid
        prefix = q_len - h * w
        if prefix < 0 or (prefix_tokens is not None and prefix != prefix_tokens):
            raise ValueError(f"local_2d: grid {h}x{w} with {prefix_tokens} prefix tokens does "
                             f"not make {q_len} tokens")
    idx = torch.arange(h * w)
    row, col = idx // w, idx % w
    near = ((row[:, None] - row[None, :]).abs() <= window) & \
           ((col[:, None] - col[None, :]).abs() <= window)
    mask = torch.ones(q_len, q_len, dtype=torch.bool)
    mask[prefix:, prefix:] = near
    return mask


def local_2d(window: int, grid: tuple[int, int] | None = None,
             prefix_tokens: int | None = None) -> MaskFn:
    """mask_fn: :func:`local_2d_mask` at each site's length (self-attention sites only)."""
    def fn(site):
        _check_self_attention(site, "local_2d")
        return local_2d_mask(site.q_len, site.kv_len, window=window, grid=grid,
                             prefix_tokens=prefix_tokens)
    fn.__doc__ = local_2d_mask.__doc__
    return MaskFn(fn, _call_name("local_2d", window=window, grid=grid,
                                 prefix_tokens=prefix_tokens))


# ---------------------------------------------------------------------------------------------
# 1-D patterns


def sliding_window_mask(q_len: int, kv_len: int, *, window: int,
                        causal: bool = False) -> torch.Tensor:
    """Query ``i`` attends to keys ``j`` with ``|i - j| <= window``; with ``causal=True`` to
    ``i - window <= j <= i`` (itself and the ``window`` keys before it). Bool ``[q_len, kv_len]``."""
    if window < 0:
        raise ValueError(f"sliding_window: window must be >= 0, got {window}")
    diff = torch.arange(q_len)[:, None] - torch.arange(kv_len)[None, :]   # i - j
    if causal:
        return (diff >= 0) & (diff <= window)
    return diff.abs() <= window


def sliding_window(window: int, causal: bool = False) -> MaskFn:
    """mask_fn: :func:`sliding_window_mask` at each site's lengths."""
    def fn(site):
        return sliding_window_mask(site.q_len, site.kv_len, window=window, causal=causal)
    fn.__doc__ = sliding_window_mask.__doc__
    return MaskFn(fn, _call_name("sliding_window", window=window, causal=causal or None))


def causal_mask(q_len: int, kv_len: int) -> torch.Tensor:
    """Query ``i`` attends to keys ``j <= i`` (SDPA's ``is_causal`` alignment). Bool
    ``[q_len, kv_len]``."""
    return torch.ones(q_len, kv_len, dtype=torch.bool).tril()


def causal() -> MaskFn:
    """mask_fn: :func:`causal_mask` at each site's lengths."""
    return MaskFn(lambda site: causal_mask(site.q_len, site.kv_len), "causal()")


def global_tokens_mask(q_len: int, kv_len: int, *, n: int) -> torch.Tensor:
    """The first ``n`` tokens are global: queries ``i < n`` attend to every key, and every query
    attends to keys ``j < n``. Nothing else; combine it with :func:`union`."""
    if n < 0:
        raise ValueError(f"global_tokens: n must be >= 0, got {n}")
    mask = torch.zeros(q_len, kv_len, dtype=torch.bool)
    mask[:n, :] = True
    mask[:, :n] = True
    return mask


def global_tokens(n: int) -> MaskFn:
    """mask_fn: :func:`global_tokens_mask` at each site's lengths."""
    def fn(site):
        return global_tokens_mask(site.q_len, site.kv_len, n=n)
    fn.__doc__ = global_tokens_mask.__doc__
    return MaskFn(fn, _call_name("global_tokens", n=n))


def dense_mask(q_len: int, kv_len: int) -> torch.Tensor:
    """Every query attends to every key: an all-True ``[q_len, kv_len]`` mask."""
    return torch.ones(q_len, kv_len, dtype=torch.bool)


def dense() -> MaskFn:
    """mask_fn: an all-True mask. The site is still rewritten to the sparse op (unlike
    returning None, which keeps the original attention)."""
    return MaskFn(lambda site: dense_mask(site.q_len, site.kv_len), "dense()")


def bigbird_mask(q_len: int, kv_len: int, *, block: int, num_random: int, num_window: int,
                 num_global: int, seed: int = 0) -> torch.Tensor:
    """BigBird's block pattern, as a bool ``[q_len, kv_len]`` token mask.

    Tokens are cut into blocks of ``block`` tokens (the last one may be short). Query block
    ``a`` attends to key blocks ``b`` with ``|a - b| <= num_window // 2`` (``num_window`` is the
    odd count of window blocks, 3 = left, self, right); the first ``num_global`` blocks are
    global (they attend to all, all attend to them); and each query block that is not global
    attends to ``num_random`` further key blocks drawn without replacement from those not
    already chosen (fewer when fewer are left), by a ``torch.Generator`` seeded with ``seed``.
    The same seed gives the same mask.
    """
    if block <= 0 or num_random < 0 or num_global < 0:
        raise ValueError("bigbird: block must be > 0, num_random and num_global >= 0")
    if num_window < 1 or num_window % 2 == 0:
        raise ValueError(f"bigbird: num_window is the odd number of window blocks "
                         f"(1, 3, 5, ...), got {num_window}")
    qb, kb = -(-q_len // block), -(-kv_len // block)
    a, b = torch.arange(qb)[:, None], torch.arange(kb)[None, :]
    blocks = ((a - b).abs() <= num_window // 2) | (a < num_global) | (b < num_global)
    gen = torch.Generator().manual_seed(seed)
    for row in range(num_global, qb):
        free = (~blocks[row]).nonzero().flatten()
        pick = free[torch.randperm(len(free), generator=gen)[:num_random]]
        blocks[row, pick] = True
    return blocks.repeat_interleave(block, 0)[:q_len].repeat_interleave(block, 1)[:, :kv_len]


def bigbird(block: int, num_random: int, num_window: int, num_global: int,
            seed: int = 0) -> MaskFn:
    """mask_fn: :func:`bigbird_mask` at each site's lengths (the same random blocks at every
    site of the same lengths)."""
    def fn(site):
        return bigbird_mask(site.q_len, site.kv_len, block=block, num_random=num_random,
                            num_window=num_window, num_global=num_global, seed=seed)
    fn.__doc__ = bigbird_mask.__doc__
    return MaskFn(fn, _call_name("bigbird", block=block, num_random=num_random,
                                 num_window=num_window, num_global=num_global, seed=seed))


# ---------------------------------------------------------------------------------------------
# combinators


def _as_bool_mask(out, fn) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        got = f"a tensor of {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"{_fn_name(fn)} returned {got}; union/intersect combine bool token "
                        f"masks only")
    return out


def union(*fns) -> MaskFn:
    """mask_fn: a key may be attended when any of ``fns`` allows it. A part that returns None
    (keep dense) makes the union None: dense already allows everything."""
    if not fns:
        raise ValueError("union: needs at least one mask_fn")

    def fn(site):
        masks = []
        for f in fns:
            out = f(site)
            if out is None:
                return None
            masks.append(_as_bool_mask(out, f))
        result = masks[0]
        for m in masks[1:]:
            result = result | m
        return result
    return MaskFn(fn, f"union({', '.join(_fn_name(f) for f in fns)})")


def intersect(*fns) -> MaskFn:
    """mask_fn: a key may be attended when every one of ``fns`` allows it. A part that returns
    None (keep dense) does not restrict; when all parts return None so does the intersection."""
    if not fns:
        raise ValueError("intersect: needs at least one mask_fn")

    def fn(site):
        result = None
        for f in fns:
            out = f(site)
            if out is None:
                continue
            out = _as_bool_mask(out, f)
            result = out if result is None else result & out
        return result
    return MaskFn(fn, f"intersect({', '.join(_fn_name(f) for f in fns)})")


def only(fn, *, layers=None, names=None, where=None) -> MaskFn:
    """mask_fn: ``fn`` on the selected sites, None (dense) on every other one.

    A site is selected when it passes every selector given:
    ``layers``: site indices (``site.index``, the order of the attentions in the graph: one per
    block in a plain transformer), e.g. ``range(6)`` for the first six;
    ``names``: module paths, exact or shell-style patterns (``"blocks.*.attn"``,
    ``"text_model.*"``); a single string is one name;
    ``where``: a predicate ``site -> bool``.
    """
    if layers is None and names is None and where is None:
        raise ValueError("only: give layers=, names= or where=")
    layer_set = None
    if layers is not None:
        if not isinstance(layers, (int, range, list, tuple, set, frozenset)):
            layers = tuple(layers)  # a generator can be read once only: here
        layer_set = {layers} if isinstance(layers, int) else set(layers)
        if any(i < 0 for i in layer_set):
            raise ValueError("only: layers are site indices counted from 0; negative indices "
                             "are not supported (the number of sites is not known to a mask_fn)")
    name_list = [names] if isinstance(names, str) else (list(names) if names is not None else None)

    def selected(site) -> bool:
        if layer_set is not None and site.index not in layer_set:
            return False
        if name_list is not None and not any(fnmatch.fnmatchcase(site.name, p) for p in name_list):
            return False
        return where is None or bool(where(site))

    def inner(site):
        return fn(site) if selected(site) else None

    parts = [_fn_name(fn)]
    if layers is not None:
        parts.append(f"layers={layers!r}")
    if names is not None:
        parts.append(f"names={names!r}")
    if where is not None:
        parts.append(f"where={_fn_name(where)}")
    return MaskFn(inner, f"only({', '.join(parts)})")


def _fn_name(f) -> str:
    return f.__name__ if isinstance(f, MaskFn) else getattr(f, "__name__", repr(f))
