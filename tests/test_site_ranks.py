"""Attention written on [N, D] or [B, W, H, N, D] tensors (not the op's [B, H, N, D]) is rewritten too."""
import pytest
import torch
from torch import nn

import fxsparse


class Plain(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-1, -2) / 4.0).softmax(-1) @ v


def _band(site):
    i = torch.arange(site.q_len)[:, None]
    return (i - torch.arange(site.kv_len)[None, :]).abs() <= 2


@pytest.mark.parametrize("shape", [(10, 16), (6, 10, 16), (2, 3, 2, 10, 16)], ids=["2d", "3d", "5d"])
def test_other_ranks_are_rewritten_exactly(shape):
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape) for _ in range(3))
    sparse = fxsparse.transform(Plain(), _band)
    got = sparse(q, k, v)
    keep = (torch.arange(10)[:, None] - torch.arange(10)[None, :]).abs() <= 2
    want = (q.double() @ k.double().transpose(-1, -2) / 4.0).masked_fill(~keep, float("-inf")).softmax(-1) @ v.double()
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert [r.status for r in fxsparse.report(sparse).rows] == ["rewritten"]


def test_errors_name_the_root_module():
    q = k = v = torch.randn(1, 2, 10, 16)
    sparse = fxsparse.transform(Plain(), lambda site: torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^\(root\): mask_fn: a bool mask of shape \(3, 3\)"):
        sparse(q, k, v)
