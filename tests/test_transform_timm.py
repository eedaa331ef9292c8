"""fxsparse.transform on timm's VisionTransformer: fused attention on and off, register tokens."""
import pytest
import timm
import torch

import fxsparse
from fxsparse import patterns
from helpers import check_model


def vit(fused, reg_tokens=0, depth=2):
    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=4, reg_tokens=reg_tokens,
        no_embed_class=reg_tokens > 0, num_classes=10).eval()
    for block in m.blocks:
        block.attn.fused_attn = fused
    return m


def images():
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


@pytest.mark.parametrize("fused", [False, True], ids=["softmax", "sdpa"])
@pytest.mark.parametrize("reg_tokens", [0, 4], ids=["cls", "cls+4reg"])
@pytest.mark.parametrize("example_inputs", [False, True], ids=["lazy", "example_inputs"])
def test_vit(fused, reg_tokens, example_inputs):
    model = vit(fused, reg_tokens)
    prefix = 1 + reg_tokens
    mask_fn = patterns.union(patterns.local_2d(1, prefix_tokens=prefix), patterns.global_tokens(prefix))
    kind = "sdpa" if fused else "matmul-softmax"
    sparse = check_model(model, images(), mask_fn, kinds=[kind] * 2, names=["blocks.0.attn", "blocks.1.attn"],
                         example_inputs=example_inputs)
    rows = fxsparse.report(sparse).rows
    assert [(r.site.q_len, r.site.kv_len, r.heads) for r in rows] == [(16 + prefix, 16 + prefix, "4×16")] * 2
    assert all(r.pattern == f"{kind} (fused qkv)" for r in rows)


def test_report_before_and_after_the_first_forward():
    model = vit(fused=False, depth=3)
    sparse = fxsparse.transform(model, patterns.only(patterns.local_2d(1, prefix_tokens=1), layers=[0, 1]))
    before = fxsparse.report(sparse)
    assert [r.name for r in before.rows] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert all(r.lengths == "?" and r.density is None for r in before.rows)
    text = str(before)
    for column in ("site", "pattern", "heads×dim", "q×kv", "block", "density", "attention FLOPs saved", "status"):
        assert column in text
    with torch.no_grad():
        sparse(*images())
    after = fxsparse.report(sparse)
    assert [r.status for r in after.rows] == ["rewritten", "rewritten", "dense"]
    assert after.rows[2].reason == "mask_fn returned None"
    assert after.rows[0].lengths == "17×17" and after.rows[0].block == 128
    assert "blocks.2.attn" in str(after)


def test_verbose_prints_the_report(capsys):
    fxsparse.transform(vit(fused=True), patterns.dense(), example_inputs=images(), verbose=True)
    out = capsys.readouterr().out
    assert "blocks.0.attn" in out and "rewritten" in out and "17×17" in out
