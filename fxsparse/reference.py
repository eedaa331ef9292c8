"""Exact block-sparse attention in plain PyTorch: the CPU path of the op and its backward.

It goes a chunk of query blocks at a time, so the whole [B, H, Nq, Nk] score tensor is
never held at once. Grouped-query heads are viewed as [B, Hkv, G, ...] (no copy of k, v).
Scores and softmax run in float32 (float64 inputs stay float64); the output has q's dtype.
A query row with no allowed key gets output 0 and gradient 0.
"""
from __future__ import annotations

import torch

from .layout import block_mask

_CHUNK_ELEMENTS = 1 << 24  # scores held at once, about 64 MiB of float32


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, float64 for float64 inputs (also of the row statistics and dbias)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunks(q, k, block_size):
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    nqb = -(-nq // block_size)
    per_block = max(1, b * h * block_size * nk)
    step = max(1, _CHUNK_ELEMENTS // per_block)
    for start in range(0, nqb, step):
        end = min(nqb, start + step)
        yield start, end, start * block_size, min(nq, end * block_size)


def _grouped(t, hkv):
    """[B, H, N, X] -> [B, Hkv, G, N, X] view."""
    b, h = t.shape[:2]
    return t.reshape(b, hkv, h // hkv, *t.shape[2:])


def _chunk_mask(tables, block_size, shape, qb0, qb1, r0, r1, causal, hkv, dev):
    data, bl, hl = tables
    m = block_mask(data, bl, hl, block_size, shape, qb0, qb1).to(dev)  # [Bl,Hl,rows,Nk]
    if causal:
        rows = torch.arange(r0, r1, device=dev)[:, None]
        cols = torch.arange(shape[1], device=dev)[None, :]
        m = m & (cols <= rows)
    bl, hl = m.shape[:2]
    if hl == 1:
        return m.reshape(bl, 1, 1, *m.shape[2:])
    return m.reshape(bl, hkv, hl // hkv, *m.shape[2:])


def _chunk_bias(bias, b, h, nq, nk, r0, r1, hkv, acc):
    if bias is None:
        return None
    full = bias.expand(b, h, nq, nk)[:, :, r0:r1]
    return _grouped(full, hkv).to(acc)


def _scores(qc, kg, scale, bias_c, mask_c):
    s = torch.matmul(qc, kg.transpose(-1, -2)) * scale
    if bias_c is not None:
        s = s + bias_c
    return s.masked_fill(~mask_c, float("-inf"))


def forward(q, k, v, tables, bias, scale: float, block_size: int, causal: bool, out):
    """tables = (flat layout tensor, its batch, its heads). Writes out [B,H,Nq,Dv] (q's dtype; v, [B,Hkv,Nk,Dv],
    may have its own head dim); returns the row statistics [B,H,2,Nq] (float32, float64 for float64
    inputs): the row max and the log of the row sum, natural log; an empty row has max 0 and
    log-sum +inf. Kept apart so the log-sum survives beside a huge max."""
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    acc = acc_dtype(q)
    lse = torch.empty(b, h, 2, nq, dtype=acc, device=q.device)
    kg, vg = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    qg = _grouped(q, hkv)
    og, mg, lg = _grouped(out, hkv), _grouped(lse[:, :, 0], hkv), _grouped(lse[:, :, 1], hkv)
    for qb0, qb1, r0, r1 in _chunks(q, k, block_size):
        mask_c = _chunk_mask(tables, block_size, (nq, nk), qb0, qb1, r0, r1, causal, hkv, q.device)
        s = _scores(qg[:, :, :, r0:r1].to(acc), kg, scale, _chunk_bias(bias, b, h, nq, nk, r0, r1, hkv, acc), mask_c)
        m = s.amax(-1, keepdim=True)
        m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
        p = torch.exp(s - m_safe)
        l = p.sum(-1, keepdim=True)
        empty = l == 0
        o = torch.matmul(p, vg) / torch.where(empty, torch.ones_like(l), l)
        og[:, :, :, r0:r1] = o.to(q.dtype)
        mg[:, :, :, r0:r1] = m_safe.squeeze(-1)
        lg[:, :, :, r0:r1] = torch.where(empty, torch.full_like(l, float("inf")), torch.log(l)).squeeze(-1)
    return lse


def backward(dout, q, k, v, out, lse, tables, bias, scale: float, block_size: int, causal: bool, bias_grad: bool):
    """Returns (dq, dk, dv, dbias or None); dbias has the shape [B, H, Nq, Nk] before reduction to bias's shape."""
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    acc = acc_dtype(q)
    kg, vg = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    qg, dog = _grouped(q, hkv), _grouped(dout, hkv)
    delta = _grouped((out.to(acc) * dout.to(acc)).sum(-1, keepdim=True), hkv)
    m_g, logl_g = _grouped(lse[:, :, 0].unsqueeze(-1), hkv), _grouped(lse[:, :, 1].unsqueeze(-1), hkv)
    dq = torch.empty(b, h, nq, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, hkv, nk, d, dtype=acc, device=q.device)
    dv = torch.zeros(b, hkv, nk, v.shape[-1], dtype=acc, device=q.device)
    # the op reduces it to the bias's shape and casts it to the bias dtype
    dbias = torch.zeros(b, h, nq, nk, dtype=acc, device=q.device) if bias_grad else None
    dqg = _grouped(dq, hkv)
    for qb0, qb1, r0, r1 in _chunks(q, k, block_size):
        mask_c = _chunk_mask(tables, block_size, (nq, nk), qb0, qb1, r0, r1, causal, hkv, q.device)
        qc = qg[:, :, :, r0:r1].to(acc)
        doc = dog[:, :, :, r0:r1].to(acc)
        s = _scores(qc, kg, scale, _chunk_bias(bias, b, h, nq, nk, r0, r1, hkv, acc), mask_c)
        # exp(-inf) = 0 for masked keys and empty rows; max and log-sum kept apart (see forward)
        p = torch.exp((s - m_g[:, :, :, r0:r1]) - logl_g[:, :, :, r0:r1])
        dv += torch.matmul(p.transpose(-1, -2), doc).sum(2)
        dp = torch.matmul(doc, vg.transpose(-1, -2))
        ds = p * (dp - delta[:, :, :, r0:r1])
        dqg[:, :, :, r0:r1] = torch.matmul(ds, kg) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qc).sum(2) * scale
        if dbias is not None:
            _grouped(dbias, hkv)[:, :, :, r0:r1] = ds
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias
