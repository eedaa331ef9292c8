"""fxsparse: find the attention in any PyTorch model by graph shape and make it block-sparse."""
from . import layout as _layout
from . import op as _op
from . import patterns
from .backend import backend
from .calibrate import calibrate
from .kernels.configs import LaunchConfig
from .layout import Layout
from .match import AttentionSite
from .op import sparse_attention
from .options import KernelOptions
from .pipeline import transform
from .report import Report, SiteReport, report


def clear_caches() -> None:
    """Forget every cached layout: those patterns built (bounded LRU) and the op's dense ones."""
    _layout.clear_layout_cache()
    _op.clear_layout_cache()


__all__ = [
    "AttentionSite", "KernelOptions", "Layout", "LaunchConfig", "Report", "SiteReport", "backend", "calibrate", "clear_caches", "patterns", "report",
    "sparse_attention", "transform",
]
