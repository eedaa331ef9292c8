"""The op under torch.compile(fullgraph=True), torch.library.opcheck and torch.export (CPU reference path)."""
from __future__ import annotations

import os

import pytest
import torch

import fxsparse
from fxsparse import Layout
from fxsparse.testing import assert_close, dense_attention
from helpers import gen, mixed_mask, qkv

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compile tests run on the reference path, without TRITON_INTERPRET", allow_module_level=True)

OP = torch.ops.fxsparse.sparse_attention.default
BWD_OP = torch.ops.fxsparse.sparse_attention_backward.default
B, H, HKV, N, D = 2, 4, 2, 70, 32
LAYOUT = Layout.from_mask(mixed_mask((H,), N, N, 32, seed=40), block_size=32)


def block(q, k, v, bias):
    """What a model's attention does around the op: scale q, call it with a prebuilt Layout, merge heads."""
    out = fxsparse.sparse_attention(q * 1.5, k, v, LAYOUT, bias=bias, causal=True)
    return out.transpose(1, 2).reshape(q.shape[0], N, H * D).relu()


def _inputs(seed=41):
    q, k, v = qkv(B, H, HKV, N, N, D, seed=seed)
    bias = torch.randn(B, 1, 1, N, generator=gen(seed + 1)).requires_grad_()
    return q, k, v, bias


def _run(fn, inputs):
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=gen(42))
    return out, torch.autograd.grad(out, inputs, g)


def _check_same(got, want):
    (out, grads), (ref, ref_grads) = got, want
    assert_close(out, ref, 1e-6, "output")
    for name, a, b in zip("q k v bias".split(), grads, ref_grads):
        assert_close(a, b, 1e-6, f"grad {name}")


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    inputs = _inputs()
    want = _run(block, inputs)
    # the eager result is itself right: against the float64 oracle
    q, k, v, bias = inputs
    oracle = dense_attention(q * 1.5, k, v, LAYOUT.to_mask(), bias=bias, causal=True)
    assert_close(want[0], oracle.transpose(1, 2).reshape(B, N, H * D).relu(), 1e-5, "eager vs oracle")
    _check_same(_run(torch.compile(block, fullgraph=True, backend=backend), inputs), want)


def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    inputs = _inputs()
    _check_same(_run(torch.compile(block, fullgraph=True, backend="inductor"), inputs), _run(block, inputs))


def test_compile_layout_as_argument_and_no_recompile():
    torch._dynamo.reset()
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(q, k, v, layout):
        return fxsparse.sparse_attention(q, k, v, layout)

    compiled = torch.compile(fn, fullgraph=True, backend=recording)
    for seed in (1, 2):  # fresh tensors of the same shapes: the first graph is reused
        with torch._dynamo.config.patch(error_on_recompile=(seed == 2)):
            q, k, v = qkv(B, H, HKV, N, N, D, seed=seed, grad=False)
            assert_close(compiled(q, k, v, LAYOUT), fn(q, k, v, LAYOUT).double(), 1e-6, "layout argument")
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert OP in targets or torch.ops.fxsparse.sparse_attention in targets, targets


def test_token_mask_inside_compile_says_to_build_a_layout():
    torch._dynamo.reset()
    mask = torch.ones(N, N, dtype=torch.bool)

    def fn(q, k, v):
        return fxsparse.sparse_attention(q, k, v, mask)

    q, k, v = qkv(B, H, HKV, N, N, D, grad=False)
    with pytest.raises(Exception, match="Layout.from_mask"):
        torch.compile(fn, fullgraph=True, backend="eager")(q, k, v)


# ------------------------------------------------------------------------------ opcheck
def _op_args(bias_kind, packed, dtype=torch.float32, causal=True):
    if packed:
        q, k, v = (t.detach().requires_grad_() for t in qkv(B, H, H, N, N, D, dtype=dtype, seed=43, packed=True))
        assert not q.is_contiguous()
    else:
        q, k, v = qkv(B, H, HKV, N, N, D, dtype=dtype, seed=43)
    bias = None
    if bias_kind != "none":
        bias = torch.randn(B, 1, 1, N, generator=gen(44)).to(dtype).requires_grad_(bias_kind == "grad")
    return (q, k, v, LAYOUT.data, LAYOUT.batch, LAYOUT.num_heads, list(LAYOUT.split), bias, 0.3, LAYOUT.block_size,
            causal)


# test_aot_dispatch_dynamic applies (the op has a fake kernel and autograd), so every utility runs
@pytest.mark.parametrize("packed", [False, True], ids=["gqa", "packed_qkv"])
@pytest.mark.parametrize("bias_kind", ["none", "fixed", "grad"])
def test_opcheck_forward(bias_kind, packed):
    torch.library.opcheck(OP, _op_args(bias_kind, packed))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_opcheck_forward_dtypes(dtype):
    torch.library.opcheck(OP, _op_args("grad", False, dtype=dtype, causal=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("bias_grad", [False, True])
def test_opcheck_backward(bias_grad, dtype):
    # the backward op has no autograd of its own (no double backward): its inputs are detached
    q, k, v, data, lb, lh, split, bias, scale, bs, causal = _op_args("grad" if bias_grad else "none", False,
                                                                     dtype=dtype)
    out, lse = OP(q, k, v, data, lb, lh, split, bias, scale, bs, causal)
    dout = torch.randn(out.shape, generator=gen(45)).to(dtype)
    det = [t.detach() for t in (q, k, v, out, lse)]
    args = (dout, *det, data, lb, lh, split, None if bias is None else bias.detach(), scale, bs, causal, bias_grad)
    torch.library.opcheck(BWD_OP, args)


# ------------------------------------------------------------------------------ export
class Attention(torch.nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.layout = layout

    def forward(self, q, k, v, bias):
        return fxsparse.sparse_attention(q, k, v, self.layout, bias=bias, causal=True)


def test_export_keeps_the_op():
    q, k, v, bias = (t.detach() for t in _inputs(seed=46))
    module = Attention(LAYOUT)
    ep = torch.export.export(module, (q, k, v, bias))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert OP in targets, ep.graph
    assert not any("softmax" in str(t) or "matmul" in str(t) for t in targets), targets
    q2, k2, v2, bias2 = (t.detach() for t in _inputs(seed=47))
    assert_close(ep.module()(q2, k2, v2, bias2), module(q2, k2, v2, bias2).double(), 1e-6, "exported")


def test_dense_mask_none_under_fullgraph():
    # mask=None builds the dense layout inside the graph (no data-dependent step, no cache mutation)
    q, k, v = qkv(1, 2, 2, 50, 70, 16, seed=70)
    fn = torch.compile(lambda q, k, v: fxsparse.sparse_attention(q, k, v, causal=True), fullgraph=True,
                       backend="aot_eager")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(fn(q, k, v), want, atol=1e-5, rtol=1e-5)
