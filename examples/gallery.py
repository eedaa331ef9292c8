"""The README's gallery: four layouts drawn by ``fxsparse.plot`` into docs/gallery.png.

    python examples/gallery.py [PATH]

1. a ViT at 224 px (CLS + 14x14 patches): 2-D local window, CLS global, 32-token blocks;
2. a causal sliding window of 64 tokens over 512, 32-token blocks;
3. BigBird (window of 3 blocks, 2 random blocks a row, 1 global block), 32-token blocks;
4. a calibrated layout: ``fxsparse.calibrate`` on a toy attention whose scores fall off with distance
   (an ALiBi-style bias) plus one token every query looks at, keeping 25 % of the blocks.
"""
import os
import sys

import torch
from torch import nn

import fxsparse
from fxsparse import Layout, patterns
from fxsparse.plot import plot_layouts

HERE = os.path.dirname(os.path.abspath(__file__))


class DecayingAttention(nn.Module):
    """Single-head attention whose scores fall off with distance, and token 100 stands out for every query."""

    def __init__(self, n, dim=32, slope=0.05):
        super().__init__()
        self.qk = nn.Linear(dim, 2 * dim)
        pos = torch.arange(n)
        bias = -slope * (pos[:, None] - pos[None, :]).abs().float()
        bias[:, 100] += 8.0
        self.register_buffer("bias", bias)

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + self.bias
        return scores.softmax(-1) @ x


def calibrated_layout(n=256, block=32):
    torch.manual_seed(0)
    model = DecayingAttention(n).eval()
    batches = [(torch.randn(2, n, 32),) for _ in range(4)]
    mask_fn = fxsparse.calibrate(model, batches, density=0.25, block_size=block)
    (keep,) = mask_fn.blocks.values()
    return Layout.from_blocks(keep, block, shape=(n, n))


def main(path=None):
    path = path or os.path.join(HERE, "..", "docs", "gallery.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    items = [
        ("ViT 224 px: local_2d(window=2,\nprefix_tokens=1), blocks of 32",
         patterns.local_2d(window=2, prefix_tokens=1).layout(197, 197, block_size=32)),
        ("sliding_window(64, causal=True)\n512 tokens, blocks of 32",
         patterns.sliding_window(64, causal=True).layout(512, 512, block_size=32)),
        ("bigbird(block=32, num_random=2,\nnum_window=3, num_global=1)",
         patterns.bigbird(block=32, num_random=2, num_window=3, num_global=1).layout(512, 512, block_size=32)),
        ("calibrate(density=0.25) on attention\nthat decays with distance", calibrated_layout()),
    ]
    plot_layouts(items, path, columns=4, panel=3.2)
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
