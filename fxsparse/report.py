"""What the rewrite did, site by site: ``fxsparse.report(sparse)``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tabulate import tabulate

from .match import AttentionSite, flops
from .site import site_modules

COLUMNS = ["#", "site", "module", "pattern", "role", "heads×dim", "q×kv", "block", "density", "attention FLOPs saved", "status", "reason"]


@dataclass
class SiteReport:
    index: int
    name: str
    status: str  # "rewritten", "dense" (mask_fn returned None) or "skipped"
    reason: str
    pattern: str
    site: AttentionSite
    block: Optional[int] = None
    density: Optional[float] = None  # fraction of (q, kv) pairs the layout visits, per sample
    module: str = ""  # path of the module whose forward holds the site (where it was rewritten)
    layout: Optional[object] = field(default=None, repr=False)  # the Layout the site runs (for plots), or None

    @property
    def heads(self) -> str:
        s = self.site
        if s.num_heads is None:
            return "?"
        heads = f"{s.num_heads}" if s.num_kv_heads in (None, s.num_heads) else f"{s.num_heads}/{s.num_kv_heads}kv"
        return f"{heads}×{s.head_dim}"

    @property
    def lengths(self) -> str:
        s = self.site
        return "?" if s.q_len is None else f"{s.q_len}×{s.kv_len}"

    @property
    def flops_saved(self) -> Optional[float]:
        """Attention FLOPs per sample the sparse layout does not compute (q kᵀ and p v)."""
        total = flops(self.site)
        if total is None or self.density is None:
            return None
        return total * (1.0 - self.density)

    def cells(self) -> list:
        saved = self.flops_saved
        total = flops(self.site)
        saved_cell = "" if saved is None else f"{_si(saved)} ({1 - self.density:.0%} of {_si(total)})"
        return [
            self.index, self.name or "(root)", self.module or "(root)", self.pattern, self.site.role, self.heads,
            self.lengths,
            "" if self.block is None else self.block,
            "" if self.density is None else f"{self.density:.1%}",
            saved_cell, self.status, self.reason,
        ]


@dataclass
class Report:
    rows: list

    def __str__(self) -> str:
        if not self.rows:
            return "fxsparse: no attention found"
        return tabulate([r.cells() for r in self.rows], headers=COLUMNS, tablefmt="simple")

    def __repr__(self) -> str:
        return str(self)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def plot(self, path=None, **kwargs):
        """A picture of every rewritten site's layout (needs matplotlib): ``fxsparse.plot.plot_report``."""
        from .plot import plot_report
        return plot_report(self, path, **kwargs)


def report(obj) -> Report:
    """The report of a module returned by ``fxsparse.transform`` (or of a ``fxsparse.backend``)."""
    rows = []
    modules = obj.site_modules() if hasattr(obj, "site_modules") else site_modules(obj)
    found_at_run_time = {getattr(mod, "owner", None) for mod in modules}
    for site, reason, *owner in getattr(obj, "fxsparse_skipped", []):
        module = owner[0] if owner else site.name
        if site.kind == "opaque call" and module in found_at_run_time:
            continue  # a call fx kept whole whose attentions became sites when it ran
        rows.append(SiteReport(site.index, site.name, "skipped", reason, site.pattern, site, module=module))
    for mod in modules:
        site, built = mod.site, mod.built()
        status = mod.status
        reason = _dense_reason(site) if status == "dense" else ""
        if status == "rewritten" and built is None:
            reason = "lengths not known yet: mask_fn is called at the first forward"
        row = SiteReport(site.index, site.name, status, reason, site.pattern, site,
                         module=getattr(mod, "owner", site.name))
        if built is not None:
            row.block, row.density = built
            row.layout = mod.current_layout()
            if row.density >= 1.0 and status == "rewritten":
                row.reason = _nothing_skipped(row.block, site, getattr(mod, "mask_folded", False))
        elif status == "dense":
            row.density = 1.0
        rows.append(row)
    rows.sort(key=lambda r: r.index)
    return Report(rows)


def _dense_reason(site: AttentionSite) -> str:
    """Why a site runs dense: mask_fn said so; for sites that are not self-attention over one sequence,
    the patterns (fxsparse.patterns) keep them dense themselves."""
    why = {
        "channel": "a channel attention (its softmax runs over feature channels): a token pattern means nothing there",
        "cross": "a cross-attention (keys from other tokens): token positions of queries and keys do not correspond",
        "learned-query": "a learned-query attention (queries are parameters): they have no token positions",
        "pooled": "a pooled attention (keys pooled to another length): token positions of queries and keys differ",
    }.get(site.role)
    return "mask_fn returned None" + (f"; {why}, so the patterns keep it dense" if why else "")


def _nothing_skipped(block: int, site: AttentionSite, mask_folded: bool = False) -> str:
    """Why a rewritten site's layout saves nothing, and what to do about it; or that the model's own
    mask (padding, packed documents) has removed blocks at run time (``mask_folded``)."""
    if mask_folded:
        return (f"the layout keeps every {block}-token block; the blocks the model's own mask (padding, "
                "documents) empties are skipped when it runs")
    n = max(site.q_len or 0, site.kv_len or 0)
    hint = f"; at {n} tokens pass a smaller block_size (32 or 64)" if block > 32 and n and n < 8 * block else ""
    return f"the layout keeps every {block}-token block: nothing is skipped{hint}"


def _si(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"
