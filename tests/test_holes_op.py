"""fxsparse.sparse_attention where a user could get a silently wrong answer or a cryptic error: double
backward, a scale that requires grad, torch.func transforms, the bounded dense-layout cache, messages,
and a sweep of awkward inputs (strides, broadcasts, dtypes, lengths of 1, head dims 1 and 256).

The CPU tests run the op's CPU path against the float64 oracle; the tests marked ``interpret`` run the
Triton kernels through ``TRITON_INTERPRET=1`` in their own pytest process (tiny shapes).
"""
from __future__ import annotations

import os

import pytest
import torch

import fxsparse
from fxsparse import Layout
from fxsparse import op as op_module
from fxsparse.testing import TOLERANCES, assert_close, compare_with_oracle, dense_attention
from helpers import gen, mixed_mask, qkv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_path = pytest.mark.skipif(INTERPRET, reason="the CPU path's tests run without TRITON_INTERPRET")
needs_kernels = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                   reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
op = fxsparse.sparse_attention
DOUBLE = "double backward \\(create_graph=True\\) is not supported"


@pytest.fixture(params=["eager", "op"])
def path(request, monkeypatch):
    """Run each test through both doors: the plain eager Function and the registered custom op."""
    if request.param == "op":
        monkeypatch.setattr(op_module, "_plain_eager", lambda tensors: False)
    return request.param


def _penalty_raises(q, k, v, **kw):
    """A gradient penalty: the first gradient must carry a graph whose backward raises fxsparse's error."""
    out = op(q, k, v, **kw)
    gq, = torch.autograd.grad((out * out).sum(), q, create_graph=True)
    assert gq.requires_grad, "create_graph=True returned a constant gradient: the penalty would be silently lost"
    loss = out.sum() + (gq ** 2).sum()
    with pytest.raises(RuntimeError, match=DOUBLE):
        loss.backward()


# ------------------------------------------------------------------------------ double backward
@cpu_path
def test_double_backward_raises_on_the_cpu_path(path):
    q, k, v = qkv(1, 1, 1, 3, 4, 2, dtype=torch.float64, seed=1)
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.autograd.gradgradcheck(lambda q, k, v: op(q, k, v, causal=True), (q, k, v))
    q, k, v = qkv(1, 2, 1, 6, 9, 4, dtype=torch.float64, seed=2)
    bias = torch.randn(1, 1, 6, 9, dtype=torch.float64, generator=gen(2)).requires_grad_()
    _penalty_raises(q, k, v, bias=bias)


@cpu_path
def test_create_graph_without_a_second_backward_is_still_right(path):
    # the first gradient with create_graph=True is exact; only differentiating it again raises
    q, k, v = qkv(1, 2, 2, 7, 7, 8, dtype=torch.float64, seed=3)
    got = torch.autograd.grad(op(q, k, v, causal=True).sum(), (q, k, v), create_graph=True)
    want = torch.autograd.grad(dense_attention(q, k, v, causal=True).sum(), (q, k, v))
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, TOLERANCES[torch.float64][1], f"grad {name}")


@pytest.mark.interpret
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_double_backward_raises_on_the_kernels(path, dtype):
    q, k, v = qkv(1, 2, 1, 16, 16, 16, dtype=dtype, device=DEVICE, seed=4)
    _penalty_raises(q, k, v, causal=True)


# ------------------------------------------------------------------------------ scale
@cpu_path
def test_scale_tensor_that_requires_grad_is_refused():
    q, k, v = qkv(1, 1, 1, 5, 5, 4, seed=5)
    scale = torch.tensor(0.3, requires_grad=True)
    with pytest.raises(TypeError, match="fold a learned scale into q"):
        op(q, k, v, scale=scale)
    # the suggested spelling gives scale its true gradient
    out = op(q * scale, k, v, scale=1.0)
    got, = torch.autograd.grad(out.sum(), scale)
    want, = torch.autograd.grad(dense_attention(q, k, v, scale=scale).sum(), scale)
    assert_close(got, want, 1e-5, "grad scale")


@cpu_path
def test_scale_tensor_without_grad_and_bad_scales():
    q, k, v = qkv(1, 1, 1, 5, 5, 4, seed=6, grad=False)
    assert_close(op(q, k, v, scale=torch.tensor(0.3)), dense_attention(q, k, v, scale=0.3), 1e-5)
    for bad, err, what in ((float("nan"), ValueError, "finite"), (float("inf"), ValueError, "finite"),
                           (torch.ones(2), ValueError, "one number"), ("0.3", TypeError, "number")):
        with pytest.raises(err, match=what):
            op(q, k, v, scale=bad)
    with pytest.raises(TypeError, match="causal must be a bool"):
        op(q, k, v, causal=torch.tensor(True))


# ------------------------------------------------------------------------------ torch.func
@cpu_path
def test_func_grad_matches_the_oracle():
    q, k, v = qkv(1, 2, 1, 40, 70, 4, dtype=torch.float64, seed=7, grad=False)
    mask = mixed_mask((), 40, 70, 32, seed=8)
    mask[:, 0] = True
    layout = Layout.from_mask(mask, block_size=32)

    def loss(fn, m):
        return lambda q, k, v: (fn(q, k, v, m, causal=True) ** 2).sum()

    got = torch.func.grad(loss(op, layout), argnums=(0, 1, 2))(q, k, v)
    want = torch.func.grad(loss(dense_attention, mask), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, TOLERANCES[torch.float64][1], f"torch.func.grad {name}")
    # per-sample gradients: vmap over grad
    qs = torch.randn(3, *q.shape, dtype=torch.float64, generator=gen(9))
    got = torch.func.vmap(torch.func.grad(lambda q: op(q, k, v, layout).sum()))(qs)
    for i in range(3):
        x = qs[i].clone().requires_grad_()
        want, = torch.autograd.grad(dense_attention(x, k, v, mask).sum(), x)
        assert_close(got[i], want, TOLERANCES[torch.float64][1], f"vmap(grad) sample {i}")


@cpu_path
def test_vmap_still_works_and_other_transforms_say_what_is_unsupported():
    q, k, v = qkv(1, 2, 2, 5, 5, 4, dtype=torch.float64, seed=10, grad=False)
    qs = torch.randn(3, *q.shape, dtype=torch.float64, generator=gen(11))
    got = torch.func.vmap(lambda q: op(q, k, v, causal=True))(qs)
    assert_close(got, torch.stack([dense_attention(x, k, v, causal=True) for x in qs]), 1e-10, "vmap")
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.func.grad(lambda q: torch.func.grad(lambda q: op(q, k, v).pow(2).sum())(q).sum())(q)
    for transform in (lambda: torch.func.jvp(lambda q: op(q, k, v), (q,), (q,)),
                      lambda: torch.func.hessian(lambda q: op(q, k, v).sum())(q)):
        with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported"):
            transform()


# ------------------------------------------------------------------------------ caches and messages
@cpu_path
def test_dense_layout_cache_stays_bounded():
    op_module.clear_layout_cache()
    q, k, v = qkv(1, 1, 1, 1, 1000, 1, dtype=torch.float64, grad=False)
    for n in range(1, 1001):  # 1,000 different key lengths, each a dense Layout of its own
        op_module._as_layout(None, q, 1, n)
        assert len(op_module._dense_layouts) <= op_module.DENSE_LAYOUT_CACHE_SIZE
    assert len(op_module._dense_layouts) == op_module.DENSE_LAYOUT_CACHE_SIZE
    for n in (1, 999, 1000):  # evicted and cached lengths still give the dense answer through the op
        assert_close(op(q, k[:, :, :n], v[:, :, :n]), dense_attention(q, k[:, :, :n], v[:, :, :n]), 1e-10, f"{n}")
    assert len(op_module._dense_layouts) == op_module.DENSE_LAYOUT_CACHE_SIZE
    op_module.clear_layout_cache()
    assert len(op_module._dense_layouts) == 0


@cpu_path
def test_layout_batch_and_heads_messages_name_the_cause():
    q, k, v = qkv(1, 3, 3, 8, 8, 4, grad=False)
    batch2 = Layout.from_mask(torch.ones(2, 1, 8, 8, dtype=torch.bool), block_size=32)
    with pytest.raises(ValueError, match="Layout has batch 2 but q has batch 1") as err:
        op(q, k, v, batch2)
    assert "1 or 1" not in str(err.value)
    heads2 = Layout.from_mask(torch.ones(2, 8, 8, dtype=torch.bool), block_size=32)
    with pytest.raises(ValueError, match="Layout has heads 2 but q has heads 3.*must be 1 or 3"):
        op(q, k, v, heads2)
    with pytest.raises(ValueError, match=r"\[batch 1, heads 1 or 3, 8, 8\]") as err:
        op(q, k, v, torch.ones(2, 1, 8, 8, dtype=torch.bool))
    assert "1 or 1" not in str(err.value)


@cpu_path
def test_token_mask_under_compile():
    torch._dynamo.reset()
    mask = mixed_mask((), 12, 12, 4, seed=12)  # token-level holes
    mask[:, 0] = True

    def fn(q, k, v):
        return op(q, k, v, mask)

    q, k, v = qkv(1, 2, 2, 12, 12, 4, seed=13, grad=False)
    # fullgraph: Dynamo's own message carries fxsparse's reason and what to do
    with pytest.raises(Exception, match="token mask is turned into a Layout outside the graph.*Layout.from_mask"):
        torch.compile(fn, fullgraph=True, backend="eager")(q, k, v)
    # without fullgraph the Layout is built eagerly (a graph break) and the answer is exact
    assert_close(torch.compile(fn, backend="eager")(q, k, v), dense_attention(q, k, v, mask), 1e-5, "compiled")


# ------------------------------------------------------------------------------ the sweep's holes
@cpu_path
@pytest.mark.parametrize("b,h,hkv", [(0, 2, 2), (2, 0, 1)], ids=["empty_batch", "no_query_heads"])
def test_empty_batch_or_heads_give_an_empty_output(b, h, hkv):
    q, k, v = qkv(b, h, hkv, 8, 8, 16, seed=14)
    out = op(q, k, v, causal=True)
    assert out.shape == q.shape
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    with pytest.raises(ValueError, match="k/v have 0 heads"):
        op(*qkv(1, 2, 0, 8, 8, 16, seed=14))


@cpu_path
def test_numpy_scalars_for_scale_and_causal():
    np = pytest.importorskip("numpy")
    q, k, v = qkv(1, 2, 2, 9, 12, 8, seed=15, grad=False)
    got = op(q, k, v, scale=np.float32(0.2), causal=np.bool_(True))
    assert_close(got, dense_attention(q, k, v, scale=0.2, causal=True), 1e-5)


@cpu_path
def test_meta_tensors_give_the_output_shape():
    q, k, v = (torch.empty(2, 4, 9, 16, device="meta"), torch.empty(2, 2, 7, 16, device="meta"),
               torch.empty(2, 2, 7, 16, device="meta"))
    out = op(q, k, v, causal=True)
    assert out.device.type == "meta" and out.shape == (2, 4, 9, 16)
    meta_mask = torch.ones(9, 7, dtype=torch.bool, device="meta")
    assert op(q, k, v, meta_mask).shape == (2, 4, 9, 16)
    with pytest.raises(ValueError, match="does not broadcast"):
        op(q, k, v, meta_mask[:, :6])
    with pytest.raises(ValueError, match="mask is on the meta device"):
        op(*qkv(1, 2, 2, 9, 7, 16, grad=False), meta_mask)


@cpu_path
def test_export_with_symbolic_lengths_and_no_mask_says_so():
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return op(q, k, v, causal=True)

    q, k, v = qkv(1, 2, 2, 40, 40, 16, seed=16, grad=False)
    n = torch.export.Dim("n", min=2, max=512)
    with pytest.raises(Exception, match="symbolic sequence lengths"):
        torch.export.export(Attend(), (q, k, v), dynamic_shapes=({2: n}, {2: n}, {2: n}))


@cpu_path
def test_double_backward_through_a_compiled_call_raises():
    torch._dynamo.reset()
    q, k, v = qkv(1, 2, 2, 16, 16, 8, seed=17)
    out = torch.compile(lambda q, k, v: op(q, k, v, causal=True), backend="aot_eager")(q, k, v)
    gq, = torch.autograd.grad((out * out).sum(), q, create_graph=True)
    assert gq.requires_grad
    with pytest.raises(RuntimeError, match="double backward"):
        (out.sum() + (gq ** 2).sum()).backward()


@pytest.mark.interpret
@needs_kernels
def test_awkward_inputs_through_the_kernels():
    """Broadcast (stride-0) k/v, a per-head bias with grad under grouped-query heads, one query
    against many keys with causal, head dim 1: the kernels against the float64 oracle."""
    tol = TOLERANCES[torch.float32]
    kb, vb = (torch.randn(1, 1, 20, 16, generator=gen(s)).to(DEVICE).requires_grad_() for s in (18, 19))
    q = torch.randn(2, 2, 20, 16, generator=gen(20)).to(DEVICE).requires_grad_()
    k, v = kb.expand(2, 2, 20, 16), vb.expand(2, 2, 20, 16)
    out = op(q, k, v, causal=True)
    want = dense_attention(q, k, v, causal=True)
    dout = torch.randn(out.shape, generator=gen(21), dtype=torch.float64).to(DEVICE)
    for name, g, w in zip("q k v".split(), torch.autograd.grad(out, (q, kb, vb), dout.float()),
                          torch.autograd.grad(want, (q, kb, vb), dout)):
        assert_close(g, w, tol[1], f"broadcast grad {name}")
    q, k, v = qkv(2, 4, 2, 20, 30, 16, device=DEVICE, seed=22)
    bias = torch.randn(2, 4, 20, 30, generator=gen(23)).to(DEVICE).requires_grad_()
    compare_with_oracle(op, q, k, v, mixed_mask((2, 4), 20, 30, 32, seed=24, device=DEVICE), bias=bias, tols=tol)
    compare_with_oracle(op, *qkv(1, 2, 1, 1, 37, 16, device=DEVICE, seed=25), causal=True, tols=tol)
    compare_with_oracle(op, *qkv(1, 1, 1, 20, 24, 1, device=DEVICE, seed=26), causal=True, tols=tol)
