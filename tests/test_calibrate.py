"""fxsparse.calibrate: block maps learned from the attention a model actually computes."""
import math

import timm
import torch
from torch import nn

import fxsparse
from fxsparse.calibrate import block_mass
from fxsparse.site import site_modules
from helpers import assert_unchanged, snapshot


class LocalAttention(nn.Module):
    """Attention whose scores peak on the diagonal: q and k carry the same positional features
    (cos, sin of the token index), large enough that each token attends to a few dozen neighbours;
    the learned projections only add small noise."""

    def __init__(self, dim=32, heads=2, sharpness=400.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        for lin in (self.q, self.k):
            nn.init.normal_(lin.weight, std=0.01)
            nn.init.zeros_(lin.bias)
        self.amplitude = math.sqrt(sharpness * math.sqrt(self.head_dim))  # q·k * scale = sharpness * cos(Δθ)

    def positions(self, n):
        angle = torch.arange(n, dtype=torch.float32) * (math.pi / 512)
        pos = torch.stack([angle.cos(), angle.sin()], -1) * self.amplitude
        return nn.functional.pad(pos, (0, self.head_dim - 2))

    def qkv(self, x):
        b, n, _ = x.shape
        heads = lambda t: t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        pos = self.positions(n)
        return heads(self.q(x)) + pos, heads(self.k(x)) + pos, heads(self.v(x))

    def forward(self, x):
        q, k, v = self.qkv(x)
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        out = attn.softmax(dim=-1) @ v
        return out.transpose(1, 2).flatten(2)


def local_model():
    torch.manual_seed(0)
    return LocalAttention().eval()


def tokens(n, batch=2, seed=1):
    return torch.randn(batch, n, 32, generator=torch.Generator().manual_seed(seed))


def test_local_attention_keeps_the_band_and_matches_dense():
    model = local_model()
    x = tokens(512)
    before = snapshot(model)
    mask_fn = fxsparse.calibrate(model, [(x,), (tokens(512, seed=2),)], density=0.2, block_size=32)
    assert repr(mask_fn) == "calibrated(density=0.2, block_size=32, sites=1)"
    assert_unchanged(model, before)
    assert not hasattr(model, "recorder")

    (key, keep), = mask_fn.blocks.items()
    assert key == ("", 0, 512, 512) and keep.shape == (1, 16, 16)
    a, b = torch.arange(16)[:, None], torch.arange(16)[None, :]
    band = (a - b).abs() <= 1
    assert keep[0][band].all(), "the diagonal neighbourhood is kept"
    assert abs(keep.float().mean().item() - 0.2) < 0.02
    assert mask_fn.coverage[""] > 0.9

    sparse = fxsparse.transform(model, mask_fn, example_inputs=(x,))
    (row,) = fxsparse.report(sparse).rows
    assert row.status == "rewritten" and row.block == 32 and abs(row.density - 0.2) < 0.02
    with torch.no_grad():
        got, want = sparse(x), model(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # an independent float64 reference: the layout's token mask applied to the module's own q, k, v
    layout = mask_fn(site_modules(sparse)[0].site)
    mask = layout.to_mask()[0, 0]
    m64 = local_model().double()
    with torch.no_grad():
        q, k, v = m64.qkv(x.double())
    scores = (q @ k.transpose(-2, -1)) * m64.head_dim ** -0.5
    ref = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(1, 2).flatten(2)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_length_not_seen_stays_dense():
    model = local_model()
    mask_fn = fxsparse.calibrate(model, [(tokens(256),)], density=0.3, block_size=32)
    sparse = fxsparse.transform(model, mask_fn)
    with torch.no_grad():
        sparse(tokens(256))
        assert fxsparse.report(sparse).rows[0].status == "rewritten"
        x = tokens(192)
        torch.testing.assert_close(sparse(x), model(x))
    assert fxsparse.report(sparse).rows[0].status == "dense"


def test_vit_end_to_end():
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10).eval()  # 257 tokens
    images = [(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    before = snapshot(model)
    mask_fn = fxsparse.calibrate(model, images, density=0.3, block_size=32, per_head=True)
    assert_unchanged(model, before)
    assert set(mask_fn.coverage) == {"blocks.0.attn", "blocks.1.attn"}
    assert all(0.3 < c <= 1.0 for c in mask_fn.coverage.values())
    for keep in mask_fn.blocks.values():
        assert keep.shape == (4, 9, 9)
        assert keep.diagonal(dim1=-2, dim2=-1).all()
        assert abs(keep.float().mean().item() - 0.3) < 0.05

    sparse = fxsparse.transform(model, mask_fn, example_inputs=images[0])
    rows = fxsparse.report(sparse).rows
    assert [(r.name, r.status, r.block) for r in rows] == [("blocks.0.attn", "rewritten", 32),
                                                          ("blocks.1.attn", "rewritten", 32)]
    assert all(abs(r.density - 0.3) < 0.1 for r in rows), [r.density for r in rows]
    with torch.no_grad():
        out = sparse(*images[0])
    assert out.shape == (2, 10) and out.isfinite().all()
    assert_unchanged(model, before)


def test_block_mass_matches_the_whole_softmax():
    """Chunked, with bias, causality and grouped-query heads: the same as one dense softmax."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 100, 8, generator=g), torch.randn(2, 2, 70, 8, generator=g)
    bias = torch.randn(1, 4, 100, 70, generator=g)
    got = block_mass(q, k, bias, 0.5, True, 32, max_elements=1)  # one query block at a time
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.5 + bias
    scores = scores.masked_fill(torch.ones(100, 70, dtype=torch.bool).tril().logical_not(), float("-inf"))
    probs = torch.nn.functional.pad(scores.softmax(-1), (0, 26, 0, 28))
    want = probs.reshape(2, 4, 4, 32, 3, 32).sum((0, 3, 5))
    torch.testing.assert_close(got, want)
    assert torch.allclose(got.sum((-1, -2)), torch.full((4,), 200.0))


def test_calibrated_mask_fn_pickles_and_reports_density_reached(tmp_path):
    """The calibrated mask_fn is plain data: saved and loaded, it gives the same layouts; `reached` is
    the share of blocks kept, counted here from the block maps themselves."""
    import pickle

    model = local_model()
    x = tokens(256)
    mask_fn = fxsparse.calibrate(model, [(x,)], density=0.25, block_size=32)
    path = tmp_path / "calibrated.pt"
    torch.save(mask_fn, path)
    loaded = torch.load(path, weights_only=False)
    assert repr(loaded) == repr(mask_fn) and loaded.coverage == mask_fn.coverage
    assert pickle.loads(pickle.dumps(mask_fn)).blocks.keys() == mask_fn.blocks.keys()
    sparse = fxsparse.transform(model, loaded, example_inputs=(x,))
    site = site_modules(sparse)[0].site
    assert torch.equal(loaded(site).to_mask(), mask_fn(site).to_mask())
    (keep,) = mask_fn.blocks.values()
    assert mask_fn.reached == {"": keep.sum().item() / keep.numel()}
    assert abs(mask_fn.reached[""] - 0.25) < 0.02
    summary = mask_fn.summary()
    assert "asked 25.0%" in summary and f"{mask_fn.reached[''] * 100:.1f}% of blocks kept" in summary


def test_progress_bar_only_when_asked_or_interactive(capsys):
    model = local_model()
    batches = [(tokens(64, seed=i),) for i in range(3)]
    fxsparse.calibrate(model, batches, density=0.5, block_size=32)  # under pytest: silent
    assert capsys.readouterr().err == ""
    fxsparse.calibrate(model, batches, density=0.5, block_size=32, progress=True)
    err = capsys.readouterr().err
    assert "calibrate:" in err and "/3 " in err  # the bar over 3 batches
