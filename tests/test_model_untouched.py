"""The user's model is never mutated: dtype/device changes and mode switches on the result stay on it."""
import timm
import torch

import fxsparse
from fxsparse import patterns


def _vit():
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
    ).eval()


def test_half_and_train_on_the_result_leave_the_model_alone():
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparse = fxsparse.transform(model, patterns.dense())
    # weights are shared, not copied
    assert sparse.state_dict()["blocks.0.attn.qkv.weight"].data_ptr() == model.blocks[0].attn.qkv.weight.data_ptr()
    sparse.half()
    sparse.train()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training and not any(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    x = torch.randn(2, 3, 32, 32)
    assert sparse(x.half()).dtype == torch.float16
    assert model(x).dtype == torch.float32


def test_tied_weights_stay_tied():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    sparse = fxsparse.transform(model, patterns.dense())
    assert sparse.a.weight is sparse.b.weight
    assert sparse.a.weight is not model.a.weight
    x = torch.randn(3, 4)
    torch.testing.assert_close(sparse(x), model(x))
