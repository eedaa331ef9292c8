"""fxsparse.transform on language-model attentions: nanoGPT (manual and flash), a Llama-style
block (RoPE, grouped-query heads through repeat_kv), cross-attention and einsum attention."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxsparse
from fxsparse import patterns
from fxsparse.owner import rewritten_code
from fxsparse.testing import assert_close
from helpers import check_model

WINDOW = patterns.sliding_window(3)


# ------------------------------------------------------------------------------ nanoGPT
class GPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: fused c_attn, tril buffer + masked_fill or is_causal."""

    def __init__(self, n_embd=64, n_head=4, block_size=32, flash=False):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(0.1)
        self.n_head, self.n_embd, self.flash = n_head, n_embd, flash
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.1 if self.training else 0,
                                               is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPT(nn.Module):
    def __init__(self, flash=False, n_layer=2):
        super().__init__()
        self.wte = nn.Embedding(50, 64)
        self.h = nn.ModuleList(GPTAttention(flash=flash) for _ in range(n_layer))
        self.lm_head = nn.Linear(64, 50, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = x + block(x)
        return self.lm_head(x)


def _tokens(n=20):
    return (torch.randint(0, 50, (2, n), generator=torch.Generator().manual_seed(1)),)


@pytest.mark.parametrize("flash", [False, True], ids=["manual", "flash"])
def test_nanogpt(flash):
    torch.manual_seed(0)
    model = GPT(flash=flash).eval()
    kind = "sdpa" if flash else "matmul-softmax"
    sparse = check_model(model, _tokens(), WINDOW, kinds=[kind] * 2, names=["h.0", "h.1"])
    sites = [mod.site for mod in sparse.modules() if isinstance(mod, fxsparse.site.SiteAttention)]
    assert all(s.causal and not s.has_bias for s in sites), "the tril buffer becomes causal=True"
    code = rewritten_code(sparse)
    assert "masked_fill" not in code and ".bias" not in code
    # a new length calls mask_fn again
    lengths = []
    sparse = fxsparse.transform(model, lambda s: lengths.append((s.q_len, s.kv_len)))
    with torch.no_grad():
        sparse(*_tokens(20))
        sparse(*_tokens(20))
        sparse(*_tokens(12))
    assert lengths == [(20, 20), (20, 20), (12, 12), (12, 12)]


def test_nanogpt_dropout_in_training_mode_is_skipped():
    torch.manual_seed(0)
    for flash in (False, True):
        model = GPT(flash=flash).train()
        sparse = fxsparse.transform(model, WINDOW)
        rows = fxsparse.report(sparse).rows
        assert [r.status for r in rows] == ["skipped", "skipped"]
        assert all("dropout" in r.reason for r in rows)
        assert "fxsparse_site" not in rewritten_code(sparse)


def test_rewritten_in_eval_mode_refuses_active_dropout_in_training():
    torch.manual_seed(0)
    sparse = fxsparse.transform(GPT().eval(), WINDOW)
    sparse.train()
    with pytest.raises(RuntimeError, match=r"h\.0: attention dropout p=0.1"):
        sparse(*_tokens())


# ------------------------------------------------------------------------------ Llama
def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x, n_rep):
    b, h, n, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


class LlamaAttention(nn.Module):
    def __init__(self, dim=64, n_heads=4, n_kv_heads=2, use_sdpa=False, interleave=False):
        super().__init__()
        self.hd, self.nh, self.nkv = dim // n_heads, n_heads, n_kv_heads
        self.q_proj = nn.Linear(dim, n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.use_sdpa, self.interleave = use_sdpa, interleave
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x, attention_mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        freqs = torch.arange(T, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        n_rep = self.nh // self.nkv
        if self.interleave:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        else:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        else:
            w = torch.matmul(q, k.transpose(2, 3)) * self.hd ** -0.5
            w = w + attention_mask
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            w = F.dropout(w, p=0.0, training=self.training)
            out = torch.matmul(w, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class LlamaModel(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.layers = nn.ModuleList(LlamaAttention(**kw) for _ in range(2))

    def forward(self, x):
        T = x.shape[1]
        causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
        for layer in self.layers:
            x = x + layer(x, causal)
        return x


@pytest.mark.parametrize("use_sdpa", [False, True], ids=["eager", "sdpa"])
@pytest.mark.parametrize("interleave", [False, True], ids=["repeat_kv", "repeat_interleave"])
def test_llama_rope_gqa(use_sdpa, interleave):
    torch.manual_seed(0)
    model = LlamaModel(use_sdpa=use_sdpa, interleave=interleave).eval()
    x = torch.randn(2, 24, 64)
    kind = "sdpa" if use_sdpa else "matmul-softmax"
    sparse = check_model(model, (x,), WINDOW, kinds=[kind] * 2, names=["layers.0", "layers.1"],
                         example_inputs=True)
    for row in fxsparse.report(sparse).rows:
        assert (row.site.num_heads, row.site.num_kv_heads, row.site.head_dim) == (4, 2, 16)
        assert row.site.has_bias and row.heads == "4/2kv×16"
    if not use_sdpa:  # the graph route (SDPA sites are redirected at run time, their k/v as the model made them)
        code = rewritten_code(sparse)
        assert "repeat_interleave" not in code and "expand" not in code, "k/v reach the op un-repeated"


# ------------------------------------------------------------------------------ cross-attention
class CrossAttention(nn.Module):
    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, N, C = x.shape
        q = self.to_q(x).reshape(B, N, self.heads, -1).permute(0, 2, 1, 3)
        k, v = self.to_kv(context).reshape(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        attn = attn.softmax(dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(B, N, C))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.cross = CrossAttention()

    def forward(self, x, memory):
        return self.cross(x, memory)


def test_cross_attention_q_len_differs_from_kv_len():
    torch.manual_seed(0)
    model = Decoder().eval()
    args = (torch.randn(2, 10, 64), torch.randn(2, 27, 64))
    # the patterns keep cross sites dense (positions of queries and keys do not correspond): a mask_fn of
    # one's own still applies a window there
    window = lambda site: patterns.sliding_window_mask(site.q_len, site.kv_len, window=4)  # noqa: E731
    sparse = check_model(model, args, window, kinds=["matmul-softmax"], names=["cross"])
    row = fxsparse.report(sparse).rows[0]
    assert (row.site.q_len, row.site.kv_len, row.site.role) == (10, 27, "cross")
    assert row.pattern == "matmul-softmax (q + fused kv)"
    assert fxsparse.report(fxsparse.transform(model, patterns.sliding_window(4))).rows[0].site.role == "cross"


# ------------------------------------------------------------------------------ einsum
class EinsumAttention(nn.Module):
    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, N, self.heads, -1) for t in (q, k, v))   # [b, n, h, d]
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * (C // self.heads) ** -0.5
        attn = scores.softmax(-1)
        out = torch.einsum("bhij,bjhd->bihd", attn, v)
        return self.proj(out.reshape(B, N, C))


def test_einsum_attention():
    torch.manual_seed(0)
    model = nn.Sequential(EinsumAttention(), EinsumAttention()).eval()
    sparse = check_model(model, (torch.randn(2, 21, 64),), WINDOW, kinds=["einsum"] * 2, names=["0", "1"])
    assert fxsparse.report(sparse).rows[0].pattern == "einsum (fused qkv)"


def test_backward_and_train_mode():
    torch.manual_seed(0)
    model = LlamaModel().train()
    x = torch.randn(2, 24, 64, requires_grad=True)
    sparse = fxsparse.transform(model, patterns.dense())
    sparse(x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in sparse.named_parameters()}
    gx = x.grad.clone()
    for p in model.parameters():
        p.grad = None
    x.grad = None
    model(x).square().sum().backward()
    assert_close(gx, x.grad, 1e-4, "dx")
    for n, p in model.named_parameters():
        assert_close(want[n], p.grad, 1e-4, n)
