"""fxsparse.testing's comparison and model oracle: what they accept and what they catch."""
import pytest
import torch
import torch.nn.functional as F

from fxsparse.testing import MaskedAttention, assert_close, dense_attention, masked_forward, relative_error


def test_one_wrong_element_in_a_large_output_fails():
    want = torch.randn(8, 12, 256, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = want.clone()
    got[3, 5, 17, 9] += 0.05 * want.abs().max()      # one element off by 5 % of the output's scale
    # a norm of the whole difference would call this a 2e-4 error and let it pass a 1e-3 tolerance
    assert (got - want).norm() / want.norm() < 1e-3
    assert relative_error(got, want) == pytest.approx(0.05)
    with pytest.raises(AssertionError, match="off by 5.00e-02"):
        assert_close(got, want, 1e-3, "one element")


def test_error_is_relative_to_the_output_scale():
    want = torch.randn(4, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    noise = 1e-7 * torch.randn(4, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for scale in (1e-6, 1.0, 1e6):
        assert relative_error((want + noise) * scale, want * scale) == pytest.approx(
            relative_error(want + noise, want), rel=1e-6)
    # all-zero outputs (rows with no allowed key) are compared absolutely
    assert relative_error(torch.full((3,), 1e-3), torch.zeros(3)) == pytest.approx(1e-3)


@pytest.mark.parametrize("bad,words", [
    (lambda w: w.clone().index_fill_(0, torch.tensor([1]), float("nan")), "non-finite"),
    (lambda w: w[:2], "shape"),
])
def test_nan_and_shape_are_refused(bad, words):
    want = torch.ones(3, 4)
    with pytest.raises(AssertionError, match=words):
        assert_close(bad(want), want, 1.0)


class _TwoAttentions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.proj(x).view(2, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        return (q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1) @ a


def test_masked_forward_masks_each_attention_and_leaves_the_model_alone():
    model = _TwoAttentions()
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    band = (torch.arange(10)[:, None] - torch.arange(10)[None, :]).abs() <= 1
    out, sites = masked_forward(model, (x,), lambda site: band)
    assert [(s.kind, s.q_len, s.kv_len, s.num_heads) for s in sites] == [("sdpa", 10, 10, 2), ("softmax", 10, 10, 2)]
    assert out.dtype == torch.float64 and next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the same computation written out with the oracle's own attention
    w, b = model.proj.weight.detach().double(), model.proj.bias.detach().double()
    q, k, v = F.linear(x.double(), w, b).view(2, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)
    p = dense_attention(q, k, torch.eye(10, dtype=torch.float64).expand(2, 2, 10, 10), band)
    want = p @ dense_attention(q, k, v, band)
    assert_close(out, want, 1e-12)
    unmasked, _ = masked_forward(model, (x,))
    assert relative_error(out, unmasked) > 1e-2, "the band changes the output"


def test_a_layout_from_mask_fn_stands_for_its_token_mask():
    import fxsparse

    q, k, v = torch.randn(3, 1, 2, 70, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    band = (torch.arange(70)[:, None] - torch.arange(70)[None, :]).abs() <= 5
    with MaskedAttention(lambda site: fxsparse.Layout.from_mask(band, block_size=32)):
        got = F.scaled_dot_product_attention(q, k, v)
    assert_close(got, dense_attention(q, k, v, band), 1e-12)
