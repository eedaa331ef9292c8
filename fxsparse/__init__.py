"""fxsparse: find the attention in any PyTorch model by graph shape and make it block-sparse."""
from . import patterns
from .backend import backend
from .calibrate import calibrate
from .layout import Layout
from .match import AttentionSite
from .op import sparse_attention
from .report import Report, SiteReport, report
from .rewrite import transform

__all__ = [
    "AttentionSite", "Layout", "Report", "SiteReport", "backend", "calibrate", "patterns", "report",
    "sparse_attention", "transform",
]
