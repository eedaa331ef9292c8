"""Layouts a site runs are made once per shape, not per call: under torch.compile a site that mask_fn
keeps dense, or a call with few queries (a decoding step), builds the kernels' Layout at its first call
only, and an eager site reuses the Layout over its tables. Outputs stay the masked original's."""
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import Layout
from fxsparse.site import site_modules
from fxsparse.testing import assert_close, masked_forward


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a longer memory (as a decoding step against a cache)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.kv = nn.Linear(32, 64)

    def forward(self, x, mem):
        b, n, c = x.shape
        q = self.q(x).view(b, n, 4, 8).transpose(1, 2)
        k, v = self.kv(mem).view(b, mem.shape[1], 2, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(CrossAttention() for _ in range(2))

    def forward(self, x, mem):
        for layer in self.layers:
            x = x + layer(x, mem)
        return x


def band(site):
    """|p - j| <= 6, the queries at the last positions of the keys; layer 0 kept dense."""
    if site.name.startswith("layers.0"):
        return None
    p = torch.arange(site.kv_len - site.q_len, site.kv_len)[:, None]
    return (p - torch.arange(site.kv_len)[None, :]).abs() <= 6


def _counting(monkeypatch):
    """Counts Layout.dense and Layout.from_mask calls."""
    counts = {"dense": 0, "from_mask": 0}
    for name in counts:
        original = getattr(Layout, name).__func__

        def counted(cls, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(Layout, name, classmethod(counted))
    return counts


def test_compiled_dense_and_few_query_sites_build_their_layout_once(monkeypatch):
    torch.manual_seed(0)
    model = Model().eval()
    mask_fn = band  # layer 1 called with 4 queries: few (eager calls run SDPA with the token mask)
    sparse = fxsparse.transform(model, mask_fn)
    compiled = torch.compile(sparse, backend="eager")
    x, mem = torch.randn(2, 4, 32), torch.randn(2, 40, 32)
    want, _ = masked_forward(model, (x, mem), mask_fn)
    counts = _counting(monkeypatch)
    with torch.no_grad():
        assert_close(compiled(x, mem), want, what="first compiled call")
        first = dict(counts)
        for _ in range(2):
            assert_close(compiled(x, mem), want, what="later compiled call")
    assert first["dense"] >= 1 and first["from_mask"] >= 1  # the first call built both kernel layouts
    assert counts == first, f"later calls built layouts again: {first} after the first call, {counts} after three"
    statuses = sorted(s.status for s in site_modules(sparse))
    assert statuses == ["dense", "rewritten"]


def test_eager_site_reuses_its_layout_and_follows_new_tables():
    torch.manual_seed(0)
    model = Model().eval()
    mask_fn = band
    sparse = fxsparse.transform(model, mask_fn)
    x, mem = torch.randn(2, 80, 32), torch.randn(2, 80, 32)
    want, _ = masked_forward(model, (x, mem), mask_fn)
    with torch.no_grad():
        assert_close(sparse(x, mem), want, what="first call")
        site = next(s for s in site_modules(sparse) if s.status == "rewritten")
        q = torch.randn(2, 4, 80, 8)
        first = site.kernel_layout_for(q, q, q)
        assert site.kernel_layout_for(q, q, q) is first  # made once, not per call
        name = next(n for n, _ in site.named_buffers())
        setattr(site, name, getattr(site, name).clone())  # what .to(device) does: new tables
        again = site.kernel_layout_for(q, q, q)
        assert again is not first and again.data is getattr(site, name)
        assert_close(sparse(x, mem), want, what="call after the tables moved")
