"""Every attention of models nobody here wrote, found and rewritten or reported with its reason.

HuggingFace transformers architectures (``hf.py``), timm families (``timm_zoo.py``), torchvision's
Swin and MaxViT and diffusers' UNet and DiT at tiny sizes, through both doors: ``fxsparse.transform`` and ``torch.compile(backend=fxsparse.backend)``.
For each model:

* the report lists exactly the attentions a reader of the model's code counts, the ones that
  cannot be rewritten ``skipped`` with their reason (never silently missing);
* with an all-True token mask (through the op, not SDPA) the output is the original's;
* a sparse token mask moves the output (the rewritten sites are really in the forward);
* the user's model is untouched.

The transform door of one attention implementation per architecture runs by default (the
heaviest models' too are marked slow); the backend door and the other implementations are marked slow.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import pytest
import torch

import fxsparse
from fxsparse import patterns
from zoo import hf, timm_zoo

TOL = 1e-5  # relative to the largest magnitude of each output


def all_true(site):
    return torch.ones(site.q_len, site.kv_len, dtype=torch.bool)


def band(site):
    """Each query sees the keys at its own position and the next one: far from dense."""
    return patterns.sliding_window_mask(site.q_len, site.kv_len, window=1)


def tensors(out):
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in tensors(v)]
    return []


def run(model, args, kwargs):
    with torch.no_grad():
        return tensors(model(*args, **kwargs))


def worst(got, want) -> float:
    assert len(got) == len(want)
    return max(float((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-12))
               for g, w in zip(got, want))


def rewritten(model, door, mask_fn, args, kwargs):
    """(the model's rewritten forward, its report) through one door."""
    if door == "transform":
        sparse = fxsparse.transform(model, mask_fn, example_inputs=kwargs if kwargs else args)
        return sparse, (lambda: fxsparse.report(sparse))
    torch._dynamo.reset()
    be = fxsparse.backend(mask_fn, compiler="eager")
    return torch.compile(model, backend=be), (lambda: fxsparse.report(be))


def check(model, args, kwargs, door, sites, skipped):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    want = run(model, args, kwargs)

    sparse, report = rewritten(model, door, all_true, args, kwargs)
    got = run(sparse, args, kwargs)
    rows = report().rows
    assert len(rows) == sites, f"{len(rows)} sites reported, the model has {sites}:\n{report()}"
    for i, row in enumerate(rows):
        if i in skipped:
            assert row.status == "skipped" and re.search(skipped[i], row.reason), f"site {i}:\n{report()}"
        else:
            assert row.status == "rewritten", f"site {i}:\n{report()}"
    err = worst(got, want)
    assert err <= TOL, f"all-True mask off by {err:.3g}"

    if len(skipped) < sites:
        sparse, _ = rewritten(model, door, band, args, kwargs)
        moved = worst(run(sparse, args, kwargs), want)
        assert moved > 10 * max(err, 1e-7), f"a sparse mask changed the output by only {moved:.3g}"

    assert worst(run(model, args, kwargs), want) == 0.0, "the original's output changed"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"the original's {k} changed"


# Known failures, by test id: each is xfail(strict=True), so the entry must go the day it passes.
KNOWN: dict = {}


def _marks(test_id, slow):
    marks = [pytest.mark.slow] if slow else []
    if test_id in KNOWN:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[test_id]))
    return marks


# ------------------------------------------------------------------------------ HF transformers
def _hf_params():
    out = []
    for arch in hf.ARCHS:
        for i, attn in enumerate(arch.attns):
            for door in ("transform", "backend"):
                test_id = f"{arch.name}-{attn}-{door}"
                out.append(pytest.param(arch, attn, door, marks=_marks(test_id, i > 0 or door == "backend"),
                                        id=test_id))
    return out


@pytest.mark.parametrize("arch, attn, door", _hf_params())
def test_transformers(arch, attn, door):
    model = arch.build(attn)
    # transform hands back the model's own modules: a layer shared by every call is one site there
    sites = arch.modules if door == "transform" and arch.modules else arch.sites
    check(model, (), arch.inputs(), door, sites, arch.skipped)


# ------------------------------------------------------------------------------ timm
def _timm_params():
    return [pytest.param(f, door, marks=_marks(f"{f.name}-{door}", door == "backend" or f.slow),
                         id=f"{f.name}-{door}")
            for f in timm_zoo.FAMILIES for door in ("transform", "backend")]


@pytest.mark.parametrize("family, door", _timm_params())
def test_timm(family, door):
    model = family.build()
    check(model, family.inputs(), {}, door, family.sites, family.skipped)


# ------------------------------------------------------------------------------ torchvision
def _tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], num_classes=10)


def _tv_maxvit():
    from torchvision.models.maxvit import MaxVit

    return MaxVit((32, 32), 16, 4, [16, 32], [1, 1], 8, 0.0, num_classes=10)


# torchvision's Swin computes its attention in `shifted_window_attention`, a function torch.fx keeps
# whole (torch.fx.wrap): transform makes the module calling it find its attentions when it runs; the
# backend traces into them.
TORCHVISION = [
    ("swin", _tv_swin, "transform", 4, {}),
    ("swin", _tv_swin, "backend", 4, {}),
    ("maxvit", _tv_maxvit, "transform", 4, {}),
    ("maxvit", _tv_maxvit, "backend", 4, {}),
]


@pytest.mark.parametrize("make, door, sites, skipped", [
    pytest.param(make, door, sites, skipped, marks=_marks(f"{name}-{door}", door == "backend"), id=f"{name}-{door}")
    for name, make, door, sites, skipped in TORCHVISION])
def test_torchvision(make, door, sites, skipped):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    check(model, (x,), {}, door, sites, skipped)


# ------------------------------------------------------------------------------ diffusers
def _unet():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=8)
    g = torch.Generator().manual_seed(1)
    return model, dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([10]),
                       encoder_hidden_states=torch.randn(1, 5, 32, generator=g))


def _dit():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, norm_num_groups=8)
    g = torch.Generator().manual_seed(1)
    return model, dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([10]),
                       class_labels=torch.tensor([1]))


# diffusers' `Attention` modules run their processor (SDPA): a UNet's self- and cross-attention in each
# transformer block (3 blocks with attention at this size), a DiT's self-attention
DIFFUSERS = [("unet", _unet, 8, True), ("dit", _dit, 2, False)]


@pytest.mark.parametrize("make, door, sites", [
    pytest.param(make, door, sites, marks=_marks(f"{name}-{door}", slow or door == "backend"), id=f"{name}-{door}")
    for name, make, sites, slow in DIFFUSERS for door in ("transform", "backend")])
def test_diffusers(make, door, sites):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model, kwargs = make()
    model.eval()
    with torch.no_grad():  # zero-initialised output layers would hide every attention
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and not mod.weight.any():
                mod.weight.normal_(0.0, 0.02)
    check(model, (), kwargs, door, sites, {})
