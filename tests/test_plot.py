"""Pictures of layouts: Layout.plot, Report.plot and the image behind them (fxsparse/plot.py)."""
from __future__ import annotations

import struct
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import Layout, patterns
from fxsparse.plot import COLOURS, layout_image

pytest.importorskip("matplotlib")


def png_size(path) -> tuple:
    """(width, height) from a PNG file's header."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


def three_kinds_mask():
    """64x64 tokens in 32-blocks: block (0, 0) full, (0, 1) partial (its diagonal), (1, 0) empty, (1, 1) full."""
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:32, :32] = True
    mask[32:, 32:] = True
    mask[torch.arange(32), 32 + torch.arange(32)] = True
    return mask


def test_image_colours_each_token_by_its_block_kind():
    mask = three_kinds_mask()
    image = layout_image(Layout.from_mask(mask, 32))
    assert image.shape == (64, 64, 3)
    colour = {k: torch.tensor(v) for k, v in COLOURS.items()}
    assert torch.equal(image[5, 7], colour["full"]) and torch.equal(image[40, 50], colour["full"])
    assert torch.equal(image[40, 5], colour["empty"])
    for i in range(32):  # the partial block: its allowed tokens strong, the others pale
        assert torch.equal(image[i, 32 + i], colour["partial"])
        assert torch.equal(image[i, 32 + (i + 1) % 32], colour["partial, masked out"])


def test_long_layouts_are_drawn_block_by_block():
    layout = Layout.from_mask(patterns.sliding_window_mask(300, 300, window=40), 32)
    image = layout_image(layout, max_tokens=100)
    assert image.shape == (10, 10, 3)  # one pixel per block
    kinds = layout.kinds[0, 0]
    assert torch.equal(image[kinds == 0], torch.tensor(COLOURS["empty"]).expand(int((kinds == 0).sum()), 3))


def test_layout_plot_writes_a_png_of_the_figure_size(tmp_path):
    path = tmp_path / "layout.png"
    fig = Layout.from_mask(three_kinds_mask(), 32).plot(path, panel=3.0, dpi=100)
    assert png_size(path) == (300, 360)  # 3 in wide, 3 in + 0.6 in for the legend, at 100 dpi
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 1
    # a per-head layout: one panel per head
    per_head = torch.stack([three_kinds_mask(), ~three_kinds_mask()])
    fig = Layout.from_mask(per_head, 32).plot(tmp_path / "heads.png")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2
    assert png_size(tmp_path / "heads.png") == (600, 360)


class TwoAttentions(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(3))

    def forward(self, x):
        b, n, d = x.shape
        for qkv in self.qkv:
            q, k, v = qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return x


def test_report_plot_draws_each_distinct_layout_once(tmp_path):
    torch.manual_seed(0)
    model = TwoAttentions().eval()
    x = torch.randn(1, 96, 32)
    mask_fn = patterns.only(patterns.sliding_window(window=8, block_size=32), layers=range(2))
    sparse = fxsparse.transform(model, mask_fn, example_inputs=(x,))
    with torch.no_grad():
        sparse(x)
    report = fxsparse.report(sparse)
    fig = report.plot(tmp_path / "sites.png")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 1 and "(+1 more)" in axes[0].get_title()  # two sites, one layout; the third is dense
    assert png_size(tmp_path / "sites.png") == (300, 360)
    all_dense = fxsparse.report(fxsparse.transform(model, lambda site: None, example_inputs=(x,)))
    with pytest.raises(ValueError, match="no rewritten site has a layout"):
        all_dense.plot(tmp_path / "none.png")


def test_missing_matplotlib_is_a_clear_import_error(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'fxsparse\[plot\]'"):
        Layout.from_mask(three_kinds_mask(), 32).plot()
