"""A float64 dense masked attention oracle for fxsparse.sparse_attention, and helpers to compare with it.

The oracle is written from the definition, with none of fxsparse's code: kv heads are repeated
for grouped-query attention, disallowed scores become -inf, a row with no allowed key (its mask
all False, or every allowed score -inf through the bias) outputs 0 and passes no gradient.
Causal is top-left aligned as in ``scaled_dot_product_attention``: ``torch.ones(Nq, Nk).tril()``.

It is differentiable: the float64 copies are made with ``.double()``, so ``torch.autograd.grad``
through the oracle gives gradients for the original q, k, v and bias.
"""
from __future__ import annotations

import math

import torch

# relative-norm tolerances of the op against the oracle: (forward, gradients)
TOLERANCES = {
    # float64 gradients: the op saves the log-sum-exp in float32, so they are float32-accurate only
    torch.float64: (1e-10, 1e-6),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}


def dense_attention(q, k, v, mask=None, *, scale=None, bias=None, causal=False):
    """softmax(q kᵀ · scale + bias, restricted to mask) v in float64; returns [B, H, Nq, D] float64."""
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.double()
    allowed = torch.ones(b, h, nq, nk, dtype=torch.bool, device=q.device)
    if mask is not None:
        allowed = allowed & mask.to(q.device)
    if causal:
        allowed = allowed & torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    live = scores != float("-inf")
    empty_row = ~live.any(-1, keepdim=True)
    # softmax of a row of zeros is harmless; multiplying by `live` then zeroes the empty rows
    probs = torch.softmax(scores.masked_fill(empty_row, 0.0), dim=-1) * live
    return torch.matmul(probs, v)


def rel_err(got, want) -> float:
    """‖got − want‖ / ‖want‖ in float64 (the absolute norm when want is all zeros)."""
    got, want = got.detach().double(), want.detach().double()
    denom = want.norm().item()
    return (got - want).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(got, want, tol, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.1e}"


def compare_with_oracle(
    fn, q, k, v, mask=None, *, op_mask=None, scale=None, bias=None, causal=False, seed=0, tols=None
):
    """Run ``fn`` (the op) and the oracle on the same leaves; check the output and every gradient.

    ``mask`` is the bool token mask the oracle applies; the op gets ``op_mask`` when given (a
    Layout built from that mask), else ``mask`` itself. ``tols`` = (forward, gradients) overrides
    the dtype's tolerances.
    """
    leaves = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    out = fn(q, k, v, mask if op_mask is None else op_mask, scale=scale, bias=bias, causal=causal)
    want = dense_attention(q, k, v, mask, scale=scale, bias=bias, causal=causal)
    fwd_tol, grad_tol = tols or TOLERANCES[q.dtype]
    assert out.dtype == q.dtype
    assert_close(out, want, fwd_tol, "output")
    if not leaves:
        return out
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    got_grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    want_grads = torch.autograd.grad(want, leaves, dout)
    names = [n for n, t in zip("q k v bias".split(), (q, k, v, bias)) if t is not None and t.requires_grad]
    for name, leaf, g, w in zip(names, leaves, got_grads, want_grads):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, f"grad {name}: {g.shape}/{g.dtype}"
        assert_close(g, w, grad_tol, f"grad {name}")
    return out

