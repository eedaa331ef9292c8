"""Matching by graph shape: spellings that are attention, traps that are not, and the errors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxsparse
from fxsparse import patterns
from fxsparse.testing import assert_close
from helpers import check_model


def sites(model, *args, mask_fn=patterns.dense()):
    sparse = fxsparse.transform(model, mask_fn)
    if args:
        with torch.no_grad():
            sparse(*args)
    return [(r.name, r.pattern.split(" ")[0], r.status) for r in fxsparse.report(sparse).rows]


class Heads(nn.Module):
    """q, k, v as [B, H, N, D] from one fused Linear."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.h = heads

    def forward(self, x):
        B, N, C = x.shape
        return self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4).unbind(0)


# ------------------------------------------------------------------------------ spellings
class BmmAttention(nn.Module):
    """3-D [B*H, N, D] attention with bmm, scale on q by division, nn.Softmax and casts."""

    def __init__(self):
        super().__init__()
        self.heads = Heads()
        self.softmax = nn.Softmax(dim=2)

    def forward(self, x):
        q, k, v = self.heads(x)
        B, H, N, D = q.shape
        q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
        w = torch.bmm(q / math.sqrt(D), k.transpose(1, 2)).float()
        p = self.softmax(w).type_as(v)
        return torch.bmm(p, v).reshape(B, H, N, D)


class WhereMaskAttention(nn.Module):
    """`torch.where(mask, scores, finfo.min)` then a scale after the mask (scales the bias too)."""

    def __init__(self):
        super().__init__()
        self.heads = Heads()

    def forward(self, x, keep):
        q, k, v = self.heads(x)
        s = torch.matmul(q, k.transpose(-2, -1))
        s = torch.where(keep[:, None, None, :], s, -1e9) / 4.0
        return torch.matmul(s.softmax(dim=-1), v)


def test_bmm_nn_softmax_and_casts():
    torch.manual_seed(0)
    # nn.Softmax(dim=2) on 3-D scores is the last axis only once shapes are known
    check_model(BmmAttention().eval(), (torch.randn(2, 19, 64),), patterns.sliding_window(2),
                kinds=["matmul-softmax"], names=[""], example_inputs=True)


def test_where_mask_then_scale():
    torch.manual_seed(0)
    keep = torch.ones(2, 15, dtype=torch.bool)
    keep[0, -4:] = False
    check_model(WhereMaskAttention().eval(), (torch.randn(2, 15, 64), keep), patterns.sliding_window(2),
                kinds=["matmul-softmax"])


def test_mask_fn_may_return_a_layout_or_per_head_masks():
    torch.manual_seed(0)
    model = WhereMaskAttention().eval()
    args = (torch.randn(2, 15, 64), torch.ones(2, 15, dtype=torch.bool))
    per_head = torch.rand(4, 15, 15, generator=torch.Generator().manual_seed(0)) > 0.5
    per_head[:, torch.arange(15), torch.arange(15)] = True
    a = fxsparse.transform(model, lambda s: per_head)
    b = fxsparse.transform(model, lambda s: fxsparse.Layout.from_mask(per_head))
    with torch.no_grad():
        assert_close(a(*args), b(*args))


# ------------------------------------------------------------------------------ traps
class MoE(nn.Module):
    """softmax between two matmuls against parameters: a gate, not attention."""

    def __init__(self):
        super().__init__()
        self.router = nn.Parameter(torch.randn(64, 8))
        self.experts = nn.Parameter(torch.randn(8, 64))

    def forward(self, x):
        gate = torch.softmax(x @ self.router, dim=-1)
        return gate @ self.experts


class QueryAxisSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = Heads()

    def forward(self, x):
        q, k, v = self.heads(x)
        return (q @ k.transpose(-2, -1)).softmax(dim=-2) @ v


class TransposedProbs(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = Heads()

    def forward(self, x):
        q, k, v = self.heads(x)
        p = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return p.transpose(-2, -1) @ v


class ReturnsWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = Heads()

    def forward(self, x):
        q, k, v = self.heads(x)
        p = (q @ k.transpose(-2, -1) * 0.25).softmax(dim=-1)
        return p @ v, p


def test_a_gate_is_not_attention():
    torch.manual_seed(0)
    model = MoE().eval()
    x = torch.randn(2, 10, 64)
    sparse = fxsparse.transform(model, patterns.dense())
    assert fxsparse.report(sparse).rows == []
    with torch.no_grad():
        assert torch.equal(sparse(x), model(x))


@pytest.mark.parametrize("trap, words", [(QueryAxisSoftmax, "not over the keys"),
                                         (TransposedProbs, "contracts over the queries")],
                         ids=lambda c: getattr(c, "__name__", ""))
def test_softmax_over_a_product_that_is_not_attention_over_keys_is_reported(trap, words):
    """Not rewritten, and not silent either: the report says what it saw."""
    torch.manual_seed(0)
    model = trap().eval()
    x = torch.randn(2, 10, 64)
    sparse = fxsparse.transform(model, patterns.dense())
    [row] = fxsparse.report(sparse).rows
    assert row.status == "skipped" and words in row.reason
    with torch.no_grad():
        assert torch.equal(sparse(x), model(x))


def test_attention_whose_weights_are_used_is_skipped():
    model = ReturnsWeights().eval()
    assert sites(model) == [("", "matmul-softmax", "skipped")]
    row = fxsparse.report(fxsparse.transform(model, patterns.dense())).rows[0]
    assert "also used" in row.reason


def test_timm_attention_dropout_in_training_mode_is_skipped():
    import timm

    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1,
                                                         num_heads=4, attn_drop_rate=0.1).train()
    for fused in (False, True):
        m.blocks[0].attn.fused_attn = fused
        rows = fxsparse.report(fxsparse.transform(m, patterns.dense())).rows
        assert [(r.name, r.status) for r in rows] == [("blocks.0.attn", "skipped")]
        assert "p=0.1" in rows[0].reason


# ------------------------------------------------------------------------------ errors
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = QueryAxisSoftmax()
        self.heads = Heads()

    def forward(self, x):
        q, k, v = self.heads(x)
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("bad,message", [
    (lambda s: torch.ones(1, 5, 5, dtype=torch.bool),
     r"^\(root\): mask_fn: a bool mask of shape \(1, 5, 5\) does not broadcast to \[batch 1, heads 4 or 1, 12, 12\]"),
    (lambda s: torch.ones(12, 12), r"^\(root\): mask_fn: a mask must be bool .* got a tensor of torch.float32"),
    (lambda s: torch.ones(3, 12, 12, dtype=torch.bool), r"^\(root\): .*shape \(3, 12, 12\)"),
    (lambda s: 1 / 0, r"mask_fn raised ZeroDivisionError"),
    (lambda s: "local", r"^\(root\): mask_fn: expected None, a bool tensor, .* got str"),
])
def test_bad_mask_fn_names_the_site(bad, message):
    sparse = fxsparse.transform(Block().eval(), bad)
    with pytest.raises(ValueError, match=message):
        sparse(torch.randn(2, 12, 64))


def test_transform_twice_is_refused():
    sparse = fxsparse.transform(Block().eval(), patterns.dense())
    with pytest.raises(ValueError, match="already transformed"):
        fxsparse.transform(sparse, patterns.dense())


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = Heads()

    def forward(self, x):
        if x.shape[1] > 8:   # Python control flow on a shape: torch.fx cannot trace it
            x = x * 2
        q, k, v = self.heads(x)
        return F.scaled_dot_product_attention(q, k, v)


def test_untraceable_model():
    model = Untraceable().eval()
    with pytest.raises(RuntimeError, match="example_inputs=.*fxsparse.backend"):
        fxsparse.transform(model, patterns.dense())
    x = torch.randn(2, 12, 64)
    sparse = fxsparse.transform(model, patterns.sliding_window(2), example_inputs=(x,))   # torch.export
    assert [r.pattern.split(" ")[0] for r in fxsparse.report(sparse).rows] == ["sdpa"]
    sparse.load_state_dict(model.state_dict(), strict=True)


# ------------------------------------------------------------------------------ the result
def test_dtype_device_and_compile():
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 12, 64)
    sparse = fxsparse.transform(model, patterns.sliding_window(2))
    with torch.no_grad():
        want = sparse(x)
        compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)
        assert_close(compiled(x), want, 1e-6, "compiled")
        other = fxsparse.transform(Block().eval(), patterns.sliding_window(2)).to(torch.float64)
        other.load_state_dict(model.state_dict())
        assert_close(other(x.double()), want, 1e-5, "float64")


# ------------------------------------------------------------------------------ spellings Dynamo and export record
def _backend_rows(model, *args, mask_fn=None):
    torch._dynamo.reset()
    be = fxsparse.backend(mask_fn or (lambda s: torch.ones(s.q_len, s.kv_len, dtype=torch.bool)), compiler="eager")
    with torch.no_grad():
        out = torch.compile(model, backend=be)(*args)
    return out, fxsparse.report(be).rows


class InPlaceScale(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        s /= 4.0
        return s.softmax(-1) @ v


class BmmViews(nn.Module):
    """bmm-layout scores viewed per head for a per-head bias, and back for ·v (BLOOM, DeBERTa)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 4, 16, 16))

    def forward(self, q, k, v):
        p = ((torch.bmm(q, k.transpose(1, 2)) * 0.25).view(1, 4, 16, 16) + self.bias).softmax(-1)
        return torch.bmm(p.view(4, 16, 16), v)


class Baddbmm(nn.Module):
    def forward(self, alibi, q, k, v):
        s = alibi.baddbmm(batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=0.25)
        return torch.bmm(s.softmax(-1), v)


class SoftCap(nn.Module):
    def forward(self, q, k, v):
        s = torch.tanh(q @ k.transpose(-1, -2) / 50.0) * 50.0
        return s.softmax(-1) @ v


class LearnedQuery(nn.Module):
    """A pooling head: the queries are parameters (SigLIP, Perceiver)."""

    def __init__(self):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(4, 3, 16))

    def forward(self, k, v):
        return (self.probe @ k.transpose(-1, -2) * 0.25).softmax(-1) @ v


def _qkv(*shape):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=g) for _ in range(3))


@pytest.mark.parametrize("model, args", [
    (InPlaceScale(), _qkv(2, 4, 16, 16)),
    (BmmViews(), _qkv(4, 16, 16)),
    (Baddbmm(), (torch.randn(4, 1, 16),) + _qkv(4, 16, 16)),
    (LearnedQuery(), _qkv(2, 4, 16, 16)[:2]),
], ids=["in-place", "bmm-views", "baddbmm", "learned-query"])
def test_backend_rewrites_other_spellings_exactly(model, args):
    with torch.no_grad():
        want = model(*args)
    got, rows = _backend_rows(model, *args)
    assert [r.status for r in rows] == ["rewritten"]
    assert_close(got, want)
    # and the mask is applied: a diagonal mask gives v itself where the site keeps one key per query
    got, _ = _backend_rows(model, *args, mask_fn=lambda s: torch.eye(s.q_len, s.kv_len, dtype=torch.bool))
    assert (got - want).abs().max() > 1e-3


def test_learned_query_role():
    _, [row] = _backend_rows(LearnedQuery(), *_qkv(2, 4, 16, 16)[:2])
    assert row.site.role == "learned-query"


def test_soft_cap_is_reported_skipped_and_left_working():
    args = _qkv(2, 4, 16, 16)
    with torch.no_grad():
        want = SoftCap()(*args)
    got, [row] = _backend_rows(SoftCap(), *args)
    assert row.status == "skipped" and "soft cap" in row.reason
    assert torch.equal(got, want)


def _encoder_layer(train: bool):
    """An nn.TransformerEncoderLayer without dropout in that mode, an input, and its output."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).train(train)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        return layer, x, layer(x)


def test_multihead_attention_found_by_the_backend():
    """Dynamo inlines nn.MultiheadAttention into F.multi_head_attention_forward (training mode with
    no dropout: in eval mode the layer takes PyTorch's fused fast path, which has no attention to find)."""
    layer, x, want = _encoder_layer(train=True)
    got, rows = _backend_rows(layer, x)
    assert [(r.status, r.site.role) for r in rows] == [("rewritten", "self")]
    assert_close(got, want)


def test_fused_fast_path_under_the_backend_is_reported():
    """In eval mode without gradients Dynamo traces nn.TransformerEncoderLayer's fused fast path: one
    kernel, its attention out of reach. It is reported skipped with what to do, not missed silently; with
    the fast path off the same layer is rewritten."""
    layer, x, want = _encoder_layer(train=False)
    got, rows = _backend_rows(layer, x)
    assert [(r.status, r.site.kind) for r in rows] == [("skipped", "fused fast path")]
    assert "set_fastpath_enabled(False)" in rows[0].reason
    assert_close(got, want)
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        got, rows = _backend_rows(layer, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
    assert [(r.status, r.site.role) for r in rows] == [("rewritten", "self")]
    assert_close(got, want)


class AddsANumber(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * 0.25 + 0.0).softmax(-1) @ v


@pytest.mark.parametrize("door", ["transform", "backend"])
def test_a_python_number_added_to_the_scores_is_dropped(door):
    """It shifts every score of a row alike, which the softmax ignores."""
    args = _qkv(2, 4, 16, 16)
    with torch.no_grad():
        want = AddsANumber()(*args)
    band = lambda s: patterns.sliding_window_mask(s.q_len, s.kv_len, window=1)  # noqa: E731
    if door == "transform":
        sparse = fxsparse.transform(AddsANumber(), band)
        with torch.no_grad():
            got = sparse(*args)
        rows = fxsparse.report(sparse).rows
    else:
        got, rows = _backend_rows(AddsANumber(), *args, mask_fn=band)
    assert [r.status for r in rows] == ["rewritten"]
    keep = patterns.sliding_window_mask(16, 16, window=1)
    q, k, v = (t.double() for t in args)
    oracle = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~keep, float("-inf")).softmax(-1) @ v
    assert_close(got, oracle)
    assert (oracle - want.double()).abs().max() > 1e-2


# ------------------------------------------------------------------------------ roles and what the patterns take
class ChannelAttention(nn.Module):
    """XCiT's cross-covariance attention: the softmax runs over channels; the head dim is the token count."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.h = heads

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 4, 1).unbind(0)  # [B, H, D, N]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return (attn @ v).permute(0, 3, 1, 2).reshape(B, N, C)


def _one_site(model, x, mask_fn):
    """(output, the report's one row) of model transformed with x as example input: roles such as
    "channel" and "pooled" need shapes (the backend always has them)."""
    sparse = fxsparse.transform(model, mask_fn, example_inputs=(x,))
    with torch.no_grad():
        out = sparse(x)
    [row] = fxsparse.report(sparse).rows
    return out, row


def _all_true(site):
    return torch.ones(site.q_len, site.kv_len, dtype=torch.bool)


@pytest.mark.parametrize("make, tokens, role, lengths", [
    (lambda: ChannelAttention(), 12, "channel", "16×16"),  # 16 channels a head; the head dim is the 12 tokens
    (lambda: PooledMViT(), 17, "pooled", "17×5"),  # a class token and 4x4 patches; keys pooled to 2x2
], ids=["channel", "pooled"])
def test_sites_that_are_not_self_attention_are_rewritten_and_the_patterns_keep_them_dense(make, tokens, role, lengths):
    if role == "pooled":
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, tokens, 32)
    with torch.no_grad():
        want = model(x)
    got, row = _one_site(model, x, _all_true)
    assert_close(got, want)
    assert (row.status, row.site.role, row.lengths) == ("rewritten", role, lengths)

    got, row = _one_site(model, x, patterns.sliding_window(1, block_size=32))
    assert_close(got, want)
    assert row.status == "dense" and f"{role} attention" in row.reason


def test_channel_attention_over_more_tokens_than_the_op_takes_is_reported():
    torch.manual_seed(0)
    model = ChannelAttention().eval()
    x = torch.randn(1, 300, 32)
    got, row = _one_site(model, x, _all_true)
    assert row.status == "skipped" and "300 tokens" in row.reason and "head dim limit of 256" in row.reason
    with torch.no_grad():
        assert torch.equal(got, model(x))


class PooledMViT(nn.Module):
    """timm's MViTv2 attention: keys pooled by a strided conv, relative positions added by `cal_rel_pos_type`."""

    def __init__(self):
        super().__init__()
        from timm.models.mvitv2 import MultiScaleAttention

        self.attn = MultiScaleAttention(32, 32, (4, 4), num_heads=2, kernel_q=(3, 3), kernel_kv=(3, 3),
                                        stride_kv=(2, 2))
        with torch.no_grad():
            self.attn.rel_pos_h.normal_()
            self.attn.rel_pos_w.normal_()

    def forward(self, x):
        return self.attn(x, [4, 4])[0]


def test_a_known_bias_function_is_replayed_on_zero_scores():
    """MViTv2's relative positions (cal_rel_pos_type) stay in force: the rewritten model equals the
    original, and differs from it once the position tables are zero."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = PooledMViT().eval()
    x = torch.randn(2, 17, 32)
    got, row = _one_site(model, x, _all_true)
    assert row.status == "rewritten" and row.site.has_bias
    with torch.no_grad():
        assert_close(got, model(x))
        bare = PooledMViT().eval()
        bare.load_state_dict(model.state_dict())
        bare.attn.rel_pos_h.zero_()
        bare.attn.rel_pos_w.zero_()
        assert (bare(x) - got).abs().max() > 1e-2


@torch.fx.wrap
def _adds_a_ramp(attn):
    attn[..., 1:] = attn[..., 1:] + torch.linspace(0, 1, attn.shape[-1] - 1)
    return attn


class UnknownFunction(nn.Module):
    def forward(self, q, k, v):
        return _adds_a_ramp(q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v


def test_a_function_outside_the_table_is_reported_not_assumed_additive():
    args = _qkv(2, 4, 16, 16)
    sparse = fxsparse.transform(UnknownFunction(), patterns.dense())
    [row] = fxsparse.report(sparse).rows
    assert row.status == "skipped" and "_adds_a_ramp" in row.reason
    with torch.no_grad():
        assert torch.equal(sparse(*args), UnknownFunction()(*args))


class ValueTimesTransposedProbs(nn.Module):
    """EfficientViT's spelling: channels-first q, k, v [B, D, N]; `v @ attn.transpose(-2, -1)`."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(16, 16))

    def forward(self, q, k, v):
        attn = (q.transpose(-2, -1) @ k) * 0.25 + self.bias
        return v @ attn.softmax(dim=-1).transpose(-2, -1)


@pytest.mark.parametrize("door", ["transform", "backend"])
def test_value_times_transposed_probabilities(door):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g), torch.randn(2, 24, 16, generator=g)
    model = ValueTimesTransposedProbs()
    eye = lambda s: torch.eye(s.q_len, s.kv_len, dtype=torch.bool)  # noqa: E731
    with torch.no_grad():
        want = model(q, k, v)
    if door == "transform":
        outs = []
        for fn in (patterns.dense(), eye):
            sparse = fxsparse.transform(model, fn)
            with torch.no_grad():
                outs.append(sparse(q, k, v))
            assert [r.status for r in fxsparse.report(sparse).rows] == ["rewritten"]
        got, diagonal = outs
    else:
        got, rows = _backend_rows(model, q, k, v)
        assert [r.status for r in rows] == ["rewritten"]
        diagonal, _ = _backend_rows(model, q, k, v, mask_fn=eye)
    assert_close(got, want)
    assert_close(diagonal, v)  # one key per query: each query's output is its own value column


def test_a_slice_assigned_a_term_is_a_bias_under_the_backend():
    """Dynamo traces into MViTv2's `cal_rel_pos_type`: `s[idx] = s[idx].view(..) + rel_h + rel_w` is a
    term added into a slice of the scores, replayed on zero scores as the bias."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = PooledMViT().eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        want = model(x)
    got, [row] = _backend_rows(model, x)
    assert (row.status, row.site.role, row.site.has_bias) == ("rewritten", "pooled", True)
    assert_close(got, want)
    diagonal, _ = _backend_rows(model, x, mask_fn=lambda s: torch.eye(s.q_len, s.kv_len, dtype=torch.bool))
    assert (diagonal - want).abs().max() > 1e-2


# ------------------------------------------------------------------------------ deferred scores
class _Deferring(torch.overrides.TorchFunctionMode):
    """Runs code with its scores deferred (fxsparse.deferred), attention computed densely in float64."""

    def __init__(self):
        super().__init__()
        self.attentions = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from fxsparse import deferred

        kwargs = kwargs or {}
        out = deferred.handle(func, args, kwargs, self._attention)
        return func(*args, **kwargs) if out is NotImplemented else out

    def _attention(self, q, k, v, bias, scale):
        self.attentions += 1
        with torch._C.DisableTorchFunction():
            s = (q.double() @ k.double().transpose(-2, -1)) * scale
            s = s if bias is None else s + bias.double()
            return (s.softmax(-1) @ v.double()).to(v.dtype)


def _write_into_slice(q, k, v, rel):
    s = q @ k.transpose(-2, -1) * 0.25
    s[..., 1:, 1:] = s[..., 1:, 1:] + rel  # MViTv2's way of adding its relative positions
    return s.softmax(-1) @ v


def _value_times_transposed(q, k, v, rel):
    attn = (q @ k.transpose(-2, -1) * 0.25 + rel).softmax(-1)
    return (v.transpose(-2, -1) @ attn.transpose(-2, -1)).transpose(-2, -1)  # v [B, H, D, N] @ pᵀ


@pytest.mark.parametrize("fn, rel_shape", [(_write_into_slice, (15, 15)), (_value_times_transposed, (16, 16))],
                         ids=["slice-written", "v-times-transposed-probs"])
def test_deferred_scores_keep_writes_and_take_transposed_probabilities(fn, rel_shape):
    """Code run with its scores deferred: a slice written into the scores stays in force (kept as their
    bias) and `v @ pᵀ` is an attention, both equal to the code run as it is."""
    q, k, v = _qkv(2, 4, 16, 8)
    rel = torch.randn(*rel_shape, generator=torch.Generator().manual_seed(1))
    want = fn(q, k, v, rel)
    mode = _Deferring()
    with mode:
        got = fn(q, k, v, rel)
    assert mode.attentions == 1
    assert_close(got, want)
