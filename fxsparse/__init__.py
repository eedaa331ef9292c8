"""fxsparse: find the attention in any PyTorch model by graph shape and make it block-sparse."""
from . import patterns
from .backend import backend
from .calibrate import calibrate
from .kernels.configs import LaunchConfig
from .layout import Layout, clear_caches
from .match import AttentionSite
from .op import sparse_attention
from .options import KernelOptions
from .report import Report, SiteReport, report
from .pipeline import transform

__all__ = [
    "AttentionSite", "KernelOptions", "Layout", "LaunchConfig", "Report", "SiteReport", "backend", "calibrate", "clear_caches", "patterns", "report",
    "sparse_attention", "transform",
]
