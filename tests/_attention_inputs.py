"""Inputs for the op tests: q, k, v (or views of one packed qkv) and masks with full, partial and empty blocks."""
from __future__ import annotations

import math

import torch


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def qkv(B, H, Hkv, Nq, Nk, D, *, dtype=torch.float32, device="cpu", seed=0, packed=False, grad=True):
    """q [B, H, Nq, D], k and v [B, Hkv, Nk, D]; packed=True makes them strided views of one qkv tensor."""
    g = gen(seed)
    if packed:
        assert H == Hkv and Nq == Nk, "a packed qkv has one head count and one length"
        base = torch.randn(B, Nq, 3 * H * D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
        q, k, v = base.reshape(B, Nq, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    v = torch.randn(B, Hkv, Nk, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (q, k, v))


def mixed_mask(lead, Nq, Nk, block_size, *, seed=0, device="cpu"):
    """bool [*lead, Nq, Nk] whose blocks are randomly full, partial (about half True) or empty."""
    g = gen(seed)
    nqb, nkb = math.ceil(Nq / block_size), math.ceil(Nk / block_size)
    kind = torch.randint(0, 3, (*lead, nqb, nkb), generator=g)
    kind = kind.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :Nq, :Nk]
    coin = torch.rand(*lead, Nq, Nk, generator=g) < 0.5
    return ((kind == 2) | ((kind == 1) & coin)).to(device)


def random_mask(lead, Nq, Nk, density, *, seed=0, device="cpu"):
    return (torch.rand(*lead, Nq, Nk, generator=gen(seed)) < density).to(device)
