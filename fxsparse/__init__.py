"""fxsparse: find the attention in any PyTorch model by graph shape and make it block-sparse."""
from .layout import Layout
from .op import sparse_attention

__all__ = ["Layout", "sparse_attention"]
from . import patterns
from .match import AttentionSite
from .report import Report, SiteReport, report
from .rewrite import transform
from .backend import backend
