"""v with its own head dim (Dv != D: LeViT's keys have 16 channels a head, its values 32 or 64).

Every implementation of the op against the float64 masked oracle, forward and every gradient (q, k,
v and the bias): the CPU block-skipping path and the exact chunked reference (without
TRITON_INTERPRET), the Triton kernels (on CUDA, or through Triton's interpreter with
TRITON_INTERPRET=1: ``pytest tests -m interpret``). Shapes stay small for the interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch

import fxsparse
from fxsparse import Layout, cpu, reference
from fxsparse.testing import TOLERANCES, assert_close, compare_with_oracle
from helpers import gen, mixed_mask

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = INTERPRET or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
op = fxsparse.sparse_attention

# (B, H, Hkv, Nq, Nk, D, Dv, mask lead dims, block, causal, bias shape or None)
CASES = {
    "dv_half_gqa_bias": (1, 4, 2, 70, 96, 32, 16, (4,), 32, False, (1, 4, 70, 96)),
    "dv_double_causal": (2, 2, 1, 64, 80, 16, 32, (), 32, True, None),
    "dv_24_unpadded_causal_bias": (1, 2, 2, 75, 75, 16, 24, (2,), 32, True, (75, 75)),
    "levit_16_64_dense": (2, 2, 2, 49, 49, 16, 64, None, 32, False, (1, 2, 49, 49)),
}


def _inputs(B, H, Hkv, Nq, Nk, D, Dv, dtype, device, seed=0):
    g = gen(seed)
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    v = torch.randn(B, Hkv, Nk, Dv, generator=g)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))


def _check(case, dtype, device, tols=None):
    B, H, Hkv, Nq, Nk, D, Dv, lead, bs, causal, bias_shape = CASES[case]
    q, k, v = _inputs(B, H, Hkv, Nq, Nk, D, Dv, dtype, device, seed=1)
    mask = None if lead is None else mixed_mask(lead, Nq, Nk, bs, seed=2, device=device)
    layout = None if mask is None else Layout.from_mask(mask, bs)
    bias = None
    if bias_shape is not None:
        bias = torch.randn(bias_shape, generator=gen(3)).to(device).requires_grad_()
    out = compare_with_oracle(op, q, k, v, mask, op_mask=layout, bias=bias, causal=causal, tols=tols)
    assert out.shape == (B, H, Nq, Dv)


# ------------------------------------------------------------------------------ CPU paths
cpu_only = pytest.mark.skipif(INTERPRET, reason="the CPU paths run without TRITON_INTERPRET (the op then runs the kernels)")


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_cpu_path_matches_oracle(case, dtype):
    _check(case, dtype, "cpu")


@cpu_only
@pytest.mark.parametrize("case", CASES)
def test_cpu_path_equals_reference_in_float64(case, monkeypatch):
    """The block-skipping path and the exact chunked reference agree to float64 rounding on every
    output (several chunks per call)."""
    monkeypatch.setattr(cpu, "_CHUNK_ELEMENTS", 1 << 12)
    B, H, Hkv, Nq, Nk, D, Dv, lead, bs, causal, bias_shape = CASES[case]
    q, k, v = (t.detach().double() for t in _inputs(B, H, Hkv, Nq, Nk, D, Dv, torch.float64, "cpu", seed=4))
    mask = torch.ones(Nq, Nk, dtype=torch.bool) if lead is None else mixed_mask(lead, Nq, Nk, bs, seed=5)
    layout = Layout.from_mask(mask, bs)
    tables = (layout.data, layout.batch, layout.num_heads)
    bias = None if bias_shape is None else torch.randn(bias_shape, dtype=torch.float64, generator=gen(6))
    dout = torch.randn(B, H, Nq, Dv, dtype=torch.float64, generator=gen(7))
    results = []
    for impl in (reference, cpu):
        out = q.new_empty(B, H, Nq, Dv)
        stats = impl.forward(q, k, v, tables, bias, 0.4, bs, causal, out)
        grads = impl.backward(dout, q, k, v, out, stats, tables, bias, 0.4, bs, causal, bias is not None)
        results.append((out, *grads))
    for name, want, got in zip(("out", "dq", "dk", "dv", "dbias"), *results):
        if want is None:
            assert got is None, name
            continue
        assert got.shape == want.shape, name
        assert_close(got, want, 1e-12, name)


@cpu_only
def test_traced_op_has_the_value_head_dim():
    """Under torch.compile (fullgraph; aot_eager runs the op's fake kernels and autograd) the output and
    v's gradient have Dv, and match the oracle."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, mask, **kw: op(q, k, v, mask, **kw), backend="aot_eager", fullgraph=True)
    q, k, v = _inputs(1, 4, 2, 40, 40, 16, 48, torch.float32, "cpu", seed=11)
    mask = mixed_mask((), 40, 40, 32, seed=12)
    out = compare_with_oracle(compiled, q, k, v, mask, op_mask=Layout.from_mask(mask, 32), causal=True)
    assert out.shape == (1, 4, 40, 48)


class _LeViTAttention(torch.nn.Module):
    """LeViT's attention in miniature: keys of 16 channels a head, values of 32, a learned bias per head."""

    def __init__(self, dim=48, heads=4, key_dim=16, value_dim=32, tokens=80):
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        self.qkv = torch.nn.Linear(dim, heads * (2 * key_dim + value_dim))
        self.bias = torch.nn.Parameter(torch.randn(heads, tokens, tokens) * 0.5)
        self.proj = torch.nn.Linear(heads * value_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.key_dim ** -0.5 + self.bias
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.heads * self.value_dim)
        return self.proj(x)


@cpu_only
def test_transformed_levit_like_model():
    """A model whose values have their own head dim is rewritten (not skipped): exact with an all-True
    mask, equal to the float64 masked original with a window, untouched; its gradients (the bias's
    too) equal the original's with an all-True mask."""
    from helpers import check_model

    torch.manual_seed(0)
    model = _LeViTAttention()
    x = torch.randn(2, 80, 48)

    def band(site):  # 32-token blocks: full, partial and empty ones
        i = torch.arange(site.q_len)
        return Layout.from_mask((i[:, None] - i[None, :]).abs() <= 12, 32)

    check_model(model, (x,), band, kinds=["matmul-softmax"])
    sparse = fxsparse.transform(model, lambda site: torch.ones(site.q_len, site.kv_len, dtype=torch.bool))
    row, = fxsparse.report(sparse).rows
    assert row.status == "rewritten"
    want = torch.autograd.grad(model(x).square().sum(), [model.bias, model.qkv.weight])
    got = torch.autograd.grad(sparse(x).square().sum(), [sparse.bias, sparse.qkv.weight])
    for name, g, w in zip(("bias", "qkv.weight"), got, want):
        assert_close(g, w, 1e-4, f"grad {name}")


@cpu_only
def test_shape_errors_name_the_argument():
    q, k, v = _inputs(1, 2, 2, 10, 12, 16, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"k and v must have the same batch, heads and length .* v \(1, 2, 11, 32\)"):
        op(q, k, v[:, :, :11])
    with pytest.raises(ValueError, match="k and v must have the same batch, heads and length"):
        op(q, k, v[:, :1])
    with pytest.raises(ValueError, match=r"head_dim of k \(8\) differs from q's \(16\)"):
        op(q, k[..., :8], v)
    with pytest.raises(ValueError, match="head_dim of v must be between 1 and 256, got 257"):
        op(q, k, torch.zeros(1, 2, 12, 257))


# ------------------------------------------------------------------------------ the Triton kernels
def _kernel_tols(dtype):
    if dtype == torch.float32 and DEVICE == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return (5e-3, 1e-2)  # tf32
    return TOLERANCES[dtype]


@pytest.mark.interpret
@pytest.mark.skipif(not KERNELS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_oracle(case, dtype):
    assert fxsparse.op._use_triton(torch.empty(1, device=DEVICE, dtype=dtype))
    _check(case, dtype, DEVICE, _kernel_tols(dtype))


@pytest.mark.parametrize("d,dv,block,rows", [(64, 128, 128, 128), (128, 64, 128, 128), (16, 32, 64, 64)])
def test_launch_plans_follow_the_wider_head_dim(d, dv, block, rows, monkeypatch):
    """The kernels get both head dims and their paddings; tiles, launch plans and the layout's
    refinement follow the wider one (both dims' tiles sit in shared memory). Launches are recorded, not run."""
    import fxsparse.op as op_module
    from fxsparse.kernels import launch as kernels

    seen = {}

    def record(kernel, grid, ptrs, scalars, consts, warps, stages, maxnreg=None, fast=True):
        seen[kernel.fn.__name__] = dict(consts, warps=warps)

    monkeypatch.setattr(op_module, "_use_triton", lambda q: True)
    monkeypatch.setattr(kernels, "_launch", record)
    monkeypatch.setattr(kernels, "_FITTED", {})
    i = torch.arange(256)
    layout = Layout.from_mask((i[:, None] - i[None, :]).abs() <= 40, block_size=128)
    q, k, v = _inputs(1, 2, 2, 256, 256, d, dv, torch.bfloat16, "cpu")
    op(q, k, v, layout).sum().backward()
    assert set(seen) == {"forward_kernel", "dq_kernel", "dkdv_kernel"}
    for name, consts in seen.items():
        assert (consts["HEAD_DIM"], consts["D_PAD"], consts["DV"], consts["DV_PAD"]) == (d, d, dv, dv), name
        assert consts["BLOCK"] == block, name
        assert not consts["TMA"], name  # by default only where both head dims are 128
    assert seen["forward_kernel"]["BLOCK_M"] == rows
    assert v.grad.shape == v.shape and k.grad.shape == k.shape


def test_tensor_descriptors_take_each_tensors_own_head_dim():
    from fxsparse.kernels import launch as kernels

    def t(d):
        return torch.zeros(1, 2, 16, d, dtype=torch.bfloat16)

    assert kernels._use_descriptors(t(128), t(128), None)
    assert not kernels._use_descriptors(t(128), t(64), None)  # not by default: measured at D = 128 only
    assert kernels._use_descriptors(t(128), t(64), True) and kernels._use_descriptors(t(16), t(32), True)
    assert not kernels._use_descriptors(t(64), t(80), True)  # a padded head dim never


@pytest.mark.interpret
@pytest.mark.skipif(not KERNELS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("d,dv", [(32, 16), (16, 64)])
def test_kernels_through_tensor_descriptors(d, dv, monkeypatch):
    """Forced tensor descriptors: K [.., D] and V [.., Dv] (forward, dq), q and the output's gradient
    (dk/dv) load tiles of their own widths; GQA, ragged lengths, causal, bias, partial blocks."""
    from fxsparse.kernels import launch as kernels

    used = []
    make = kernels._tile_descriptors

    def spy(*args):
        made = make(*args)
        used.append([t.block_shape[-1] for t in made])
        return made

    monkeypatch.setattr(kernels, "_tile_descriptors", spy)
    opts = fxsparse.KernelOptions(forward_descriptors=True, backward_descriptors=True)
    q, k, v = _inputs(1, 4, 2, 90, 75, d, dv, torch.bfloat16, DEVICE, seed=8)
    bias = torch.randn(1, 4, 90, 75, generator=gen(9)).to(DEVICE).requires_grad_()
    mask = mixed_mask((4,), 90, 75, 32, seed=10, device=DEVICE)
    compare_with_oracle(lambda *a, **kw: op(*a, options=opts, **kw), q, k, v, mask, op_mask=Layout.from_mask(mask, 32),
                        bias=bias, causal=True, tols=_kernel_tols(torch.bfloat16))
    assert used == [[d, dv], [d, dv], [d, dv]]  # forward: k, v; dq: k, v; dk/dv: q, dout
