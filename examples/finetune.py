"""Fine-tune a block-sparse ViT: gradients flow through fxsparse's op like through any attention.

A small timm ViT (random weights) at 96 px, patches of 8 (145 tokens), gets a 2-D local window in
every block but the last; it learns a toy task, in which colour a square somewhere in the image is
bright, and the loss goes down. The sparse model shares the original's weight memory: training it updates the
weights both see (as with torch.compile); the original's modules and hooks are untouched.

    python examples/finetune.py [--steps 20] [--small]
"""
import argparse
import sys
import time

import timm
import torch
import torch.nn.functional as F

import fxsparse
from fxsparse import patterns


def batch(n, img, gen):
    """Noise images with a bright square at a random place; the label is the colour channel it is bright in."""
    labels = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 3, img, img, generator=gen)
    side = img // 4
    corners = torch.randint(0, img - side + 1, (n, 2), generator=gen).tolist()
    for i, (c, (r0, c0)) in enumerate(zip(labels.tolist(), corners)):
        x[i, c, r0:r0 + side, c0:c0 + side] += 2.0
    return x, labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="a smaller model and image (seconds)")
    args = parser.parse_args()
    img, patch, dim, depth = (64, 8, 32, 2) if args.small else (96, 8, 64, 4)
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=4, num_classes=3)
    tokens = (img // patch) ** 2 + 1
    mask_fn = patterns.only(patterns.local_2d(window=2, prefix_tokens=1, block_size=32), layers=range(depth - 1))
    gen = torch.Generator().manual_seed(1)
    sparse = fxsparse.transform(model, mask_fn, example_inputs=(batch(2, img, gen)[0],))
    print(fxsparse.report(sparse))
    sparse.train()
    opt = torch.optim.AdamW(sparse.parameters(), lr=3e-3)
    losses = []
    t = time.perf_counter()
    for step in range(args.steps):
        x, y = batch(32, img, gen)
        loss = F.cross_entropy(sparse(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    k = max(1, args.steps // 8)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"\n{args.steps} steps at {tokens} tokens in {time.perf_counter() - t:.1f} s: mean loss of the first {k} "
          f"steps {first:.3f}, of the last {k} {last:.3f}")
    # the weights are shared: the original model computes with what the sparse one learned
    with torch.no_grad():
        x, y = batch(64, img, gen)
        acc = (model.eval()(x).argmax(-1) == y).float().mean().item()
    print(f"accuracy of the original model (dense attention, the shared trained weights) on fresh images: {acc:.0%}")
    if not last < 0.8 * first:
        sys.exit("FAIL: the loss did not go down")


if __name__ == "__main__":
    main()
