"""torch.compile(model, backend=fxsparse.backend(mask_fn)): the same pass over Dynamo's graphs."""
import pytest
import timm
import torch

import fxsparse
from fxsparse import patterns
from fxsparse.testing import assert_close, masked_forward
from test_transform_lm import GPT, LlamaModel, _tokens

WINDOW = patterns.sliding_window(3)


def _vit():
    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                            num_heads=4, num_classes=10)


@pytest.mark.parametrize("make,args,kind", [
    (GPT, _tokens, "matmul-softmax"),
    (LlamaModel, lambda: (torch.randn(2, 24, 64),), "matmul-softmax"),
    (_vit, lambda: (torch.randn(2, 3, 32, 32),), "sdpa"),
], ids=["nanogpt", "llama", "vit"])
def test_backend_eager(make, args, kind):
    torch.manual_seed(0)
    model = make().eval()
    be = fxsparse.backend(WINDOW, compiler="eager")
    inputs = args()
    with torch.no_grad():
        got = torch.compile(model, backend=be)(*inputs)
        want, _ = masked_forward(model, inputs, WINDOW)
    assert_close(got, want)
    rows = fxsparse.report(be).rows
    assert len(rows) == 2 and all(r.status == "rewritten" and r.pattern.startswith(kind) for r in rows)
    assert [r.index for r in rows] == [0, 1]


def test_backend_inductor():
    torch.manual_seed(0)
    model = GPT().eval()
    be = fxsparse.backend(WINDOW)
    with torch.no_grad():
        got = torch.compile(model, backend=be)(*_tokens())
    assert_close(got, masked_forward(model, _tokens(), WINDOW)[0])
    assert [r.name for r in fxsparse.report(be).rows] == ["h.0", "h.1"]
    assert all(r.site.causal for r in fxsparse.report(be).rows)


def test_backend_rejects_a_non_callable():
    with pytest.raises(TypeError, match="mask_fn must be callable"):
        fxsparse.backend("local")


def test_backend_new_lengths_default_and_static_shapes():
    torch.manual_seed(0)
    model = GPT().eval()
    tokens = _tokens()[0]
    with torch.no_grad():
        # default settings: Dynamo recompiles the second length with symbolic sizes; the sites find
        # their layouts when they run
        compiled = torch.compile(model, backend=fxsparse.backend(WINDOW, compiler="eager"))
        for t in (tokens, tokens[:, :-3], tokens[:, :-5]):
            assert_close(compiled(t), masked_forward(model, (t,), WINDOW)[0])
        # dynamic=False: one graph and one layout per length, each against the oracle
        static = torch.compile(model, backend=fxsparse.backend(WINDOW, compiler="eager"), dynamic=False)
        for t in (tokens, tokens[:, :-3]):
            assert_close(static(t), masked_forward(model, (t,), WINDOW)[0])
