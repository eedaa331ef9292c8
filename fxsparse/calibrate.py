"""mask_fns learned from data: which blocks does this model actually attend to?

``fxsparse.calibrate(model, batches, density=0.1)`` runs the model, every site dense, over a few
batches and sums each site's softmax probabilities into blocks of ``block_size`` tokens. Per site and
per (q_len, kv_len) it keeps the blocks that hold the most attention, about ``density`` of them, and
returns a mask_fn that hands those blocks to ``fxsparse.transform``::

    mask_fn = fxsparse.calibrate(model, [(images,) for images in loader], density=0.2, block_size=32)
    print(mask_fn.coverage)                      # site name -> share of the attention mass kept
    sparse = fxsparse.transform(model, mask_fn)

Lengths not seen while calibrating stay dense (mask_fn returns None).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from .layout import Layout, _check_block_size
from .patterns import MaskFn, _call_name

_CHUNK_ELEMENTS = 1 << 24  # probabilities held at once by the recorder: 64 MiB of float32


def calibrate(model, batches, *, density: float = 0.1, block_size: int = 128, per_head: bool = False,
              keep_diagonal: bool = True, example_inputs=None, concrete_args=None) -> MaskFn:
    """A mask_fn keeping, per site and per lengths seen in ``batches``, the blocks with the most attention.

    ``batches``: an iterable of model inputs, each a tuple or list (``model(*batch)``), a dict
    (``model(**batch)``) or a single tensor. They run with no gradient, in eval mode, on a copy of the
    graph: ``model`` is untouched.

    Per site and (q_len, kv_len), the attention probabilities (with the site's own bias and causality)
    are summed over the batches into a mass per block; the blocks of highest mass are kept, one
    threshold over all the site's blocks, so that about ``density`` of them are kept. Every query
    block row keeps at least its heaviest block and, when ``keep_diagonal`` and q_len == kv_len, its
    diagonal block. ``per_head`` keeps one block map per head, else one map for the heads' summed mass.

    The result has ``.coverage``: site name -> fraction of the recorded attention mass inside the kept
    blocks (1.0 is lossless on the calibration data), and ``.blocks``: (site name, site index,
    q_len, kv_len) -> the bool block map ``[H|1, NQB, NKB]``.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"calibrate: density is the fraction of blocks to keep, in (0, 1], got {density!r}")
    block_size = _check_block_size(block_size)
    from .rewrite import transform
    from .site import site_modules

    sparse = transform(model, lambda site: None, example_inputs=example_inputs, concrete_args=concrete_args)
    sparse.eval()
    recorder = _Recorder(block_size)
    modules = site_modules(sparse)
    for mod in modules:
        mod.recorder = recorder
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    sparse(**batch)
                elif isinstance(batch, (tuple, list)):
                    sparse(*batch)
                else:
                    sparse(batch)
                seen += 1
    finally:
        for mod in modules:
            mod.recorder = None
    if seen == 0:
        raise ValueError("calibrate: batches is empty; give at least one batch of model inputs")

    blocks, kept_mass, total_mass = {}, defaultdict(float), defaultdict(float)
    for key, mass in recorder.mass.items():
        if not per_head:
            mass = mass.sum(0, keepdim=True)
        q_len, kv_len = key[2], key[3]
        keep = select_blocks(mass, density, keep_diagonal=keep_diagonal and q_len == kv_len)
        blocks[key] = keep
        kept_mass[key[0]] += float(mass[keep].sum())
        total_mass[key[0]] += float(mass.sum())
    coverage = {name: (kept_mass[name] / total_mass[name] if total_mass[name] > 0 else 1.0) for name in total_mass}

    def calibrated(site):
        keep = blocks.get((site.name, site.index, site.q_len, site.kv_len))
        if keep is None:
            return None
        return Layout.from_blocks(keep, block_size, shape=(site.q_len, site.kv_len))

    name = _call_name("calibrated", density=density, block_size=block_size,
                      per_head=per_head or None, sites=len({key[:2] for key in blocks}))
    fn = MaskFn(calibrated, name)
    fn.coverage = coverage
    fn.blocks = blocks
    return fn


def select_blocks(mass: torch.Tensor, density: float, *, keep_diagonal: bool) -> torch.Tensor:
    """bool [H, NQB, NKB]: the heaviest blocks of ``mass`` [H, NQB, NKB], about ``density`` of them.

    Forced first: each row's heaviest block and (with ``keep_diagonal``) the diagonal; then the rest of
    the budget goes to the heaviest other blocks of nonzero mass, one threshold across all heads.
    """
    h, nqb, nkb = mass.shape
    keep = torch.zeros(mass.shape, dtype=torch.bool)
    keep.scatter_(-1, mass.argmax(-1, keepdim=True), True)
    if keep_diagonal:
        d = torch.arange(min(nqb, nkb))
        keep[:, d, d] = True
    budget = round(density * mass.numel()) - int(keep.sum())
    if budget > 0:
        rest = mass.masked_fill(keep, -1.0).flatten()
        top = rest.topk(min(budget, rest.numel())).indices
        top = top[rest[top] > 0]  # never spend the budget on blocks no query attends to
        keep.view(-1)[top] = True
    return keep


class _Recorder:
    """Called by each SiteAttention before it computes: sums softmax probabilities into block mass."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.mass: dict = {}  # (site name, site index, q_len, kv_len) -> float64 [H, NQB, NKB] on the CPU

    def __call__(self, site, q, k, bias, scale, causal):
        key = (site.name, site.index, q.shape[-2], k.shape[-2])
        mass = block_mass(q, k, bias, scale, causal, self.block_size).double().cpu()
        if key in self.mass:
            self.mass[key] += mass
        else:
            self.mass[key] = mass


def block_mass(q, k, bias, scale, causal, block_size: int, *, max_elements: int = _CHUNK_ELEMENTS) -> torch.Tensor:
    """Attention probabilities of q [B, H, Nq, D], k [B, Hkv, Nk, D], summed over the batch into blocks:
    float32 [H, NQB, NKB]. Computed in float32, whole query blocks at a time, about ``max_elements``
    probabilities at once, with the site's additive ``bias`` (broadcastable to [B, H, Nq, Nk]) and
    top-left ``causal`` mask."""
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    bs = block_size
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    if k.shape[1] != h:  # grouped-query heads: query head i reads kv head i // (H / Hkv), as SDPA's enable_gqa
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    kt = k.float().transpose(-1, -2)
    scale = d ** -0.5 if scale is None else scale
    rows = max(1, max_elements // max(1, b * h * nk * bs)) * bs
    out = torch.empty(h, nqb, nkb, dtype=torch.float32, device=q.device)
    cols = torch.arange(nk, device=q.device)
    for start in range(0, nq, rows):
        stop = min(nq, start + rows)
        scores = (q[:, :, start:stop].float() @ kt) * scale
        if bias is not None:
            part = bias if bias.dim() < 2 or bias.shape[-2] == 1 else bias[..., start:stop, :]
            scores = scores + part.float()
        if causal:
            above = cols[None, :] > torch.arange(start, stop, device=q.device)[:, None]
            scores = scores.masked_fill(above, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no allowed key holds no mass
        n = stop - start
        probs = F.pad(probs, (0, nkb * bs - nk, 0, math.ceil(n / bs) * bs - n))
        blocks = probs.reshape(b, h, -1, bs, nkb, bs).sum((0, 3, 5))
        out[:, start // bs : start // bs + blocks.shape[1]] = blocks
    return out
