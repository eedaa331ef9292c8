"""Runtime masks as layouts: key padding and a model's own 4-D mask turned into exact Layouts on the
device with nothing read back to the host, and their fold into a site's layout (SiteAttention.skip_padding):
the blocks the model's mask removes are skipped, and the result is the original model's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse import Layout
from fxsparse import patterns as P
from fxsparse.masks import document_ids, key_padding_layout, model_mask_layout, packed_layout
from fxsparse.site import SiteAttention, _fold_mask_bias
from fxsparse.testing import assert_close, compare_with_oracle, dense_attention
from helpers import gen, qkv


def padded_keys(b, nk, seed):
    """bool [b, nk]: random keys, a whole padded stretch in sample 0, no key at all in the last sample."""
    keep = torch.rand(b, nk, generator=gen(seed)) < 0.7
    keep[0, : nk // 2] = False
    keep[-1] = False
    return keep


@pytest.mark.parametrize("nq,nk,bs,causal", [(150, 150, 32, False), (150, 150, 32, True), (70, 130, 64, False),
                                             (130, 70, 32, True), (256, 256, 128, False)])
def test_key_padding_layout_is_the_exact_layout(nq, nk, bs, causal):
    keep = padded_keys(3, nk, seed=nq + nk)
    layout = key_padding_layout(keep, nq, block_size=bs, causal=causal)
    mask = keep[:, None, None, :].expand(3, 1, nq, nk)
    if causal:
        mask = mask & torch.ones(nq, nk, dtype=torch.bool).tril()
    want = Layout.from_mask(mask, bs)
    assert torch.equal(layout.to_mask(), mask)
    assert torch.equal(layout.kinds, want.kinds), "every block is full, partial or empty exactly as the mask's"
    assert layout.causal == want.causal and layout.density == pytest.approx(want.density)
    q, k, v = qkv(3, 2, 1, nq, nk, 16, seed=1)
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask, op_mask=layout)


def test_model_mask_layout_of_a_4d_mask_is_exact():
    """A packed-document causal mask with padding, per sample, odd length: cut into blocks with every
    block's kind exact; bool and additive forms give one layout; a mask expanded along the queries
    takes the key-padding path."""
    n = 150
    ids = document_ids(torch.tensor([[40, 7, 90, 3], [120, 0, 0, 0]]), total=n)
    mask = ((ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0) & torch.ones(n, n, dtype=torch.bool).tril())
    mask = mask[:, None]
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    for form in (mask, additive):
        layout = model_mask_layout(form, n, block_size=32)
        assert torch.equal(layout.to_mask(), mask)
        assert torch.equal(layout.kinds, Layout.from_mask(mask, 32).kinds)
    assert layout.causal
    q, k, v = qkv(2, 2, 2, n, n, 16, seed=2)
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask, op_mask=layout)
    keep = padded_keys(2, n, seed=3)
    expanded = keep[:, None, None, :].expand(2, 1, n, n)
    assert torch.equal(model_mask_layout(expanded, n, block_size=32).data,
                       key_padding_layout(keep, n, block_size=32).data)
    with pytest.raises(ValueError, match="query rows"):
        model_mask_layout(torch.zeros(2, 1, 7, n), n)


def sites(model):
    return [m for m in model.modules() if isinstance(m, SiteAttention)]


def spy_layouts(monkeypatch):
    seen = []
    real = fxsparse.site.sparse_attention

    def spy(q, k, v, layout, **kw):
        seen.append((layout, kw.get("bias")))
        return real(q, k, v, layout, **kw)

    monkeypatch.setattr(fxsparse.site, "sparse_attention", spy)
    return seen


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_bert_padding_folded_equals_the_original(impl, monkeypatch):
    """HuggingFace BERT with padding (right, left and a sample with no token): the transformed model
    equals the original with the fold (the default) and without it; the fold skips the padded key
    blocks, drops the bias where the model hands SDPA a bool mask and keeps it where the mask is additive."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, attn_implementation=impl)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(1, 100, (4, 200))
    attention_mask = torch.ones(4, 200, dtype=torch.long)
    attention_mask[1, 40:] = 0
    attention_mask[2, :130] = 0
    attention_mask[3] = 0
    kw = dict(input_ids=ids, attention_mask=attention_mask)
    seen = spy_layouts(monkeypatch)
    sparse = fxsparse.transform(model, P.dense(block_size=32), example_inputs=kw)
    assert all(s.skip_padding for s in sites(sparse))
    with torch.no_grad():
        want = model(**kw).last_hidden_state
        folded = sparse(**kw).last_hidden_state
        layout, bias = seen[-1]
        for s in sites(sparse):
            s.skip_padding = False
        plain = sparse(**kw).last_hidden_state
    real = attention_mask.bool()[:, :, None]
    assert_close(folded * real, want * real, what="folded vs the original")
    assert_close(plain * real, want * real, what="not folded vs the original")
    assert_close(folded, plain, tol=1e-6, what="folded vs not folded, padding rows included")
    assert layout.batch == 4 and (bias is None) == (impl == "sdpa")
    empty = (layout.kinds == Layout.EMPTY).flatten(1).float().mean(1)
    assert empty[0] == 0 and empty[1] > 0.6 and empty[2] > 0.4, "the padded key blocks are skipped"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_llama_packed_documents_4d_mask(impl, monkeypatch):
    """HuggingFace Llama given a 4-D packed-document mask (bool for SDPA, additive for eager): the
    transformed model equals the original; the fold skips the blocks across documents, built once per
    forward for all layers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                                   attn_implementation=impl)
    model = transformers.LlamaForCausalLM(cfg).eval()
    lengths = (70, 33, 97)
    n = sum(lengths)
    ids = document_ids(torch.tensor(lengths))[None]
    mask = ((ids[:, :, None] == ids[:, None, :]) & torch.ones(n, n, dtype=torch.bool).tril())[:, None]
    if impl == "eager":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    kw = dict(input_ids=torch.randint(0, 100, (1, n)), attention_mask=mask,
              position_ids=torch.cat([torch.arange(m) for m in lengths])[None])
    seen = spy_layouts(monkeypatch)
    sparse = fxsparse.transform(model, P.dense(block_size=32), example_inputs=kw)
    builds = []
    for name in ("block_tables", "key_padding_tables"):
        real = getattr(fxsparse.masks, name)
        monkeypatch.setattr(fxsparse.masks, name, lambda *a, real=real: builds.append(1) or real(*a))
    with torch.no_grad():
        got = sparse(**dict(kw, attention_mask=mask.clone()))  # a new mask tensor: folded once for every layer
        want = model(**kw).logits
    assert_close(got.logits, want, what="transformed vs the original, packed documents")
    layout, bias = seen[-1]
    assert int((layout.kinds == Layout.EMPTY).sum()) > 0.5 * layout.kinds.numel()
    assert (bias is None) == (impl == "sdpa")
    if impl == "sdpa":
        assert len(builds) == 1, "one layout per forward for every layer"


class MaskedAttention(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_fold_follows_a_mask_changed_in_place():
    """The folds kept per mask tensor are keyed by its version: a mask written in place is folded again."""
    q, k, v = qkv(2, 2, 2, 96, 96, 16, seed=4, grad=False)
    keep = padded_keys(2, 96, seed=5)[:, None, None, :].expand(2, 1, 96, 96).clone()
    model = MaskedAttention()
    sparse = fxsparse.transform(model, P.dense(block_size=32), example_inputs=(q, k, v, keep))
    for _ in range(2):
        with torch.no_grad():
            got, want = sparse(q, k, v, keep), model(q, k, v, keep)
        rows = keep.any(-1, keepdim=True)
        assert_close(got * rows, want * rows, what="mask folded")
        keep[0, :, :, 60:] = True  # in place: the version changes
        keep[1, :, :, :30] = False


def test_fold_keeps_the_bias_where_only_it_is_given():
    """An additive mask with rows that keep no key, and a bias that is more than the mask: the fold
    skips only blocks where every entry is masked and gives what the unfolded call gives."""
    n, bs = 128, 32
    q, k, v = qkv(2, 2, 2, n, n, 16, seed=6, grad=False)
    base = P.dense(block_size=bs).layout(n, n)
    keep = padded_keys(2, n, seed=7)[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
    keep[0, :, 100:] = False  # query rows with no key
    bias = torch.randn(2, 1, n, n, generator=gen(8)).masked_fill(~keep, torch.finfo(torch.float32).min)
    layout, kept = _fold_mask_bias(base, bias)
    assert kept is bias and layout.batch == 2
    assert int((layout.kinds == Layout.EMPTY).sum()) > 0
    got = fxsparse.sparse_attention(q, k, v, layout, bias=bias)
    assert_close(got, fxsparse.sparse_attention(q, k, v, base, bias=bias), tol=1e-6, what="folded vs not folded")
    # a per-head bias stays as it is; so does a layout mask_fn made sparse
    per_head = bias.expand(2, 2, n, n).contiguous()
    assert _fold_mask_bias(base, per_head) == (base, per_head)
    window = P.sliding_window(8).layout(n, n, block_size=bs)
    assert _fold_mask_bias(window, bias) == (window, bias)


def test_bool_mask_drops_its_blocks_from_a_sparse_layout():
    """A layout mask_fn made sparse, given the model's bool mask (padding, query rows with no key): the
    blocks the mask empties leave the layout, the mask stays as a bias for the rest, and the result is
    the masked window's (float64 oracle) and the unfolded call's. Folds are kept per mask and tables:
    each layer with these tables gets the same one, another layout its own."""
    n, bs = 128, 32
    q, k, v = qkv(2, 2, 2, n, n, 16, seed=13, grad=False)
    window = P.sliding_window(40).layout(n, n, block_size=bs)
    keep = padded_keys(2, n, seed=14)[:, None, None, :].expand(2, 1, n, n)
    fxsparse.site._FOLDED.clear()
    layout, kept = _fold_mask_bias(window, None, keep, like=q)
    assert kept is not None and kept.dtype == q.dtype, "the mask stays, made additive"
    dropped = (layout.kinds == Layout.EMPTY) & (window.kinds != Layout.EMPTY)
    assert int(dropped.sum()) > 0 and not bool(((layout.kinds != Layout.EMPTY) & (window.kinds == Layout.EMPTY)).any())
    got = fxsparse.sparse_attention(q, k, v, layout, bias=kept)
    want = dense_attention(q.double(), k.double(), v.double(), window.to_mask() & keep)
    assert_close(got, want.to(got.dtype), tol=1e-5, what="window with the model's bool mask")
    assert_close(got, fxsparse.sparse_attention(q, k, v, window, bias=kept), tol=1e-6, what="folded vs not folded")
    assert _fold_mask_bias(window, None, keep, like=q)[0] is layout
    other = P.sliding_window(8).layout(n, n, block_size=bs)
    assert not torch.equal(_fold_mask_bias(other, None, keep, like=q)[0].kinds, layout.kinds)


@pytest.mark.parametrize("with_mask", [False, True])
def test_fold_keeps_a_window_inside_one_partial_block(with_mask):
    """A window over 20 tokens in 128-blocks is one partial block: its block density is 1, but its mask
    is not all True, so the model's mask must not replace it (against the float64 oracle)."""
    n = 20
    q, k, v = qkv(2, 2, 2, n, n, 16, seed=11, grad=False)
    window = P.sliding_window(2).layout(n, n)
    assert window.density == 1.0
    keep = torch.ones(2, 1, n, n, dtype=torch.bool)
    keep[1, ..., n - 2:] = False  # every query row keeps a key of its window
    bias = torch.zeros(2, 1, n, n).masked_fill(~keep, torch.finfo(torch.float32).min)
    layout, kept = _fold_mask_bias(window, bias, keep if with_mask else None)
    got = fxsparse.sparse_attention(q, k, v, layout, bias=kept)
    want = dense_attention(q.double(), k.double(), v.double(), window.to_mask() & keep)
    assert_close(got, want.to(got.dtype), tol=1e-5, what="window with the model's mask")


def test_compiled_transformed_model_keeps_the_mask(monkeypatch):
    """Under torch.compile the site runs as one op that gets the model's bool mask as it is (not made
    additive in the graph); the op folds it into the layout when it runs, forward and backward, and
    no bias is left: the same result and gradients as eager and the model."""
    folds, walked = [], []
    monkeypatch.setattr(fxsparse.site, "_fold_mask_bias", lambda *a, **kw: folds.append(1) or _fold_mask_bias(*a, **kw))
    forward, backward = fxsparse.op.layout_forward, fxsparse.op.layout_backward
    monkeypatch.setattr(fxsparse.op, "layout_forward", lambda q, k, v, layout, **kw: walked.append((layout, kw["bias"]))
                        or forward(q, k, v, layout, **kw))
    monkeypatch.setattr(fxsparse.op, "layout_backward", lambda *a, **kw: walked.append((a[6], kw["bias"]))
                        or backward(*a, **kw))
    q, k, v = qkv(2, 2, 2, 96, 96, 16, seed=9)
    keep = padded_keys(2, 96, seed=10)[:, None, None, :].expand(2, 1, 96, 96)
    keep = keep | ~keep.any(-1, keepdim=True)  # SDPA's compiled math path differs on rows with no key
    model = MaskedAttention()
    sparse = fxsparse.transform(model, P.dense(block_size=32), example_inputs=(q, k, v, keep))
    want = model(q, k, v, keep)
    grads_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    eager = sparse(q, k, v, keep)
    eager_folds = len(folds)
    compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)(q, k, v, keep)
    grads = torch.autograd.grad(compiled.square().sum(), (q, k, v))
    assert eager_folds > 0 and len(folds) > eager_folds, "a compiled site's op folds the mask too"
    # forward and backward walked the mask's exact layout (one per sample, without the padded keys'
    # blocks) and applied no bias
    assert len(walked) == 2 and all(lay.batch == 2 and bool((lay.kinds == Layout.EMPTY).any()) and bias is None
                                    for lay, bias in walked)
    assert_close(eager, want, what="eager, folded")
    assert_close(compiled, want, what="compiled, folded")
    for got, ref, name in zip(grads, grads_want, "qkv"):
        assert_close(got, ref, what=f"compiled, folded: d{name}")


@pytest.mark.interpret
@pytest.mark.parametrize("with_mask", [True, False])
def test_folded_layouts_through_the_kernels(with_mask):
    """The Triton kernels (GPU, or the interpreter) on folded layouts, forward and backward, against
    the float64 oracle: the exact layout of a bool mask without bias, and the layout that keeps the bias."""
    n, bs = 128, 64
    q, k, v = qkv(2, 2, 1, n, n, 32, seed=11)
    keep = padded_keys(2, n, seed=12)
    keep[1] = True
    keep[1, 70:] = False
    mask = keep[:, None, None, :].expand(2, 1, n, n)
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    layout, kept = _fold_mask_bias(P.dense(block_size=bs).layout(n, n), bias, mask if with_mask else None)
    assert (kept is None) == with_mask
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask, op_mask=layout, bias=kept)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_layout_is_the_documents_exact_layout(causal):
    """Documents given by their lengths (empty ones, documents shorter than a block, padding after
    them, per sample): the same mask as document_layout's and every block's kind exact, in blocks of
    32, 64 and 128; through the op against the float64 oracle."""
    g = gen(13)
    for trial in range(12):
        longest = (3, 20, 90, 300)[trial % 4]
        lengths = torch.randint(0, longest, (2, 1 + trial), generator=g)
        n = int(lengths.sum(-1).max()) + int(torch.randint(1, 40, (), generator=g))
        bs = (32, 64, 128)[trial % 3]
        layout = packed_layout(lengths, n, causal=causal, block_size=bs)
        ids = document_ids(lengths, total=n)
        mask = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
        if causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool).tril()
        assert torch.equal(layout.to_mask()[:, 0], mask), (lengths, n, bs)
        assert torch.equal(layout.kinds, Layout.from_mask(mask[:, None], bs).kinds), (lengths, n, bs)
        assert layout.causal == causal
    q, k, v = qkv(2, 2, 1, n, n, 16, seed=14)
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask[:, None], op_mask=layout)
    one = packed_layout(torch.tensor([50, 30]), block_size=32)  # 1-D lengths, total = their sum
    assert one.batch == 1 and one.shape == (80, 80)
    with pytest.raises(ValueError, match="lengths must be an integer"):
        packed_layout(torch.tensor([1.5, 2.0]), 4)
    for total in (None, 64):  # a negative length: named, with or without the total
        with pytest.raises(ValueError, match="lengths must be >= 0, got -3"):
            packed_layout(torch.tensor([[40, -3, 20], [10, 10, 0]]), total)


@pytest.mark.interpret
def test_packed_layout_through_the_kernels():
    """The Triton kernels (GPU, or the interpreter) on a packed_layout, whose masks are not deduplicated."""
    lengths = torch.tensor([[50, 9, 60], [128, 0, 0]])
    layout = packed_layout(lengths, 128, block_size=64)
    ids = document_ids(lengths, total=128)
    mask = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)  # padding (id -1) attends to nothing
    mask = (mask & torch.ones(128, 128, dtype=torch.bool).tril())[:, None]
    q, k, v = qkv(2, 2, 1, 128, 128, 32, seed=15)
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask, op_mask=layout, causal=True)


def test_nothing_reused_while_a_cuda_graph_is_captured(monkeypatch):
    """A fold or a bool mask made additive before a CUDA graph's capture must not be reused inside it:
    a replay runs only the captured kernels, so with new data in the mask's buffer it would read the
    old result. While capturing (stood in for here), each call computes its own, and nothing is kept."""
    n = 64
    base = P.dense(block_size=32).layout(n, n)
    keep = padded_keys(2, n, seed=12)[:, None, None, :].expand(2, 1, n, n)
    bias = torch.zeros(2, 1, n, n).masked_fill(~keep, torch.finfo(torch.float32).min)
    q = torch.zeros(2, 2, n, 16)
    folds = []
    real_fold = fxsparse.site._fold
    monkeypatch.setattr(fxsparse.site, "_fold", lambda *a: folds.append(1) or real_fold(*a))
    fxsparse.site._FOLDED.clear()
    fxsparse.site._LAST_BIAS.clear()
    first = _fold_mask_bias(base, bias)
    assert _fold_mask_bias(base, bias)[0] is first[0] and len(folds) == 1  # eager: folded once for every layer
    assert fxsparse.site._bool_mask_bias(keep, q) is fxsparse.site._bool_mask_bias(keep, q)
    monkeypatch.setattr(fxsparse.site, "capturing", lambda t: True)
    fxsparse.site._FOLDED.clear()
    a, b = _fold_mask_bias(base, bias), _fold_mask_bias(base, bias)
    assert a[0] is not b[0] and len(folds) == 3 and not fxsparse.site._FOLDED
    assert torch.equal(a[0].data, first[0].data)
    x, y = fxsparse.site._bool_mask_bias(keep, q), fxsparse.site._bool_mask_bias(keep, q)
    assert x is not y and torch.equal(x, y)
