"""The oracle (fxsparse.testing.MaskedAttention) against attention written out query by query in Python."""
import math

import pytest
import torch
import torch.nn.functional as F

from fxsparse.testing import MaskedAttention


def loop_attention(q, k, v, allowed, scale, bias=None):
    """q [B, H, Lq, D], k/v [B, H, Lk, D], allowed(b, h, i, j) -> bool. Float64, row by row."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                js = [j for j in range(Lk) if allowed(b, h, i, j)]
                if not js:
                    continue
                s = [float(q[b, h, i].double() @ k[b, h, j].double()) * scale
                     + (0.0 if bias is None else float(bias.expand(B, H, Lq, Lk)[b, h, i, j]))
                     for j in js]
                top = max(s)
                w = [math.exp(x - top) for x in s]
                out[b, h, i] = sum(wj / sum(w) * v[b, h, j].double() for wj, j in zip(w, js))
    return out


class HandWritten(torch.nn.Module):
    """Attention spelled out: scale on q, additive bias, Tensor.softmax."""

    def forward(self, q, k, v, bias):
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        attn = attn + bias
        return attn.softmax(dim=-1) @ v


def qkv(B=2, H=3, Lq=7, Lk=7, D=8, Hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hkv = H if Hkv is None else Hkv
    return (torch.randn(B, H, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g),
            torch.randn(B, Hkv, Lk, D, generator=g))


def band(site):
    i = torch.arange(site.q_len)[:, None]
    j = torch.arange(site.kv_len)[None, :]
    return (i - j).abs() <= 1


def test_softmax_path_against_loops():
    q, k, v = qkv()
    bias = torch.randn(1, 3, 7, 7)
    model = HandWritten()
    with MaskedAttention(band, model) as oracle:
        got = model(q, k, v, bias)
    want = loop_attention(q, k, v, lambda b, h, i, j: abs(i - j) <= 1, 8 ** -0.5, bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert [(s.index, s.name, s.kind, s.num_heads, s.q_len, s.kv_len) for s in oracle.sites] == \
        [(0, "", "softmax", 3, 7, 7)]
    # without a mask the oracle is the model itself
    with MaskedAttention(None, model):
        torch.testing.assert_close(model(q, k, v, bias), HandWritten()(q, k, v, bias))


def test_per_head_mask_and_empty_rows():
    q, k, v = qkv(H=2, Lq=5, Lk=6)
    per_head = torch.stack([torch.ones(5, 6, dtype=torch.bool),
                            torch.ones(5, 6, dtype=torch.bool).triu(2)])   # row 4 of head 1: empty
    with MaskedAttention(lambda s: per_head):
        got = HandWritten()(q, k, v, torch.zeros(()))
    want = loop_attention(q, k, v, lambda b, h, i, j: bool(per_head[h, i, j]), 8 ** -0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got[:, 1, 4] == 0).all() and not got.isnan().any()


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_against_loops(causal):
    q, k, v = qkv(H=4, Hkv=2, Lq=5, Lk=9)
    keep = torch.rand(2, 1, 1, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True
    with MaskedAttention(band) as oracle:
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal,
                                             scale=0.3, enable_gqa=True)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    want = loop_attention(q, kk, vv, lambda b, h, i, j: abs(i - j) <= 1 and bool(keep[b, 0, 0, j])
                          and (not causal or j <= i), 0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert [(s.kind, s.num_heads, s.q_len, s.kv_len) for s in oracle.sites] == [("sdpa", 4, 5, 9)]


def test_multihead_attention_against_module_and_loops():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    parent = torch.nn.Sequential()
    parent.add_module("attn", mha)
    x = torch.randn(2, 6, 16)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])      # True = padding
    with torch.no_grad():
        plain, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
        with MaskedAttention(None, parent) as oracle:
            same, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
        torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
        assert [(s.name, s.kind, s.num_heads) for s in oracle.sites] == [("attn", "mha", 4)]

        with MaskedAttention(band, parent):
            got, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
        qw, kw, vw = mha.in_proj_weight.chunk(3)
        qb, kb, vb = mha.in_proj_bias.chunk(3)
        split = lambda t: t.reshape(2, 6, 4, 4).transpose(1, 2)
        heads = loop_attention(split(x @ qw.T + qb), split(x @ kw.T + kb), split(x @ vw.T + vb),
                               lambda b, h, i, j: abs(i - j) <= 1 and not pad[b, j], 0.5)
        want = heads.transpose(1, 2).reshape(2, 6, 16) @ mha.out_proj.weight.double().T \
            + mha.out_proj.bias.double()
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_other_softmaxes_pass_through():
    x = torch.randn(4, 5, 6)
    with MaskedAttention(lambda s: torch.zeros(s.q_len, s.kv_len, dtype=torch.bool)) as oracle:
        a = x.softmax(dim=1)                   # not the last axis
        b = torch.randn(3, 5).softmax(-1)      # 2-D: a classifier, not attention scores
    torch.testing.assert_close(a, torch.softmax(x, 1))
    assert b.shape == (3, 5) and oracle.sites == []


def test_float64_and_dtype_argument():
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64) * 30
    with MaskedAttention(lambda s: torch.ones(3, 4, dtype=torch.bool)):
        out = F.softmax(x, dim=-1, dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.softmax(x, -1).float())
