"""Learn a layout from data: ``fxsparse.calibrate`` keeps the blocks a model attends to most.

A timm ViT (random weights) at 256 px, patches of 16 (257 tokens) runs dense over a few batches of
images while fxsparse sums each attention's probabilities into 32-token blocks; per site the
heaviest 30 % of blocks are kept. The result is a mask_fn (plain data: it pickles) that
``fxsparse.transform`` takes like any pattern. The script prints the density asked and reached and
the share of the attention mass kept per site, then checks the calibrated sparse model against the
original masked with the same blocks (float64 oracle). With random weights attention is spread
out, so the mass kept is close to the share of blocks; a trained model concentrates its attention
and keeps much more of it. A progress bar shows when run in a terminal.

    python examples/calibrate_vit.py [--batches 8] [--small]
"""
import argparse
import os
import sys
import tempfile

import timm
import torch

import fxsparse
from fxsparse.testing import masked_forward, relative_error


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--small", action="store_true", help="a smaller model (seconds)")
    args = parser.parse_args()
    img, dim, depth = (128, 32, 2) if args.small else (256, 96, 4)
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=4).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, img, img, generator=gen),) for _ in range(args.batches)]

    mask_fn = fxsparse.calibrate(model, batches, density=args.density, block_size=32)
    print(mask_fn.summary())

    # plain data: save it once, reuse it later (no model needed to load it)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "calibrated.pt")
        torch.save(mask_fn, path)
        mask_fn = torch.load(path, weights_only=False)

    x = torch.randn(2, 3, img, img, generator=gen)
    sparse = fxsparse.transform(model, mask_fn, example_inputs=(x,))
    print()
    print(fxsparse.report(sparse))
    with torch.no_grad():
        got, dense = sparse(x), model(x)
    want, _ = masked_forward(model, (x,), mask_fn)
    err, moved = relative_error(got, want), relative_error(want, dense)
    print(f"\ncalibrated sparse model vs the original masked with the same blocks (float64): max error {err:.1e} "
          f"of the output's scale; the dropped blocks move the output by {moved:.1e}")
    if err > 1e-5:
        sys.exit("FAIL: the calibrated model does not match its reference")


if __name__ == "__main__":
    main()
