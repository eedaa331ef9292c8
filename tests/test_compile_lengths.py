"""One compiled model, many sequence lengths, Dynamo's default settings: through
``fxsparse.backend`` and through ``torch.compile`` of a transformed model. Outputs equal the
masked original; gradients equal the eager transform's; at most two graphs per door."""
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.testing import assert_close, masked_forward

LENGTHS = (16, 20, 33, 40, 47, 64)


class Band:
    def __init__(self, width):
        self.width = width

    def __call__(self, site):
        q = torch.arange(site.kv_len - site.q_len, site.kv_len)[:, None]
        return (q - torch.arange(site.kv_len)[None, :]).abs() <= self.width


class Attention(nn.Module):
    def __init__(self, sdpa):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.sdpa = sdpa
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = self.drop((q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1)) @ v
        return out.transpose(1, 2).reshape(B, N, C)


class Model(nn.Module):
    def __init__(self, sdpa):
        super().__init__()
        self.layers = nn.ModuleList(Attention(sdpa) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.parametrize("door", ["backend", "transform"])
@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
def test_many_lengths_one_compiled_model(door, sdpa):
    torch.manual_seed(0)
    model = Model(sdpa).eval()
    eager = fxsparse.transform(model, Band(3))
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if door == "backend":
        compiled = torch.compile(model, backend=fxsparse.backend(Band(3), compiler="eager"))
    else:
        compiled = torch.compile(fxsparse.transform(model, Band(3)), backend="eager")
    for n in LENGTHS:
        x = torch.randn(2, n, 32, requires_grad=True)
        got = compiled(x)
        want, _ = masked_forward(model, (x,), Band(3))
        assert_close(got, want, what=f"{door}, {n} tokens")
        got.square().sum().backward()
        grad, x.grad = x.grad, None
        eager(x).square().sum().backward()
        assert_close(grad, x.grad, what=f"{door}, {n} tokens, gradient")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    print(f"{door}/{'sdpa' if sdpa else 'matmul'}: {graphs} graphs for {len(LENGTHS)} lengths")
    assert graphs <= (2 if door == "backend" else 4)
