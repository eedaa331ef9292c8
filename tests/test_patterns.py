"""fxsparse.patterns against brute-force Python loops written from each pattern's definition."""
import math
from types import SimpleNamespace

import pytest
import torch

from fxsparse import patterns as P


def site(q_len, kv_len=None, index=0, name="blocks.0.attn", num_heads=4):
    kv_len = q_len if kv_len is None else kv_len
    return SimpleNamespace(index=index, name=name, kind="test", num_heads=num_heads,
                           num_kv_heads=num_heads, head_dim=8, q_len=q_len, kv_len=kv_len,
                           causal=False, has_bias=False)


def tok(fn, s):
    """The token mask a mask_fn gives at a site: [q_len, kv_len] (or [H, ...]); None stays None."""
    out = fn(s)
    if out is None or isinstance(out, torch.Tensor):
        return out
    m = out.to_mask()[0]
    return m[0] if m.shape[0] == 1 else m


def from_loops(q_len, kv_len, allowed):
    return torch.tensor([[bool(allowed(i, j)) for j in range(kv_len)] for i in range(q_len)],
                        dtype=torch.bool).reshape(q_len, kv_len)


def local_2d_loops(prefix, h, w, window):
    n = prefix + h * w

    def allowed(i, j):
        if i < prefix or j < prefix:
            return True
        (ri, ci), (rj, cj) = divmod(i - prefix, w), divmod(j - prefix, w)
        return max(abs(ri - rj), abs(ci - cj)) <= window
    return from_loops(n, n, allowed)


# ---------------------------------------------------------------------------------------------
# local_2d


@pytest.mark.parametrize("prefix,h,w,window", [
    (0, 4, 4, 1), (1, 14, 14, 2), (1, 5, 5, 0), (5, 6, 6, 1), (2, 3, 7, 1), (0, 7, 7, 3),
    (1, 4, 4, 10)])
def test_local_2d_matches_loops(prefix, h, w, window):
    expected = local_2d_loops(prefix, h, w, window)
    got = P.local_2d_mask(prefix + h * w, window=window, grid=(h, w))
    assert torch.equal(got, expected)
    if h == w:
        got = P.local_2d_mask(prefix + h * w, prefix + h * w, window=window, prefix_tokens=prefix)
        assert torch.equal(got, expected)
        assert torch.equal(tok(P.local_2d(window, prefix_tokens=prefix), site(prefix + h * w)),
                           expected)


@pytest.mark.parametrize("n,prefix,side", [(197, 1, 14), (196, 0, 14), (50, 1, 7),
                                           (201, 5, 14), (66, 2, 8), (18, 2, 4), (16, 0, 4),
                                           (1029, 5, 32)])
def test_local_2d_infers_square_grid(n, prefix, side):
    got = tok(P.local_2d(1), site(n))
    assert torch.equal(got, local_2d_loops(prefix, side, side, 1))


def test_local_2d_window_1_is_3x3_neighbourhood():
    m = P.local_2d_mask(1 + 25, window=1, prefix_tokens=1)
    # patch (2, 2) of a 5x5 grid is token 1 + 12; it sees its 3x3 neighbourhood and CLS
    row = m[1 + 12]
    seen = {(t - 1) // 5 * 10 + (t - 1) % 5 for t in range(1, 26) if row[t]}
    assert seen == {11, 12, 13, 21, 22, 23, 31, 32, 33}
    assert row[0] and m[0].all() and m[:, 0].all()


def test_local_2d_errors():
    with pytest.raises(ValueError, match="local_2d: 99 tokens are not a square grid"):
        P.local_2d(1)(site(99))
    for n in (12, 20, 7):       # 3 + 3x3, 4 + 4x4, 3 + 2x2: as many prefix tokens as a row
        with pytest.raises(ValueError, match="not a square grid"):
            P.local_2d(1)(site(n))
    assert P.local_2d(1, prefix_tokens=3)(site(12)).shape == (12, 12)
    with pytest.raises(ValueError, match="a grid of 4x4 patches does not make 15 tokens"):
        P.local_2d_mask(15, window=1, grid=(4, 4))
    with pytest.raises(ValueError, match="local_2d needs self-attention"):
        P.local_2d(1)(site(16, 32))
    with pytest.raises(ValueError, match="grid of 4x4 patches and 1 prefix tokens"):
        P.local_2d_mask(18, window=1, grid=(4, 4), prefix_tokens=1)


# ---------------------------------------------------------------------------------------------
# 1-D patterns


@pytest.mark.parametrize("q_len,kv_len", [(10, 10), (7, 12), (12, 5), (1, 9)])
@pytest.mark.parametrize("window", [0, 1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_matches_loops(q_len, kv_len, window, causal):
    off = kv_len - q_len   # the queries are the last q_len positions of the keys
    if causal:
        expected = from_loops(q_len, kv_len, lambda i, j: j <= i + off and i + off - j <= window)
    else:
        expected = from_loops(q_len, kv_len, lambda i, j: abs(i + off - j) <= window)
    assert torch.equal(P.sliding_window_mask(q_len, kv_len, window=window, causal=causal),
                       expected)
    assert torch.equal(tok(P.sliding_window(window, causal=causal), site(q_len, kv_len)), expected)


@pytest.mark.parametrize("q_len,kv_len,n", [(10, 10, 2), (6, 9, 1), (5, 5, 0), (4, 4, 7), (3, 9, 7)])
def test_global_tokens_matches_loops(q_len, kv_len, n):
    off = kv_len - q_len
    expected = from_loops(q_len, kv_len, lambda i, j: i + off < n or j < n)
    assert torch.equal(P.global_tokens_mask(q_len, kv_len, n=n), expected)
    assert torch.equal(tok(P.global_tokens(n), site(q_len, kv_len)), expected)


@pytest.mark.parametrize("q_len,kv_len", [(6, 6), (4, 9), (9, 4)])
def test_causal_matches_loops(q_len, kv_len):
    expected = from_loops(q_len, kv_len, lambda i, j: j <= i + kv_len - q_len)
    assert torch.equal(P.causal_mask(q_len, kv_len), expected)
    assert torch.equal(tok(P.causal(), site(q_len, kv_len)), expected)
    assert repr(P.causal()) == "causal()"


@pytest.mark.parametrize("pattern", [P.causal(), P.sliding_window(5, causal=True), P.sliding_window(3),
                                     P.global_tokens(2)], ids=repr)
def test_decode_rows_are_the_last_rows_of_the_full_mask(pattern):
    """With a KV cache the q_len new queries are the last positions: their rows of the mask are the
    last q_len rows of the full [kv_len, kv_len] mask, at every step."""
    kv_len = 23
    full = pattern.mask(kv_len, kv_len)
    for q_len in (1, 2, 7):
        assert torch.equal(pattern.mask(q_len, kv_len), full[kv_len - q_len:])
        assert torch.equal(tok(pattern, site(q_len, kv_len)), full[kv_len - q_len:])


def test_dense():
    assert torch.equal(tok(P.dense(), site(5, 7)), torch.ones(5, 7, dtype=torch.bool))
    assert torch.equal(P.dense_mask(3, 2), torch.ones(3, 2, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# bigbird: the deterministic part against loops, the random part by its properties


@pytest.mark.parametrize("q_len,kv_len,block,num_random,num_window,num_global", [
    (64, 64, 8, 2, 3, 1), (70, 70, 8, 1, 3, 2), (40, 56, 8, 3, 1, 0), (33, 33, 4, 20, 5, 1)])
def test_bigbird(q_len, kv_len, block, num_random, num_window, num_global):
    m = P.bigbird_mask(q_len, kv_len, block=block, num_random=num_random,
                       num_window=num_window, num_global=num_global, seed=3)
    assert m.shape == (q_len, kv_len) and m.dtype == torch.bool
    qb, kb = math.ceil(q_len / block), math.ceil(kv_len / block)
    # every token of a block pair agrees: the mask is a block mask
    blocks = torch.zeros(qb, kb, dtype=torch.bool)
    for a in range(qb):
        for b in range(kb):
            tile = m[a * block:(a + 1) * block, b * block:(b + 1) * block]
            assert tile.all() or not tile.any()
            blocks[a, b] = tile.all()
    for a in range(qb):
        fixed = {b for b in range(kb)
                 if abs(a - b) <= num_window // 2 or a < num_global or b < num_global}
        chosen = {b for b in range(kb) if blocks[a, b]}
        assert fixed <= chosen
        if a < num_global:
            assert len(chosen) == kb
        else:
            assert len(chosen - fixed) == min(num_random, kb - len(fixed))
    # the same seed gives the same mask, the site does not change it, another seed differs
    again = tok(P.bigbird(block, num_random, num_window, num_global, seed=3),
                site(q_len, kv_len, index=5))
    assert torch.equal(again, m)


def test_bigbird_seed_changes_random_blocks():
    masks = {P.bigbird_mask(128, 128, block=8, num_random=2, num_window=3, num_global=1,
                            seed=s).numpy().tobytes() for s in range(4)}
    assert len(masks) > 1


def test_bigbird_rejects_even_window():
    with pytest.raises(ValueError, match="odd"):
        P.bigbird_mask(16, 16, block=4, num_random=1, num_window=2, num_global=0)


# ---------------------------------------------------------------------------------------------
# combinators and selection


def test_union_and_intersect_against_loops():
    n, w, g = 20, 2, 3
    allowed_sw = lambda i, j: abs(i - j) <= w
    allowed_g = lambda i, j: i < g or j < g
    u = tok(P.union(P.sliding_window(w), P.global_tokens(g)), site(n))
    x = tok(P.intersect(P.sliding_window(w), P.global_tokens(g)), site(n))
    assert torch.equal(u, from_loops(n, n, lambda i, j: allowed_sw(i, j) or allowed_g(i, j)))
    assert torch.equal(x, from_loops(n, n, lambda i, j: allowed_sw(i, j) and allowed_g(i, j)))


def test_combinators_broadcast_per_head_masks():
    per_head = lambda s: torch.stack([P.sliding_window_mask(s.q_len, s.kv_len, window=h)
                                      for h in range(s.num_heads)])
    u = tok(P.union(per_head, P.global_tokens(1)), site(8, num_heads=3))
    assert u.shape == (3, 8, 8)
    for h in range(3):
        expected = from_loops(8, 8, lambda i, j: abs(i - j) <= h or i < 1 or j < 1)
        assert torch.equal(u[h], expected)


def test_none_in_combinators():
    none = lambda s: None
    sw = P.sliding_window(1)
    assert P.union(sw, none)(site(6)) is None
    assert torch.equal(tok(P.intersect(sw, none), site(6)), tok(sw, site(6)))
    assert P.intersect(none, none)(site(6)) is None


def test_combinators_reject_non_bool():
    with pytest.raises(TypeError, match="<lambda>: a mask must be bool.*torch.float32"):
        P.union(P.dense(), lambda s: torch.ones(s.q_len, s.kv_len))(site(4))


def test_only_selects_by_layer_name_and_predicate():
    fn = P.only(P.sliding_window(1), layers=range(6))
    for i in range(8):
        out = tok(fn, site(5, index=i, name=f"blocks.{i}.attn"))
        assert (out is None) == (i >= 6)
        if out is not None:
            assert torch.equal(out, P.sliding_window_mask(5, 5, window=1))
    fn = P.only(P.dense(), names="text_model.*")
    assert fn(site(4, name="text_model.encoder.layers.0.self_attn")) is not None
    assert fn(site(4, name="vision_model.encoder.layers.0.self_attn")) is None
    fn = P.only(P.dense(), names=["blocks.1.attn", "blocks.3.attn"], layers=[1, 2])
    assert [fn(site(4, index=i, name=f"blocks.{i}.attn")) is not None for i in range(4)] == \
        [False, True, False, False]
    fn = P.only(P.dense(), where=lambda s: s.q_len == s.kv_len)
    assert fn(site(4)) is not None and fn(site(4, 6)) is None
    with pytest.raises(ValueError, match="negative"):
        P.only(P.dense(), layers=[-1])
    with pytest.raises(ValueError):
        P.only(P.dense())


def test_readable_names():
    fn = P.only(P.union(P.local_2d(2, prefix_tokens=1), P.global_tokens(1)), layers=range(6))
    assert fn.__name__ == repr(fn) == \
        "only(union(local_2d(window=2, prefix_tokens=1), global_tokens(n=1)), layers=range(0, 6))"
    assert repr(P.sliding_window(4, causal=True)) == "sliding_window(window=4, causal=True)"
    assert repr(P.bigbird(64, 3, 3, 2, seed=1)) == \
        "bigbird(block=64, num_random=3, num_window=3, num_global=2, seed=1)"
    assert repr(P.dense()) == "dense()"
    for f in (P.local_2d, P.sliding_window, P.causal, P.global_tokens, P.bigbird, P.dense, P.union,
              P.intersect, P.only, P.local_2d_mask, P.bigbird_mask):
        assert f.__doc__


# ---------------------------------------------------------------------------------------------
# the builders feed the op directly


@pytest.mark.parametrize("build", [
    lambda n: P.local_2d_mask(n, window=1, prefix_tokens=1),
    lambda n: P.sliding_window_mask(n, n, window=3, causal=True),
    lambda n: P.bigbird_mask(n, n, block=4, num_random=1, num_window=3, num_global=1, seed=0),
    lambda n: tok(P.union(P.sliding_window(2), P.global_tokens(1)), site(n)),
    lambda n: P.causal_mask(n, n),
], ids=["local_2d", "sliding_window", "bigbird", "union", "causal"])
def test_masks_drive_sparse_attention(build):
    import torch.nn.functional as F

    import fxsparse
    from fxsparse.testing import MaskedAttention

    n = 37                                     # 1 + 6x6 patches
    mask = build(n)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for _ in range(3))
    with MaskedAttention(lambda s: mask):
        want = F.scaled_dot_product_attention(q, k, v)
    for m in (mask, fxsparse.Layout.from_mask(mask)):
        got = fxsparse.sparse_attention(q, k, v, m)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
