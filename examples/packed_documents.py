"""Training on packed documents: a layout built from the document lengths at every step.

Each step packs documents of random lengths into one sequence; tokens attend causally within their
own document. ``fxsparse.masks.packed_layout`` turns the lengths into a Layout on the device with
nothing read back to the host (on a GPU its build can be captured once in a CUDA graph and replayed
every step: ``benchmarks/training.py``), and the attention visits only the blocks inside documents.
The first step is checked against the same model with the mask applied densely (PyTorch's SDPA with
a bool mask); ``masks.document_layout`` does the same from document ids, in any order.

    python examples/packed_documents.py          # CPU, a few seconds
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.masks import document_ids, packed_layout

SEQ, DIM, HEADS, VOCAB, STEPS = 1024, 64, 4, 256, 8
BLOCK = 64
device = "cuda" if torch.cuda.is_available() else "cpu"


class Block(nn.Module):
    """Pre-norm attention + MLP; attention through fxsparse with the step's layout, or dense with a mask."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x, layout=None, dense_mask=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        if layout is not None:
            att = fxsparse.sparse_attention(q, k, v, layout)
        else:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, DIM))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens, layout=None, dense_mask=None):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, layout, dense_mask)
        return self.head(x)


def random_documents(gen) -> torch.Tensor:
    """Document lengths that fill SEQ tokens: between 16 and 400 tokens each, the last one cut to fit."""
    lengths, left = [], SEQ
    while left > 0:
        n = min(left, int(torch.randint(16, 400, (1,), generator=gen)))
        lengths.append(n)
        left -= n
    return torch.tensor(lengths)


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyLM().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(STEPS):
        lengths = random_documents(gen)
        ids = document_ids(lengths.to(device))[None]  # [1, SEQ]
        tokens = torch.randint(0, VOCAB, (1, SEQ), generator=gen).to(device)
        t0 = time.perf_counter()
        layout = packed_layout(lengths.to(device), SEQ, causal=True, block_size=BLOCK)  # this step's, on the device
        t_layout = time.perf_counter() - t0
        logits = model(tokens, layout)
        # next-token loss within each document
        same_doc = ids[:, 1:] == ids[:, :-1]
        loss = F.cross_entropy(logits[:, :-1][same_doc], tokens[:, 1:][same_doc])
        if step == 0:  # exactness: the same model with the document mask applied densely
            mask = (ids[:, :, None] == ids[:, None, :]) & torch.ones(SEQ, SEQ, dtype=torch.bool, device=device).tril()
            with torch.no_grad():
                dense = model(tokens, dense_mask=mask[:, None])
            err = (logits - dense).abs().max().item()
            print(f"step 0: max |sparse - dense| = {err:.2e} (dense masked SDPA)")
            assert err < 1e-4, err
        opt.zero_grad()
        loss.backward()
        opt.step()
        visited = (layout.kinds != layout.EMPTY).float().mean().item()
        print(f"step {step}: {len(lengths):2d} documents, layout {t_layout * 1e3:5.1f} ms, "
              f"blocks visited {visited:.1%}, loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
