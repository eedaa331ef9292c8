"""mask_fns learned from data: which blocks does this model actually attend to?

``fxsparse.calibrate(model, batches, density=0.1)`` runs the model, every site dense, over a few
batches and sums each site's softmax probabilities into blocks of ``block_size`` tokens. Per site and
per (q_len, kv_len) it keeps the blocks that hold the most attention, about ``density`` of them, and
returns a mask_fn that hands those blocks to ``fxsparse.transform``::

    mask_fn = fxsparse.calibrate(model, [(images,) for images in loader], density=0.2, block_size=32)
    print(mask_fn.summary())                     # per site: blocks kept (asked vs reached), attention mass kept
    sparse = fxsparse.transform(model, mask_fn)
    torch.save(mask_fn, "calibrated.pt")         # plain data: it pickles

Lengths not seen while calibrating stay dense (mask_fn returns None).
"""
from __future__ import annotations

import math
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

from .layout import Layout, check_block_size
from .patterns import MaskFn

_CHUNK_ELEMENTS = 1 << 24  # probabilities held at once by the recorder: 64 MiB of float32


def calibrate(model, batches, *, density: float = 0.1, block_size: int = 128, per_head: bool = False,
              keep_diagonal: bool = True, example_inputs=None, concrete_args=None,
              progress: bool | None = None) -> "Calibrated":
    """A mask_fn keeping, per site and per lengths seen in ``batches``, the blocks with the most attention.

    ``batches``: an iterable of model inputs, each a tuple or list (``model(*batch)``), a dict
    (``model(**batch)``) or a single tensor. They run with no gradient, in eval mode, on a copy of the
    graph: ``model`` is untouched.

    Per site and (q_len, kv_len), the attention probabilities (with the site's own bias and causality)
    are summed over the batches into a mass per block; the blocks of highest mass are kept, one
    threshold over all the site's blocks, so that about ``density`` of them are kept. Every query
    block row keeps at least its heaviest block and, when ``keep_diagonal`` and q_len == kv_len, its
    diagonal block. ``per_head`` keeps one block map per head, else one map for the heads' summed mass.

    The result (a :class:`Calibrated`, picklable) has ``.coverage``: site name -> fraction of the
    recorded attention mass inside the kept blocks (1.0 is lossless on the calibration data),
    ``.reached``: site name -> fraction of blocks kept (against ``density`` asked; ``.summary()``
    prints both), and ``.blocks``: (site name, site index, q_len, kv_len) -> the bool block map
    ``[H|1, NQB, NKB]``.

    ``progress``: a progress bar over the batches on stderr; by default only when stderr is a
    terminal and not under pytest.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"calibrate: density is the fraction of blocks to keep, in (0, 1], got {density!r}")
    block_size = check_block_size(block_size)
    from .pipeline import transform
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
            for batch in _progress(batches, progress):
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

    return Calibrated(blocks, block_size=block_size, density=density, coverage=coverage, per_head=per_head)


class Calibrated(MaskFn):
    """The mask_fn ``calibrate`` returns: per (site name, site index, q_len, kv_len) a bool block map.

    Plain data (it pickles, so a calibration can be saved with ``torch.save`` and reused). Attributes:
    ``blocks`` (key -> bool ``[H|1, NQB, NKB]``), ``block_size``, ``density`` (asked), ``coverage``
    (site name -> share of the recorded attention mass kept), ``reached`` (site name -> share of
    blocks kept: above ``density`` where every row's heaviest block and the diagonal must stay, below
    it where fewer blocks held any mass).
    """

    def __init__(self, blocks: dict, *, block_size: int, density: float, coverage: dict, per_head: bool = False):
        self.blocks = blocks
        self.block_size = block_size
        self.density = density
        self.coverage = coverage
        self.per_head = per_head
        kept, total = defaultdict(int), defaultdict(int)
        for key, keep in blocks.items():
            kept[key[0]] += int(keep.sum())
            total[key[0]] += keep.numel()
        self.reached = {name: kept[name] / total[name] for name in total}

    @property
    def __name__(self) -> str:
        sites = len({key[:2] for key in self.blocks})
        per_head = ", per_head=True" if self.per_head else ""
        return f"calibrated(density={self.density!r}, block_size={self.block_size}{per_head}, sites={sites})"

    @property
    def __doc__(self):
        return type(self).__doc__

    def __call__(self, site):
        keep = self.blocks.get((site.name, site.index, site.q_len, site.kv_len))
        if keep is None:
            return None
        return Layout.from_blocks(keep, self.block_size, shape=(site.q_len, site.kv_len))

    def summary(self) -> str:
        """One line per site: block density asked and reached, attention mass kept."""
        lines = [f"{self.__name__}: block density asked {self.density:.1%}"]
        for name in sorted(self.reached):
            lines.append(f"  {name}: {self.reached[name]:.1%} of blocks kept, "
                         f"{self.coverage.get(name, 1.0):.1%} of the attention mass")
        return "\n".join(lines)


def _progress(batches, show: bool | None):
    """batches, wrapped in a tqdm bar when shown (default: stderr is a terminal, not under pytest)."""
    if show is None:
        show = sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ
    if not show:
        return batches
    from tqdm.auto import tqdm
    return tqdm(batches, desc="calibrate", unit="batch", file=sys.stderr, leave=False,
                total=len(batches) if hasattr(batches, "__len__") else None)


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
