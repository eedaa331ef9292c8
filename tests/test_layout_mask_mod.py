"""Layouts from mask functions, analytic pattern layouts, layout algebra, the layout cache, FlexAttention
interop and runtime masks (padding, packed documents), each against the materialized token mask or
the float64 masked-dense oracle."""
from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fxsparse
import fxsparse.layout as layout_mod
from fxsparse import Layout
from fxsparse import patterns as P
from fxsparse.layout import _LAYOUTS, LAYOUT_CACHE_SIZE, resolve_mask
from fxsparse.masks import document_ids, document_layout, key_padding_layout, model_mask_layout, padding_layout
from fxsparse.testing import compare_with_oracle
from helpers import gen, qkv


def materialize(mask_mod, bl, hl, nq, nk):
    """The token mask by a Python loop over (b, h, i), one row of keys at a time."""
    out = torch.zeros(bl, hl, nq, nk, dtype=torch.bool)
    kv = torch.arange(nk)
    for b in range(bl):
        for h in range(hl):
            for i in range(nq):
                out[b, h, i] = mask_mod(torch.tensor(b), torch.tensor(h), torch.tensor(i), kv)
    return out


# ------------------------------------------------------------------------------- from_mask_mod
@pytest.mark.parametrize("nq,nk,bl,hl,bs", [(37, 53, 1, 1, 32), (100, 70, 2, 3, 32), (300, 257, 1, 2, 128),
                                            (65, 200, 3, 1, 64), (33, 33, 1, 1, 256)])
@pytest.mark.parametrize("seed", [0, 1])
def test_from_mask_mod_equals_from_mask(nq, nk, bl, hl, bs, seed):
    g = gen(seed)
    noise = torch.rand(bl, hl, nq, nk, generator=g) < 0.3
    width = torch.randint(0, 40, (hl,), generator=g)
    doc = torch.randint(0, 3, (bl, max(nq, nk)), generator=g).sort(-1).values

    def mask_mod(b, h, q_idx, kv_idx):  # index arithmetic, per-head and per-sample captured tensors
        window = (q_idx - kv_idx).abs() <= width[h] + b
        return (window & (doc[b, q_idx] == doc[b, kv_idx])) | (noise[b, h, q_idx, kv_idx] & (q_idx % 3 == 0))

    got = Layout.from_mask_mod(mask_mod, nq, nk, batch=bl, heads=hl, block_size=bs)
    want = Layout.from_mask(materialize(mask_mod, bl, hl, nq, nk), bs)
    assert torch.equal(got.data, want.data)
    assert (got.batch, got.num_heads, got.shape) == (bl, hl, (nq, nk))
    assert got.density == pytest.approx(want.density)


def test_from_mask_mod_flex_style_indexing_and_broadcast():
    """doc[b][q_idx] (chained indexing, as written for FlexAttention) works; batch=None calls with b = 0."""
    doc = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64])

    def same_doc(b, h, q_idx, kv_idx):
        return doc[b][q_idx] == doc[b][kv_idx]

    got = Layout.from_mask_mod(same_doc, 64, 64, batch=2, block_size=32).to_mask()
    assert torch.equal(got, (doc[:, None, :, None] == doc[:, None, None, :]))
    first = Layout.from_mask_mod(same_doc, 64, 64, block_size=32)
    assert first.batch == 1 and torch.equal(first.to_mask()[0], got[0])


def test_from_mask_mod_errors():
    def python_if(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return True
        return False

    with pytest.raises(ValueError, match="mask_mod python_if failed.*not Python `if`"):
        Layout.from_mask_mod(python_if, 40, 40, block_size=32)
    with pytest.raises(TypeError, match="must return a bool tensor"):
        Layout.from_mask_mod(lambda b, h, q, kv: q - kv, 40, 40, block_size=32)
    with pytest.raises(TypeError, match="mask_mod must be a function"):
        Layout.from_mask_mod(torch.ones(4, 4, dtype=torch.bool), 4, 4)
    with pytest.raises(ValueError, match="q_len must be an integer"):
        Layout.from_mask_mod(lambda b, h, q, kv: q >= kv, 40.0, 40)
    with pytest.raises(ValueError, match="block_size must be one of"):
        Layout.from_mask_mod(lambda b, h, q, kv: q >= kv, 40, 40, block_size=48)
    lay = Layout.from_mask_mod(lambda b, h, q, kv: q >= kv, 40, 40, block_size=np.int64(32))
    assert lay.block_size == 32 and type(lay.block_size) is int


# ------------------------------------------------------------------------------- analytic pattern layouts
PATTERNS = [P.sliding_window(3), P.sliding_window(70, causal=True), P.sliding_window(64, causal=True),
            P.causal(), P.global_tokens(40), P.dense(), P.local_2d(1, prefix_tokens=1),
            P.bigbird(64, 1, 3, 1), P.bigbird(20, 2, 3, 1),
            P.union(P.sliding_window(2), P.global_tokens(1)), P.intersect(P.causal(), P.sliding_window(40))]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("nq,nk,bs", [(401, 401, 32), (300, 300, 64), (100, 300, 32), (512, 512, 128),
                                      (300, 100, 32)])
def test_pattern_layouts_equal_evaluated(pattern, nq, nk, bs):
    """A pattern's analytic layout (blocks known full / empty without evaluation) equals the layout of
    its mask_mod evaluated at every position, and of the materialized mask."""
    try:
        mod = pattern.mask_mod(nq, nk)
    except ValueError as err:  # local_2d: self-attention on a square grid only
        assert isinstance(pattern, P.Local2d) and ("self-attention" in str(err) or "square" in str(err))
        return
    analytic = pattern.layout(nq, nk, block_size=bs)
    evaluated = Layout.from_mask_mod(lambda b, h, q, kv: mod(b, h, q, kv), nq, nk, block_size=bs)  # no block kinds
    token = Layout.from_mask(pattern.mask(nq, nk), bs)  # the mask itself is checked in test_patterns.py
    assert torch.equal(analytic.data, evaluated.data)
    assert torch.equal(analytic.data, token.data)


def test_sliding_window_at_128k_on_cpu_stays_under_1_gib():
    """Building a 128k causal sliding-window layout, then a 128k layout of 16 packed documents, never
    makes an [N, N] tensor: the process's peak resident memory grows by less than 1 GiB (a 131072^2
    bool mask alone would be 16 GiB)."""
    code = textwrap.dedent("""
        import resource, torch
        from fxsparse import patterns
        from fxsparse.masks import document_ids, document_layout
        ids = document_ids(torch.full((16,), 8192) + torch.arange(16) * 64 - 480)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        layout = patterns.sliding_window(4096, causal=True).layout(131072, 131072, block_size=128)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kinds = layout.kinds
        print((after - before) * 1024, int((kinds == 2).sum()), int((kinds == 1).sum()), layout.causal)
        del layout, kinds
        docs = document_layout(ids, causal=True)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, ids.numel(), docs.causal)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    (grown, full, partial, causal), (docs_grown, docs_n, docs_causal) = (line.split() for line in out.stdout.splitlines())
    assert int(grown) < 2**30, f"peak memory grew by {int(grown) / 2**20:.0f} MiB"
    assert int(docs_n) == 131072 and docs_causal == "True"
    assert int(docs_grown) < 2**30, f"peak memory grew by {int(docs_grown) / 2**20:.0f} MiB with the documents"
    # 1024 block rows; a window of 4096 = 32 blocks: 31 full blocks a row below the diagonal (fewer at
    # the start), the diagonal block and the window's far edge partial
    assert int(full) == sum(min(a, 31) for a in range(1024)) and int(partial) == 1024 + 1024 - 32
    assert causal == "True"


# ------------------------------------------------------------------------------- patterns as objects
def test_pattern_objects_are_named_picklable_and_compare_by_parameters():
    fn = P.only(P.union(P.sliding_window(4, causal=True), P.global_tokens(1)), layers=range(3), block_size=32)
    again = pickle.loads(pickle.dumps(fn))
    assert again == fn and hash(again) == hash(fn) and repr(again) == repr(fn)
    assert repr(fn) == ("only(union(sliding_window(window=4, causal=True), global_tokens(n=1)), "
                        "layers=range(0, 3), block_size=32)")
    assert P.sliding_window(np.int64(4)) == P.sliding_window(4) != P.sliding_window(5)
    assert P.sliding_window(4) != P.sliding_window(4, causal=True)
    assert len({P.causal(), P.causal(), P.dense()}) == 2
    mod = P.sliding_window(4).mask_mod(10, 10)
    assert pickle.loads(pickle.dumps(mod)) == mod and "sliding_window(window=4).mask_mod(10, 10)" == repr(mod)


@pytest.mark.parametrize("make,message", [
    (lambda: P.local_2d(window=1.5), "local_2d: window must be an integer, got 1.5"),
    (lambda: P.sliding_window(-1), "sliding_window: window must be >= 0"),
    (lambda: P.sliding_window(2, causal="yes"), "causal must be True or False"),
    (lambda: P.global_tokens(True), "global_tokens: n must be an integer"),
    (lambda: P.local_2d(1, grid=(4, 4.0)), "grid width must be an integer"),
    (lambda: P.bigbird(16, 1, 2, 0), "odd number of window blocks"),
    (lambda: P.causal(block_size=48), "block_size must be one of 32, 64, 128, 256, got 48"),
    (lambda: P.only(P.causal(), layers=[0], block_size=1.0), "block_size must be one of"),
])
def test_pattern_arguments_checked(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_block_size_everywhere():
    class Site:
        index, name, num_heads, q_len, kv_len = 0, "blocks.0.attn", 2, 197, 197

    for fn in (P.local_2d(2, prefix_tokens=1, block_size=32), P.only(P.local_2d(2, prefix_tokens=1), layers=[0],
               block_size=32), P.union(P.local_2d(2, prefix_tokens=1), P.global_tokens(1), block_size=32),
               P.union(P.local_2d(2, prefix_tokens=1), lambda s: None, block_size=32),
               P.only(lambda s: P.local_2d_mask(s.q_len, window=2, prefix_tokens=1), layers=[0], block_size=32)):
        out = fn(Site())
        if out is None:
            assert "lambda" in repr(fn)  # union with a dense part is dense
            continue
        assert out.block_size == 32, fn
        want = P.local_2d_mask(197, window=2, prefix_tokens=1)
        assert torch.equal(out.to_mask()[0, 0] & want, out.to_mask()[0, 0]) and out.density < 1


# ------------------------------------------------------------------------------- one layout per mask and shape
def test_cache_shares_layouts_and_stays_bounded():
    fxsparse.clear_caches()
    sw = P.sliding_window(8, causal=True)
    a = sw.layout(300, 300, block_size=32)
    assert P.sliding_window(8, causal=True).layout(300, 300, block_size=32) is a  # an equal pattern: the same one
    assert sw.layout(300, 300, block_size=64) is not a and sw.layout(301, 301, block_size=32) is not a
    for n in range(1, 1001):
        sw.layout(n, n, block_size=32)
        assert len(_LAYOUTS) <= LAYOUT_CACHE_SIZE
    assert len(_LAYOUTS) == LAYOUT_CACHE_SIZE
    fxsparse.clear_caches()
    assert len(_LAYOUTS) == 0


def test_model_sites_share_one_layout():
    """A 3-layer model built with one pattern: every site gets the very same Layout object."""

    class Site:
        def __init__(self, i):
            self.index, self.name, self.num_heads, self.q_len, self.kv_len = i, f"h.{i}.attn", 4, 200, 200

    fxsparse.clear_caches()
    fn = P.only(P.sliding_window(16, causal=True), layers=range(3))
    layouts = [fn(Site(i)) for i in range(3)]
    assert layouts[0] is layouts[1] is layouts[2] and len(_LAYOUTS) == 1


# ------------------------------------------------------------------------------- resolve_mask
def test_resolve_mask_forms_and_errors():
    kw = dict(q_len=40, kv_len=40, num_heads=4)
    tri = torch.ones(40, 40, dtype=torch.bool).tril()
    assert resolve_mask(None, **kw) is None
    for form in (tri, tri[None], Layout.from_mask(tri, 32), P.causal(), lambda b, h, q, kv: kv <= q):
        out = resolve_mask(form, **kw, block_size=32)
        assert out.block_size == 32 and out.num_heads == 1 and torch.equal(out.to_mask()[0, 0], tri), form
    per_head = resolve_mask(lambda b, h, q, kv: (q - kv).abs() <= h, **kw, block_size=32)
    assert per_head.num_heads == 4
    for h in range(4):
        i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
        assert torch.equal(per_head.to_mask()[0, h], (i - j).abs() <= h)
    two = Layout.from_mask(torch.ones(2, 1, 40, 40, dtype=torch.bool), 32)
    with pytest.raises(ValueError, match=r"blocks.0.attn: the Layout was built for batch 2 where the attention has 1"):
        resolve_mask(two, **kw, where="blocks.0.attn")
    with pytest.raises(ValueError, match=r"\(q_len, kv_len\) = \(40, 40\) instead of \(40, 41\)"):
        resolve_mask(Layout.from_mask(tri, 32), q_len=40, kv_len=41, num_heads=4)
    with pytest.raises(TypeError, match="a mask must be bool"):
        resolve_mask(tri.float(), **kw)
    with pytest.raises(ValueError, match="does not broadcast"):
        resolve_mask(torch.ones(3, 40, 40, dtype=torch.bool), **kw)
    with pytest.raises(TypeError, match="expected None, a bool tensor, a fxsparse.Layout, a pattern or a mask_mod"):
        resolve_mask("causal", **kw)
    with pytest.raises(ValueError, match="mask_fn: local_2d needs self-attention"):
        resolve_mask(P.local_2d(1), q_len=40, kv_len=50, num_heads=4)


# ------------------------------------------------------------------------------- layout algebra and causality
@pytest.mark.parametrize("nq,nk,bs", [(100, 70, 32), (200, 200, 64), (130, 257, 128)])
def test_and_or_fold_causal(nq, nk, bs):
    a_mask = torch.rand(2, 1, nq, nk, generator=gen(1)) < 0.4
    a_mask[:, :, :, :bs] = True  # full blocks
    b_mask = (torch.arange(nq)[:, None] - torch.arange(nk)[None, :]).abs() <= 30
    a, b = Layout.from_mask(a_mask, bs), Layout.from_mask(b_mask, 32)
    assert torch.equal((a & b).to_mask(), a_mask & b_mask) and (a & b).block_size == 32
    assert torch.equal((a | b).to_mask(), a_mask | b_mask)
    tri = torch.ones(nq, nk, dtype=torch.bool).tril()
    folded = a.fold_causal()
    assert folded.causal and not a.causal and torch.equal(folded.to_mask(), a_mask & tri)
    assert folded.fold_causal() is folded
    with pytest.raises(ValueError, match="shapes"):
        a & Layout.from_mask(b_mask[:, :-1], 32)


def test_layout_causal_skips_the_flag_and_stays_exact():
    """A layout inside the causal triangle runs with causal=True exactly as without the flag."""
    q, k, v = qkv(2, 2, 2, 150, 150, 16, seed=3)
    layout = P.sliding_window(20, causal=True).layout(150, 150, block_size=32)
    assert layout.causal
    mask = P.sliding_window_mask(150, 150, window=20, causal=True)
    for causal in (False, True):
        compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask, op_mask=layout, causal=causal)


def test_sparse_attention_takes_mask_mods_and_patterns():
    q, k, v = qkv(1, 2, 1, 90, 110, 16, seed=4)
    mask = P.sliding_window_mask(90, 110, window=10)
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask, op_mask=P.sliding_window(10))
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask,
                        op_mask=lambda b, h, q_idx, kv_idx: (q_idx + 20 - kv_idx).abs() <= 10)


# ------------------------------------------------------------------------------- FlexAttention interop
flex = pytest.importorskip("torch.nn.attention.flex_attention", reason="FlexAttention is not available")


def test_block_mask_round_trip():
    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 40

    bm = flex.create_block_mask(window, None, None, 300, 270, device="cpu", BLOCK_SIZE=64)
    got = Layout.from_block_mask(bm)
    assert torch.equal(got.data, Layout.from_mask_mod(window, 300, 270, block_size=64).data)
    noise = torch.rand(2, 300, 270, generator=gen(2)) < 0.5
    tok = noise[:, None] | ((torch.arange(300)[:, None] - torch.arange(270)[None, :]).abs() <= 10)
    layout = Layout.from_mask(tok, 64)
    back = Layout.from_block_mask(layout.to_block_mask())  # the tables' own mask_mod
    assert torch.equal(back.to_mask(), tok) and torch.equal(back.data, layout.data)
    dense_bm = layout.to_block_mask().to_dense()  # the same blocks, in FlexAttention's terms
    assert torch.equal(dense_bm.bool(), (layout.kinds != 0))
    with pytest.raises(ValueError, match="block sizes differ"):
        Layout.from_block_mask(flex.create_block_mask(window, None, None, 256, 256, device="cpu",
                                                      BLOCK_SIZE=(128, 64)))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_to_block_mask_runs_in_flex_attention_as_in_the_op():
    q, k, v = qkv(1, 2, 2, 128, 128, 16, seed=5, grad=False)
    layout = P.union(P.sliding_window(9, causal=True), P.global_tokens(3)).layout(128, 128, block_size=32)
    want = fxsparse.sparse_attention(q, k, v, layout)
    got = flex.flex_attention(q, k, v, block_mask=layout.to_block_mask())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- runtime masks
@pytest.mark.parametrize("causal", [False, True])
def test_padding_layout_is_exactly_masked_dense(causal):
    n, bs = 150, 32
    lengths = torch.tensor([150, 61, 1])
    layout = padding_layout(lengths, n, block_size=bs, causal=causal)
    keep = torch.arange(n)[None, :] < lengths[:, None]
    assert layout.batch == 3 and layout.causal == causal
    assert torch.equal(key_padding_layout(keep, n, block_size=bs, causal=causal).data, layout.data)
    mask = keep[:, None, None, :].expand(3, 1, n, n)
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(layout.to_mask(), mask)
    q, k, v = qkv(3, 2, 2, n, n, 16, seed=6)
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask, op_mask=layout, causal=causal)
    # composed with a pattern: batch broadcasts
    both = P.sliding_window(20).layout(n, n, block_size=bs) & layout
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask & P.sliding_window_mask(n, n, window=20),
                        op_mask=both)
    assert both.density < layout.density


def test_key_padding_layout_any_pattern_of_keys():
    keep = torch.rand(2, 97, generator=gen(7)) < 0.6
    keep[1, :64] = False  # a whole empty kv block
    layout = key_padding_layout(keep, 50, block_size=32)
    assert torch.equal(layout.to_mask(), keep[:, None, None, :].expand(2, 1, 50, 97))
    assert int((layout.kinds[1, 0, :, :2] == 0).sum()) == 2 * 2  # the padding blocks are never visited
    with pytest.raises(ValueError, match="keep must be a bool"):
        key_padding_layout(keep.int(), 50)


@pytest.mark.parametrize("causal", [False, True])
def test_document_layout_is_exactly_masked_dense(causal):
    lengths = torch.tensor([[40, 7, 100, 3], [150, 0, 0, 0]])
    ids = document_ids(lengths, total=160)  # 10 padding tokens at the end of each sample
    assert ids.shape == (2, 160) and ids[0, 40] == 1 and ids[0, 46] == 1 and ids[0, 47] == 2 and ids[0, 150] == -1
    layout = document_layout(ids, causal=causal, block_size=32)
    mask = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
    if causal:
        mask = mask & torch.ones(160, 160, dtype=torch.bool).tril()
    assert torch.equal(layout.to_mask()[:, 0], mask) and layout.causal == causal
    q, k, v = qkv(2, 2, 1, 160, 160, 16, seed=8)
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask[:, None], op_mask=layout, causal=causal)
    # unsorted ids are still exact
    shuffled = ids[:, torch.randperm(160, generator=gen(9))]
    got = document_layout(shuffled, block_size=32).to_mask()[:, 0]
    assert torch.equal(got, (shuffled[:, :, None] == shuffled[:, None, :]) & (shuffled[:, :, None] >= 0))


def test_document_layout_skips_blocks_across_documents():
    ids = document_ids(torch.full((16,), 256))  # 16 documents of 2 blocks of 128
    layout = document_layout(ids, causal=True)
    kinds = layout.kinds[0, 0]
    assert int((kinds == 2).sum()) == 16 and int((kinds == 1).sum()) == 32  # one full and two diagonal blocks a doc
    assert layout.density == pytest.approx(16 * 3 * 128 * 128 / 4096**2)  # the scores of the visited blocks


def _documents_mask(q_ids, kv_ids, causal):
    mask = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] >= 0)
    if causal:
        mask = mask & torch.ones(q_ids.shape[1], kv_ids.shape[1], dtype=torch.bool).tril()
    return mask[:, None]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_document_layout_equals_the_materialized_mask(chunked, causal, seed, monkeypatch):
    """document_layout evaluates one block per document boundary (blocks of one document share it)
    and classifies the rest: its tables equal Layout.from_mask of the materialized mask, with uneven,
    short and empty documents, padding, a batch and lengths that are not a multiple of the block;
    ``chunked``: a few block rows at a time, the kinds classified again in the second pass."""
    if chunked:
        monkeypatch.setattr(layout_mod, "_CHUNK", 1 << 8)
        monkeypatch.setattr(layout_mod, "_KEEP", 0)
    g = gen(seed)
    bs = (32, 64, 32)[seed]
    n = int(torch.randint(200, 600, (1,), generator=g))
    lengths = torch.randint(0, 120, (2, 10), generator=g)  # some empty, some shorter than a block
    lengths = torch.where(lengths.cumsum(-1) <= n, lengths, 0)  # the rest of each sample is padding
    ids = document_ids(lengths, total=n)
    got = document_layout(ids, causal=causal, block_size=bs)
    want = Layout.from_mask(_documents_mask(ids, ids, causal), bs)
    assert torch.equal(got.data, want.data)
    assert got.density == pytest.approx(want.density) and got.causal == want.causal


@pytest.mark.parametrize("causal", [False, True])
def test_document_layout_with_query_ids(causal):
    """Queries with ids of their own, exactly the materialized mask: fewer than the keys, one id list
    shared by the batch; a query block of one document facing a kv block cut by a document boundary
    both on the diagonal (where causality cuts it too) and below it."""
    kv_ids = document_ids(torch.tensor([[20, 100, 60, 3, 50], [200, 0, 0, 30, 3]]))
    q_ids = torch.tensor([1] * 100 + [2] * 50 + [4] * 5)[None]
    got = document_layout(kv_ids, q_doc_ids=q_ids, causal=causal, block_size=32)
    want = Layout.from_mask(_documents_mask(q_ids.expand(2, -1), kv_ids, causal), 32)
    assert torch.equal(got.data, want.data) and got.batch == 2


@pytest.mark.parametrize("pattern", [P.sliding_window(70, causal=True), P.sliding_window(3), P.causal(),
                                     P.global_tokens(40), P.union(P.sliding_window(2), P.global_tokens(1))], ids=repr)
def test_pattern_layouts_built_a_few_block_rows_at_a_time(pattern, monkeypatch):
    """With a small chunk every pass of the build (classify, evaluate, the forward and backward lists)
    runs over several chunks: the tables equal the materialized mask's."""
    monkeypatch.setattr(layout_mod, "_CHUNK", 1 << 7)
    monkeypatch.setattr(layout_mod, "_KEEP", 0)
    got = Layout.from_mask_mod(pattern.mask_mod(401, 389), 401, 389, block_size=32)
    assert torch.equal(got.data, Layout.from_mask(pattern.mask(401, 389), 32).data)


torch_unique = torch.unique


@pytest.mark.parametrize("collide", [False, True])
def test_unique_rows_groups_rows_exactly(collide, monkeypatch):
    """unique_rows (the distinct packed masks, grouped by a hash) gives what torch.unique gives, up to
    order; when distinct rows share a hash (all weights 0 here) it falls back to the exact row sort."""
    if collide:
        class Zeros(dict):
            def get(self, key, default=None):
                return torch.zeros(key[0], dtype=torch.int64)
        monkeypatch.setattr(layout_mod, "_HASH_WEIGHTS", Zeros())
        calls = []
        monkeypatch.setattr(layout_mod.torch, "unique", lambda *a, **k: calls.append(k) or torch_unique(*a, **k))
    g = gen(5)
    rows = torch.randint(-3, 3, (40, 16), generator=g, dtype=torch.int32)[torch.randint(0, 40, (300,), generator=g)]
    uniq, inverse = layout_mod.unique_rows(rows)
    assert torch.equal(uniq[inverse], rows)
    assert uniq.shape[0] == torch_unique(rows, dim=0).shape[0] == len({tuple(r) for r in rows.tolist()})
    if collide:
        assert calls[-1].get("dim") == 0  # the fallback ran


@pytest.mark.interpret
def test_runtime_layouts_through_the_kernels():
    """The Triton kernels (GPU, or the interpreter) on a document layout that holds causality, with and
    without the op's causal flag, and on a padding layout."""
    ids = document_ids(torch.tensor([[50, 30, 48], [100, 28, 0]]))
    layout = document_layout(ids, causal=True, block_size=32)
    mask = ((ids[:, :, None] == ids[:, None, :]) & torch.ones(128, 128, dtype=torch.bool).tril())[:, None]
    q, k, v = qkv(2, 2, 1, 128, 128, 32, seed=10)
    for causal in (False, True):
        compare_with_oracle(fxsparse.sparse_attention, q, k, v, mask, op_mask=layout, causal=causal)
    pad = padding_layout(torch.tensor([128, 70]), 128, block_size=64)
    compare_with_oracle(fxsparse.sparse_attention, q, k, v, pad.to_mask(), op_mask=pad)


def test_model_mask_layout_forms():
    """HuggingFace's 2-D padding mask, its 4-D additive expansion and a bool 4-D mask give the exact
    layout; the additive one runs exactly as the dense masked attention it replaces."""
    attention_mask = torch.tensor([[1] * 90 + [0] * 10, [0] * 30 + [1] * 70])  # right and left padding
    keep = attention_mask.bool()
    want = keep[:, None, None, :].expand(2, 1, 100, 100)
    additive = torch.zeros(2, 1, 1, 100).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    for form in (attention_mask, additive, keep[:, None, None, :], want):
        layout = model_mask_layout(form, 100, block_size=32)
        assert layout.batch == 2 and torch.equal(layout.to_mask(), want), form.shape
    causal_additive = additive + torch.full((100, 100), float("-inf")).triu(1)
    layout = model_mask_layout(causal_additive, 100, block_size=32)
    assert torch.equal(layout.to_mask(), want & torch.ones(100, 100, dtype=torch.bool).tril())
    q, k, v = qkv(2, 2, 2, 100, 100, 16, seed=11)
    rows = layout.to_mask().any(-1, keepdim=True)  # the rows with a key (fully masked rows differ: see masks)
    got = fxsparse.sparse_attention(q, k, v, layout) * rows
    want_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_additive) * rows
    torch.testing.assert_close(got, want_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="query rows"):
        model_mask_layout(torch.zeros(2, 1, 7, 100), 100)
