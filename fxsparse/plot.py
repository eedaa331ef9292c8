"""Pictures of layouts: which blocks a site computes whole, which through an element mask, which never.

    layout.plot("layout.png")                   # one layout (Layout.plot)
    fxsparse.report(sparse).plot("sites.png")   # every rewritten site of a model (Report.plot)
    python -m fxsparse inspect MODEL --pattern ... --plot sites.png

Full blocks are dark blue, partial blocks orange, empty blocks (never visited) light grey. When the
sequence is short enough (``max_tokens``), partial blocks show their token mask: allowed tokens in
orange, masked ones pale. matplotlib is an optional dependency: ``pip install 'fxsparse[plot]'``.
"""
from __future__ import annotations

import math

import torch

COLOURS = {  # RGB
    "full": (0.13, 0.29, 0.53),
    "partial": (0.96, 0.55, 0.13),
    "partial, masked out": (0.99, 0.88, 0.74),
    "empty": (0.93, 0.93, 0.93),
}
MAX_TOKENS = 1024  # up to this many tokens a side, partial blocks are drawn token by token


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError(
            "fxsparse's plots need matplotlib: pip install 'fxsparse[plot]' (or pip install matplotlib)"
        ) from None
    return Figure, Patch


def layout_image(layout, batch: int = 0, head: int = 0, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """float RGB image [rows, cols, 3] of one (batch, head) of the layout: one pixel per token when
    both lengths are at most ``max_tokens``, else one per block."""
    kinds = layout.kinds[min(batch, layout.batch - 1), min(head, layout.num_heads - 1)].long().cpu()
    colour = {name: torch.tensor(rgb) for name, rgb in COLOURS.items()}
    by_kind = torch.stack([colour["empty"], colour["partial"], colour["full"]])  # indexed by EMPTY, PARTIAL, FULL
    nq, nk = layout.shape
    if max(nq, nk) > max_tokens:
        return by_kind[kinds]
    bs = layout.block_size
    tokens = kinds.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:nq, :nk]
    image = by_kind[tokens]
    mask = layout.to_mask()[min(batch, layout.batch - 1), min(head, layout.num_heads - 1)].cpu()
    image[(tokens == layout.PARTIAL) & ~mask] = colour["partial, masked out"]
    return image


def draw_layout(layout, ax, *, batch: int = 0, head: int = 0, title: str | None = None,
                max_tokens: int = MAX_TOKENS) -> None:
    """Draw one (batch, head) of the layout on a matplotlib Axes, in token coordinates."""
    nq, nk = layout.shape
    ax.imshow(layout_image(layout, batch, head, max_tokens).numpy(), extent=(0, nk, nq, 0),
              interpolation="nearest", aspect="auto")
    nqb, nkb = layout.num_blocks
    if max(nqb, nkb) <= 64:  # block borders while they stay readable
        bs = layout.block_size
        for i in range(1, nqb):
            ax.axhline(i * bs, color="white", linewidth=0.4)
        for j in range(1, nkb):
            ax.axvline(j * bs, color="white", linewidth=0.4)
    kinds = layout.kinds
    n = kinds.numel()
    full, part = int((kinds == layout.FULL).sum()), int((kinds == layout.PARTIAL).sum())
    head_note = "" if layout.num_heads == 1 else f", head {head}"
    ax.set_title(title or f"{nq}x{nk}{head_note}", fontsize=9)
    ax.set_xlabel(f"key, blocks of {layout.block_size}: {full / n:.0%} full, {part / n:.0%} partial, "
                  f"{(n - full - part) / n:.0%} empty", fontsize=7)
    ax.set_ylabel("query", fontsize=7)
    ax.tick_params(labelsize=6)


def plot_layouts(items, path=None, *, columns: int | None = None, title: str | None = None,
                 max_tokens: int = MAX_TOKENS, panel: float = 3.0, dpi: int = 100):
    """A figure of several layouts: ``items`` = [(title, Layout), ...]. Saved to ``path`` when given
    (the format from its suffix: .png, .svg, .pdf). Returns the matplotlib Figure."""
    Figure, Patch = _matplotlib()
    items = list(items)
    if not items:
        raise ValueError("plot: no layout to draw (no site was rewritten with a layout)")
    cols = columns or min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig = Figure(figsize=(panel * cols, panel * rows + 0.6), dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, layout) in zip(axes.flat, items):
        draw_layout(layout, ax, title=name, max_tokens=max_tokens)
    for ax in list(axes.flat)[len(items):]:
        ax.set_visible(False)
    fig.legend(handles=[Patch(color=rgb, label=name) for name, rgb in COLOURS.items()], loc="outside lower center",
               ncols=min(len(COLOURS), 2 * cols), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        fig.savefig(path)
    return fig


def plot_layout(layout, path=None, *, title: str | None = None, max_tokens: int = MAX_TOKENS, **kwargs):
    """One layout (every head of a per-head layout, side by side): see :func:`plot_layouts`."""
    if layout.num_heads == 1:
        items = [(title or f"{layout.shape[0]}x{layout.shape[1]}, density {layout.density:.1%}", layout)]
    else:
        items = [(f"{title + ', ' if title else ''}head {h}", _one_head(layout, h)) for h in range(layout.num_heads)]
    return plot_layouts(items, path, max_tokens=max_tokens, **kwargs)


def _one_head(layout, head: int):
    return type(layout).from_mask(layout.to_mask()[:1, head : head + 1], layout.block_size)


def plot_report(report, path=None, **kwargs):
    """Every rewritten site's layout; sites whose layouts are the same are drawn once."""
    items, seen = [], {}
    for row in report:
        layout = getattr(row, "layout", None)
        if layout is None:
            continue
        key = (layout.shape, layout.block_size, tuple(layout.data.cpu().tolist()))
        if key in seen:
            seen[key][0].append(row.name)
            continue
        seen[key] = ([row.name], layout)
        items.append(key)
    if not items:
        raise ValueError("plot: no rewritten site has a layout yet (run the model once so the layouts are built)")
    named = []
    for key in items:
        names, layout = seen[key]
        label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"
        named.append((f"{label}\n{layout.shape[0]}x{layout.shape[1]}, density {layout.density:.1%}", layout))
    return plot_layouts(named, path, **kwargs)
