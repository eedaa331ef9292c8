"""Sites that mask_fn keeps dense (None) reproduce the original model, with its own bias and causality."""
import math

import torch
from torch import nn

import fxsparse
from fxsparse.testing import assert_close


class BiasedCausal(nn.Module):
    """Manual attention with a learned relative bias and a causal tril buffer (nanoGPT-style)."""

    def __init__(self, dim=32, heads=2, n=24):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel = nn.Parameter(torch.randn(heads, n, n))
        self.register_buffer("tril", torch.ones(n, n).tril().view(1, 1, n, n))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1]) + self.rel[:, :n, :n]
        att = att.masked_fill(self.tril[:, :, :n, :n] == 0, float("-inf"))
        return (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


def test_dense_site_matches_the_original_with_bias_and_causal():
    torch.manual_seed(0)
    model = BiasedCausal().eval()
    x = torch.randn(2, 24, 32)
    sparse = fxsparse.transform(model, lambda site: None)
    with torch.no_grad():
        assert_close(sparse(x), model(x), what="dense site")
    [row] = fxsparse.report(sparse).rows
    assert row.status == "dense"
    # and it still trains: gradients reach the bias through the dense path
    sparse(x).sum().backward()
    assert sparse.rel.grad is not None and sparse.rel.grad.abs().sum() > 0
