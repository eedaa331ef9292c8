"""fxsparse's showcase: make a timm ViT's attention block-sparse without touching its code.

The first six of eight blocks get a 2-D local window (each patch sees a 5x5 neighbourhood of
patches) plus the CLS token as a global token; the last two stay dense. The script prints the
rewrite report, checks the output against independent references and times dense vs sparse.
"""
import copy
import os
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import fxsparse  # noqa: E402
from fxsparse import patterns  # noqa: E402
from oracle import MaskedAttention  # noqa: E402  (the repo's float64 reference; no fxsparse inside)

TOL = 1e-5  # relative to the output's scale (fp32, CPU)

torch.manual_seed(0)
model = timm.models.vision_transformer.VisionTransformer(
    img_size=224, patch_size=16, embed_dim=96, depth=8, num_heads=8, mlp_ratio=3.,
    qkv_bias=False).eval()

# CLS is global (attends to all, seen by all); patches see patches within 2 rows/cols.
token_mask = patterns.only(
    patterns.union(patterns.local_2d(window=2, prefix_tokens=1), patterns.global_tokens(1)),
    layers=range(6))


def mask_fn(site):
    """token_mask in 32-token blocks (197 tokens in the default 128-token blocks skip nothing)."""
    mask = token_mask(site)
    return None if mask is None else fxsparse.Layout.from_mask(mask, block_size=32)

x = torch.randn(2, 3, 224, 224)
sparse = fxsparse.transform(model, mask_fn, example_inputs=(x,))
print(fxsparse.report(sparse))


# ---------------------------------------------------------------- exactness against references
def errors_of(got, want):
    """(max abs error, output scale)."""
    return (got.double() - want.double()).abs().max().item(), want.abs().max().item()


def oracle(mask_fn):
    """The ORIGINAL model in float64 with mask_fn applied to each attention it computes."""
    m64 = copy.deepcopy(model).double()
    with torch.no_grad(), MaskedAttention(mask_fn, m64):
        return m64(x.double())


with torch.no_grad():
    want_dense = model(x)
    got_dense = fxsparse.transform(model, patterns.dense())(x)   # every site rewritten, all-True
    got_sparse = sparse(x)
want_sparse = oracle(token_mask)

errors = {
    "all-True mask vs dense model": errors_of(got_dense, want_dense),
    "sparse model vs masked original (fp64 oracle)": errors_of(got_sparse, want_sparse),
}
print()
for what, (err, scale) in errors.items():
    print(f"{what}: max abs error {err:.2e} (output scale {scale:.2f}, tolerance {TOL * scale:.1e})")
changed, scale = errors_of(want_sparse, want_dense)
print(f"the mask itself moves the output by {changed:.2e}: the check has teeth")
if any(err > TOL * scale for err, scale in errors.values()) or changed < 1e-3 * scale:
    sys.exit("FAIL: the transformed model does not match its reference")


# ---------------------------------------------------------------------------------- timings
def bench(fn, inp, iters, warmup):
    with torch.no_grad():
        for _ in range(warmup):
            fn(inp)
        if inp.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn(inp)
        if inp.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


if torch.cuda.is_available():
    device, dtype, batch, iters, warmup = "cuda", torch.bfloat16, 64, 50, 10
else:
    device, dtype, batch, iters, warmup = "cpu", torch.float32, 4, 3, 1
dense_m = model.to(device, dtype)
sparse_m = sparse.to(device, dtype)
inp = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
t_dense = bench(dense_m, inp, iters, warmup)
t_sparse = bench(sparse_m, inp, iters, warmup)
print(f"\nforward, batch {batch}, {str(dtype).removeprefix('torch.')} on {device}: "
      f"dense {t_dense:.1f} ms, sparse {t_sparse:.1f} ms ({t_dense / t_sparse:.2f}x)")
