"""``transform`` gives back the user's model: same class, containers, methods, hooks, state_dict,
deepcopy, pickling, checkpointing, other shapes, torch.compile and generate() all keep working,
and the attention is sparse (checked against the original model with the mask applied)."""
from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.testing import assert_close, masked_forward


def ones(site):
    return torch.ones(site.q_len, site.kv_len, dtype=torch.bool)


class band:
    """Keys within `width` positions of the query, the queries being the last q_len positions
    (a class, not a closure: a transformed model with it pickles)."""

    def __init__(self, width):
        self.width = width

    def __call__(self, site):
        q = torch.arange(site.kv_len - site.q_len, site.kv_len)[:, None]
        return (q - torch.arange(site.kv_len)[None, :]).abs() <= self.width


def vit(fused, reg_tokens=0, depth=2):
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=32, depth=depth, num_heads=2, reg_tokens=reg_tokens).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


@pytest.mark.parametrize("fused,reg", [(False, 0), (True, 0), (False, 2)], ids=["matmul", "sdpa", "registers"])
def test_timm_vit_is_still_the_users_model(fused, reg):
    model = vit(fused, reg)
    x = torch.randn(2, 3, 64, 64)
    sparse = fxsparse.transform(model, ones)
    assert isinstance(sparse, timm.models.VisionTransformer)
    assert isinstance(sparse.blocks, nn.Sequential) and len(list(sparse.blocks)) == 2
    assert all(isinstance(blk.attn, timm.layers.Attention) for blk in sparse.blocks)
    assert sparse.blocks[0].attn.num_heads == 2 and sparse.blocks[0].attn.head_dim == 16
    with torch.no_grad():
        assert_close(sparse(x), model(x), what="all-True mask")
        x3 = torch.randn(3, 3, 64, 64)
        assert_close(sparse(x3), model(x3), what="another batch size")
        assert_close(sparse.forward_head(sparse.forward_features(x)), model(x), what="the model's own methods")
    assert sorted(sparse.state_dict()) == sorted(model.state_dict())
    sparse.load_state_dict(model.state_dict(), strict=True)
    assert [r.status for r in fxsparse.report(sparse)] == ["rewritten", "rewritten"]
    assert [r.module for r in fxsparse.report(sparse)] == ["blocks.0.attn", "blocks.1.attn"]


@pytest.mark.parametrize("fused", [False, True], ids=["matmul", "sdpa"])
def test_sparse_mask_matches_the_masked_original(fused):
    model = vit(fused)
    x = torch.randn(2, 3, 64, 64)
    sparse = fxsparse.transform(model, band(3))
    with torch.no_grad():
        got, dense = sparse(x), model(x)
    want, _ = masked_forward(model, (x,), band(3))
    assert_close(got, want, what="sparse mask vs the masked original")
    assert (want - dense).abs().max() > 1e-3 * dense.abs().max(), "the mask changes nothing"


def test_copies_pickles_hooks_and_modes():
    model = vit(False)
    x = torch.randn(2, 3, 64, 64)
    sparse = fxsparse.transform(model, band(3))
    with torch.no_grad():
        want = sparse(x)
        clone = copy.deepcopy(sparse)
        assert_close(clone(x), want, what="deepcopy")
        assert len(fxsparse.report(clone)) == 2
        with pytest.raises(ValueError, match="already transformed"):
            fxsparse.transform(clone, ones)
        buf = io.BytesIO()
        torch.save(sparse, buf)
        buf.seek(0)
        assert_close(torch.load(buf, weights_only=False)(x), want, what="torch.save / torch.load")
        seen = []
        handle = sparse.blocks[1].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        sparse(x)
        handle.remove()
        assert seen == [torch.Size([2, 17, 32])]
        assert_close(sparse.half().float()(x), want, tol=1e-2, what=".half() then .float()")
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32, "the original is untouched"


def test_checkpointing_gives_the_same_gradients():
    model = vit(False).train()
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for checkpointing in (False, True):
        sparse = fxsparse.transform(model, band(3))
        sparse.set_grad_checkpointing(checkpointing)
        sparse(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in sparse.named_parameters()})
        for p in sparse.parameters():
            p.grad = None
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], what=f"checkpointed gradient of {name}")


def test_optional_argument_left_out_and_given():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x, mask=None):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            s = q @ k.transpose(-1, -2) * 8 ** -0.5
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            return (s.softmax(-1) @ v).transpose(1, 2).flatten(2)

    torch.manual_seed(0)
    model = Attention().eval()
    sparse = fxsparse.transform(model, ones)
    x = torch.randn(2, 10, 16)
    mask = torch.rand(10, 10) > 0.3
    mask |= torch.eye(10, dtype=torch.bool)
    with torch.no_grad():
        assert_close(sparse(x), model(x), what="optional argument left out")
        assert_close(sparse(x, mask), model(x, mask), what="optional argument given")
        assert_close(sparse(x, mask=mask), model(x, mask=mask), what="optional argument by keyword")


def test_transform_does_not_touch_caches_of_the_original():
    """A module filling a Python cache on its first forward (timm's attention-bias dicts): the
    transform must neither share the cache nor write fake tensors into it."""
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.cache = {}
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            key = str(x.device)
            if key not in self.cache:
                self.cache[key] = torch.zeros(x.shape[1], x.shape[1])
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            s = q @ k.transpose(-1, -2) * 8 ** -0.5 + self.cache[key]
            return (s.softmax(-1) @ v).transpose(1, 2).flatten(2)

    torch.manual_seed(0)
    model = Cached().eval()
    x = torch.randn(2, 10, 16)
    fxsparse.transform(model, ones, example_inputs=(x,))
    assert model.cache == {}
    out = model(x)
    assert type(out) is torch.Tensor


@pytest.mark.parametrize("name", ["swin", "tiny_vit"])
def test_timm_window_models(name):
    torch.manual_seed(0)
    if name == "swin":
        model = timm.models.swin_transformer.SwinTransformer(
            img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)).eval()
    else:
        model = timm.models.tiny_vit.TinyVit(
            embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
            window_sizes=(4, 4, 4, 2)).eval()
    x = torch.randn(1, 3, 64, 64)
    sparse = fxsparse.transform(model, ones, example_inputs=(x,))
    assert type(model(x)) is torch.Tensor, "the original still runs on real tensors"
    with torch.no_grad():
        assert_close(sparse(x), model(x), what=f"{name}, all-True mask")
    rows = fxsparse.report(sparse).rows
    assert rows and all(r.status == "rewritten" for r in rows)


def test_torchvision_vit_multihead_attention():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    x = torch.randn(2, 3, 32, 32)
    sparse = fxsparse.transform(model, ones)
    assert isinstance(sparse, torchvision.models.VisionTransformer)
    assert isinstance(sparse.encoder.layers[0].self_attention, nn.MultiheadAttention)
    with torch.no_grad():
        assert_close(sparse(x), model(x), what="torchvision ViT, all-True mask")
        got = fxsparse.transform(model, band(1))(x)
    want, _ = masked_forward(model, (x,), band(1))
    assert_close(got, want, what="torchvision ViT, sparse mask vs the masked original")


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)  # nested tensors on: its eval fast path is a fused kernel

    def forward(self, x, pad):
        return self.enc(x, src_key_padding_mask=pad)


def _spy_folds_and_calls(monkeypatch):
    """(folds, calls): one entry per fold of a runtime mask; the (layout, bias) of each forward (eager or
    through the site op)."""
    folds, calls = [], []
    real_fold = fxsparse.site._fold
    monkeypatch.setattr(fxsparse.site, "_fold", lambda *a: folds.append(1) or real_fold(*a))
    for where, name in ((fxsparse.site, "sparse_attention"), (fxsparse.op, "layout_forward")):
        def spy(q, k, v, layout, real=getattr(where, name), **kw):
            calls.append((layout, kw["bias"]))
            return real(q, k, v, layout, **kw)
        monkeypatch.setattr(where, name, spy)
    return folds, calls


def _padded_batch():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 32)
    pad = torch.zeros(2, 64, dtype=torch.bool)
    pad[0, 30:] = True  # sample 0: key block 1 (of 32 tokens) is all padding
    return x, pad


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_transformer_encoder_with_key_padding(mode, monkeypatch):
    """nn.TransformerEncoder is one leaf of torch.fx's graph (a torch.nn module), so its attentions are
    found when it runs: under the redirect it takes its slow path, whose nn.MultiheadAttention calls
    become sites. Every layer is rewritten; the key padding, which the encoder turns into a float mask,
    reaches the sites as the bool mask it was made from: it folds once for both layers into its exact
    layout (the padded block skipped, no bias); the output matches the original on the real tokens (the
    fused eval path leaves padded positions at zero), and with a sparse mask the masked original."""
    x, pad = _padded_batch()
    model = Encoder().train(mode == "train")
    real = ~pad[..., None]
    folds, calls = _spy_folds_and_calls(monkeypatch)
    sparse = fxsparse.transform(model, fxsparse.patterns.dense(block_size=32), example_inputs=(x, pad))
    assert isinstance(sparse.enc, nn.TransformerEncoder)
    with torch.no_grad():
        fxsparse.site._FOLDED.clear()
        folds.clear()
        calls.clear()
        got = sparse(x, pad)
        assert len(folds) == 1, "one fold of the padding serves both layers"
        want = model(x, pad)
    assert len(calls) == 2 and all(bias is None and bool((lay.kinds == fxsparse.Layout.EMPTY).any())
                                   for lay, bias in calls), "the padding's exact layout, no bias"
    rows = fxsparse.report(sparse).rows
    assert [(r.status, r.site.role, r.site.name) for r in rows] == [
        ("rewritten", "self", "enc.layers.0.self_attn"), ("rewritten", "self", "enc.layers.1.self_attn")]
    assert all("empties are skipped when it runs" in r.reason for r in rows), [r.reason for r in rows]
    assert_close(got * real, want * real, what=f"nn.TransformerEncoder ({mode}), all-True mask")
    with torch.no_grad():
        got = fxsparse.transform(model, band(4), example_inputs=(x, pad))(x, pad)
    want, sites = masked_forward(model.train(), (x, pad), band(4))  # the slow path, which the oracle sees
    assert len(sites) == 2
    assert_close(got * real, want.to(got.dtype) * real, what=f"nn.TransformerEncoder ({mode}), band mask")


class TwoAttentions(nn.Module):
    """Two nn.MultiheadAttention called with a bool key padding mask (leaves of torch.fx's graph)."""

    def __init__(self):
        super().__init__()
        self.a = nn.MultiheadAttention(32, 2, batch_first=True)
        self.b = nn.MultiheadAttention(32, 2, batch_first=True)

    def forward(self, x, pad):
        y = self.a(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        return self.b(y, y, y, key_padding_mask=pad, need_weights=False)[0]


@pytest.mark.parametrize("route", ["transform", "backend"])
def test_multihead_attention_key_padding_folds_exactly_once(route, monkeypatch):
    """nn.MultiheadAttention's bool key_padding_mask (True = padding) reaches the sites as a bool mask:
    given as it is (transform), or recovered from the float mask nn.MultiheadAttention makes of it
    (Dynamo's graph, backend). The padding folds once for both attentions into its exact layout with no
    bias, and the output equals the original model's."""
    x, pad = _padded_batch()
    model = TwoAttentions().eval()
    folds, calls = _spy_folds_and_calls(monkeypatch)
    mask_fn = fxsparse.patterns.dense(block_size=32)
    if route == "transform":
        sparse = fxsparse.transform(model, mask_fn, example_inputs=(x, pad))
    else:
        sparse = torch.compile(model, backend=fxsparse.backend(mask_fn))
    with torch.no_grad():
        sparse(x, pad)  # compiles (backend)
        fxsparse.site._FOLDED.clear()
        folds.clear()
        calls.clear()
        got = sparse(x, pad)
        want = model(x, pad)
    assert len(folds) == (1 if route == "transform" else 2)  # the site op folds at each call
    assert len(calls) == 2 and all(bias is None and bool((lay.kinds == fxsparse.Layout.EMPTY).any())
                                   for lay, bias in calls), "the padding's exact layout, no bias"
    assert_close(got, want, what=f"two nn.MultiheadAttention with key padding ({route})")


def test_float_mask_made_from_bool_is_traced_back_only_while_unchanged():
    """The redirect recovers the bool mask that F._canonical_mask's zeros_like(...).masked_fill_(mask,
    -inf) made a float mask from, and only while neither has changed since: any other float mask
    reaches the site as it is."""
    from fxsparse.owner import _Redirect

    pad = torch.tensor([[False, False, True, True]])
    inf = float("-inf")
    mode = _Redirect(nn.Module(), state=None)
    with mode:
        made = torch.zeros_like(pad, dtype=torch.float32).masked_fill_(pad, inf)
        changed = torch.zeros_like(pad, dtype=torch.float32).masked_fill_(pad, inf)
        changed.add_(1.0)
        other = pad.clone()
        from_other = torch.zeros_like(other, dtype=torch.float32).masked_fill_(other, inf)
        other[0, 0] = True
        finite = torch.zeros_like(pad, dtype=torch.float32).masked_fill_(pad, -1e4)
        not_zeros = torch.ones_like(pad, dtype=torch.float32).masked_fill_(pad, inf)
    assert mode._bool_source(made) is pad
    for mask in (changed, from_other, finite, not_zeros, None):
        assert mode._bool_source(mask) is mask


def test_torch_transformer_encoder_as_the_model_itself():
    """The model is an nn.TransformerEncoder: torch.fx cannot trace it (its fast-path checks branch on
    tensors), torch.export captures it with its attentions decomposed; those are still found when it
    runs, as sites of its own (in eval mode its fused fast path would otherwise skip them)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(2, 64, 32)
    pad = torch.zeros(2, 64, dtype=torch.bool)
    pad[:, 40:] = True
    sparse = fxsparse.transform(model, band(4), example_inputs=(x, None, pad))
    rows = fxsparse.report(sparse).rows
    assert [(r.index, r.site.name, r.status) for r in rows] == [
        (0, "layers.0.self_attn", "rewritten"), (1, "layers.1.self_attn", "rewritten")]
    with torch.no_grad():
        got = sparse(x, src_key_padding_mask=pad)
    want, _ = masked_forward(model.train(), (x, None, pad), band(4))
    real = ~pad[..., None]
    assert_close(got * real, want.to(got.dtype) * real, what="nn.TransformerEncoder as the model, band mask")


class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Transformer(32, 2, 1, 1, 64, dropout=0.0, batch_first=True)

    def forward(self, src, tgt):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.t(src, tgt, tgt_mask=causal, tgt_is_causal=True)


def test_torch_transformer_self_attention_sparse_cross_attention_dense():
    """nn.Transformer: its three attentions are found when it runs (until then the report says so),
    named after their modules, with their roles (query and key from one tensor: self-attention); a
    pattern rewrites the two self-attentions and keeps the cross-attention dense, as the masked original
    does."""
    torch.manual_seed(0)
    model = Seq2Seq().eval()
    src, tgt = torch.randn(2, 40, 32), torch.randn(2, 24, 32)
    mask_fn = fxsparse.patterns.sliding_window(4, block_size=32)
    [pending] = fxsparse.report(fxsparse.transform(model, mask_fn)).rows  # no example inputs: not run yet
    assert (pending.name, pending.status) == ("t", "skipped") and pending.reason.startswith("not run yet")
    sparse = fxsparse.transform(model, mask_fn, example_inputs=(src, tgt))
    rows = fxsparse.report(sparse).rows
    assert [(r.site.name, r.site.role, r.status) for r in rows] == [
        ("t.encoder.layers.0.self_attn", "self", "rewritten"), ("t.decoder.layers.0.self_attn", "self", "rewritten"),
        ("t.decoder.layers.0.multihead_attn", "cross", "dense")]


    def self_band(site):  # by name, which the oracle's sites carry too: the self-attentions banded
        return None if site.name.endswith("multihead_attn") else band(4)(site)

    with torch.no_grad():
        got = fxsparse.transform(model, self_band, example_inputs=(src, tgt))(src, tgt)
    want, sites = masked_forward(model, (src, tgt), self_band)
    assert [site.name for site in sites] == [row.site.name for row in rows]
    assert_close(got, want.to(got.dtype), what="nn.Transformer, a band on the self-attentions")


# ------------------------------------------------------------------------------ HuggingFace
def hf_model(name, impl):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, attn_implementation=impl)
        return transformers.BertModel(cfg).eval()
    if name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                                  attn_implementation=impl)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_huggingface_models_keep_class_and_take_any_shape(name, impl):
    model = hf_model(name, impl)
    ids = torch.randint(1, 100, (2, 12))
    sparse = fxsparse.transform(model, ones, example_inputs={"input_ids": ids})
    assert type(sparse) is type(model) and sparse.config is not None
    with torch.no_grad():
        for shape in ((2, 12), (3, 20), (1, 7)):
            x = torch.randint(1, 100, shape)
            assert_close(sparse(input_ids=x)[0], model(input_ids=x)[0], what=f"{name}/{impl} at {shape}")
    assert [r.status for r in fxsparse.report(sparse)] == ["rewritten", "rewritten"]


def _greedy_with_window(model, ids, steps, width):
    """The original model, no cache, each step given the causal band as an explicit 4-D mask."""
    for _ in range(steps):
        n = ids.shape[1]
        i = torch.arange(n)
        keep = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= width)
        mask = torch.zeros(n, n, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)[None, None]
        logits = model(input_ids=ids, attention_mask=mask.expand(ids.shape[0], 1, n, n)).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_dense_and_sliding_window(name, impl):
    model = hf_model(name, impl)
    model.generation_config.eos_token_id = None  # random weights: no early stop, every step compared
    ids = torch.randint(1, 100, (2, 10))
    with torch.no_grad():
        dense = fxsparse.transform(model, ones, example_inputs={"input_ids": ids})
        want = model.generate(ids, max_new_tokens=24, do_sample=False)
        assert torch.equal(dense.generate(ids, max_new_tokens=24, do_sample=False), want)
        calls = []

        def window(site):
            calls.append((site.q_len, site.kv_len))
            return band(4)(site)

        model = model.double()  # float64: no near-tie of logits flips a greedy token between the two
        sparse = fxsparse.transform(model, window, example_inputs={"input_ids": ids})
        got = sparse.generate(ids, max_new_tokens=24, do_sample=False)
        if name == "llama":  # GPT-2's eager path does not take a 4-D mask as given
            assert torch.equal(got, _greedy_with_window(model, ids, 24, 4))
    assert (10, 10) in calls and (1, 33) in calls, "prefill and decode steps both run through the sites"
    sites = [m for m in sparse.modules() if isinstance(m, fxsparse.site.SiteAttention)]
    assert all(len(s._layouts) <= s.MAX_LAYOUTS for s in sites)


def test_compile_the_result_without_graph_break():
    """timm's ViT (fused or not) and nn.MultiheadAttention given key padding (redirected in its owner)
    compile whole."""
    x, pad = _padded_batch()
    cases = [(fxsparse.transform(vit(fused), band(3), example_inputs=(torch.randn(2, 3, 64, 64),)),
              (torch.randn(2, 3, 64, 64),)) for fused in (False, True)]
    cases.append((fxsparse.transform(TwoAttentions().eval(), band(4), example_inputs=(x, pad)), (x, pad)))
    for sparse, args in cases:
        with torch.no_grad():
            want = sparse(*args)
            got = torch.compile(sparse, backend="aot_eager", fullgraph=True)(*args)
        assert_close(got, want, what=f"torch.compile(fullgraph=True) of the transformed {type(sparse).__name__}")


def test_a_forward_that_skips_the_attention_raises():
    """An owner whose forward no longer computes its attention (another implementation chosen at
    run time) must not run silently without the mask."""
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fast = False

        def forward(self, q, k, v):
            if self.fast:
                return v
            return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(1, 2, 8, 4)
    sparse = fxsparse.transform(Switch(), ones)
    sparse(q, q, q)
    sparse.fast = True
    with pytest.raises(RuntimeError, match="computed 0 of the 1 attention"):
        sparse(q, q, q)


def test_site_layouts_stay_bounded_over_many_lengths():
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    sparse = fxsparse.transform(Attention(), band(2))
    site = next(m for m in sparse.modules() if isinstance(m, fxsparse.site.SiteAttention))
    for n in range(17, 1017):
        q = torch.randn(1, 1, n, 4)
        sparse(q, q, q)
    assert len(site._layouts) <= site.MAX_LAYOUTS
    assert len(list(site.buffers())) <= site.MAX_LAYOUTS
    q = torch.randn(1, 2, 40, 4)
    want, _ = masked_forward(Attention(), (q, q, q), band(2))
    assert_close(sparse(q, q, q), want, what="after 1000 lengths")


def test_mask_fn_may_return_a_flex_mask_mod():
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    def window_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 3

    q = torch.randn(2, 2, 70, 8)
    got = fxsparse.transform(Attention(), lambda site: window_mod)(q, q, q)
    want, _ = masked_forward(Attention(), (q, q, q), band(3))
    assert_close(got, want, what="a mask_mod from mask_fn")


def test_huggingface_gradient_checkpointing():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                                  attn_implementation="sdpa")
    model = transformers.BertModel(cfg).train()
    ids = torch.randint(1, 100, (2, 24))
    grads = []
    for checkpointing in (False, True):
        sparse = fxsparse.transform(model, band(4), example_inputs={"input_ids": ids})
        if checkpointing:
            sparse.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        sparse(input_ids=ids).last_hidden_state.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in sparse.named_parameters() if p.grad is not None})
        sparse.zero_grad()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], what=f"checkpointed gradient of {name}")


def test_options_reach_every_site(monkeypatch):
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    seen = []
    real = fxsparse.site.sparse_attention

    def spy(*args, **kw):
        seen.append(kw.get("options"))
        return real(*args, **kw)

    monkeypatch.setattr(fxsparse.site, "sparse_attention", spy)
    options = fxsparse.KernelOptions(refine=False)
    q = torch.randn(1, 2, 40, 8)
    fxsparse.transform(Attention(), band(2), options=options)(q, q, q)
    assert seen == [options]
    with pytest.raises(TypeError, match="KernelOptions"):
        fxsparse.transform(Attention(), band(2), options={"refine": False})


def test_report_says_when_a_rewrite_saves_nothing():
    model = vit(True)
    x = torch.randn(1, 3, 64, 64)
    coarse = fxsparse.report(fxsparse.transform(model, fxsparse.patterns.local_2d(window=1, prefix_tokens=1),
                                                example_inputs=(x,)))
    assert all(r.density == 1.0 and "nothing is skipped" in r.reason and "block_size" in r.reason for r in coarse)
    kept = fxsparse.report(fxsparse.transform(model, lambda site: None, example_inputs=(x,)))
    assert all(r.status == "dense" and r.reason == "mask_fn returned None" for r in kept)


def test_huggingface_save_pretrained_round_trip(tmp_path):
    model = hf_model("llama", "sdpa")
    ids = torch.randint(1, 100, (2, 12))
    sparse = fxsparse.transform(model, band(4), example_inputs={"input_ids": ids})
    sparse.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, what="saved by the sparse model")
