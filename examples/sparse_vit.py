"""fxsparse's showcase in two parts: a timm ViT made block-sparse without touching its code.

1. The origin scenario: a small ViT at 224 px (197 tokens). The first six of eight blocks get a 2-D
   local window (each patch sees the 5x5 patches around it; the CLS token is global), the last two
   stay dense. The report, then the checks: an all-True mask reproduces the dense model, and the
   sparse model matches the original masked in float64. Short sequences cannot pay for sparsity:
   the timing says why.
2. Where sparsity pays: the same recipe on a ViT at high resolution (CPU: ViT-S/16 at 768 px, 2305
   tokens; GPU: ViT-B/16 at 1024 px, 4097 tokens), the report's FLOPs saved, a check against the
   masked original, and dense vs sparse time end to end.

    python examples/sparse_vit.py            # both parts (one to two minutes on a 2-core CPU)
    python examples/sparse_vit.py --small    # a seconds-long run of the same steps (the tests use it)
"""
import os

# OpenMP's worker threads spin between operations by default; on a shared CPU that spinning takes the
# cores from the work. Waiting passively costs nothing measurable on an idle machine (dense and sparse alike).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

import fxsparse  # noqa: E402
from fxsparse import patterns  # noqa: E402
from fxsparse.testing import masked_forward, relative_error  # noqa: E402

TOL = 1e-5  # largest error allowed, relative to the output's largest magnitude (fp32 on the CPU)


def vit(img_size, embed_dim, depth, num_heads, patch_size=16):
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=4.0 if embed_dim >= 384 else 3.0, qkv_bias=embed_dim >= 384).eval()


def bench(fn, inp, iters):
    """Median milliseconds of fn(inp), after one warm-up call."""
    times = []
    with torch.no_grad():
        for i in range(iters + 1):
            if inp.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(inp)
            if inp.is_cuda:
                torch.cuda.synchronize()
            if i:
                times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def attention_share(report, model_flops):
    """The share of the model's FLOPs in attention (q kᵀ and p v), from the report."""
    from fxsparse.match import flops
    total = sum(flops(row.site) or 0 for row in report)
    return total / (total + model_flops)


def linear_flops(model, tokens):
    """Multiply-add FLOPs per image of the model's linear layers (everything but attention itself)."""
    return sum(2 * m.in_features * m.out_features * tokens for m in model.modules() if isinstance(m, torch.nn.Linear))


def where():
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16, torch.cuda.get_device_name()
    return "cpu", torch.float32, f"{torch.get_num_threads()} CPU threads"


def check(what, got, want):
    err = relative_error(got, want)
    print(f"  {what}: max error {err:.1e} of the output's scale (tolerance {TOL:.0e})")
    return err <= TOL


# ------------------------------------------------------------------------------------------ part 1
def part1(small):
    print("=" * 100)
    model = vit(224, 96, 8, 8) if not small else vit(64, 32, 4, 2)
    side = model.patch_embed.img_size[0]
    print(f"Part 1: the origin scenario, a small ViT at {side} px ({(side // 16) ** 2 + 1} tokens)\n")
    layers = range(6) if not small else range(3)
    # CLS is global (attends to all, seen by all); patches see patches within 2 rows/cols.
    # 197 tokens are 2x2 blocks of the default 128: blocks of 32 let the mask skip something.
    mask_fn = patterns.only(patterns.local_2d(window=2, prefix_tokens=1, block_size=32), layers=layers)
    x = torch.randn(2, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1])
    sparse = fxsparse.transform(model, mask_fn, example_inputs=(x,))
    with torch.no_grad():
        want_dense = model(x)
        got_dense = fxsparse.transform(model, patterns.dense())(x)  # every site rewritten, all-True
        got_sparse = sparse(x)
    report = fxsparse.report(sparse)
    print(report)
    want_sparse, _ = masked_forward(model, (x,), mask_fn)
    print("\nchecks:")
    ok = check("all-True mask vs the dense model", got_dense, want_dense)
    ok &= check("sparse model vs the original masked at each attention (float64 oracle)", got_sparse, want_sparse)
    moved = relative_error(want_sparse, want_dense)
    print(f"  the mask itself moves the output by {moved:.1e} of its scale: the checks have teeth")
    if not ok or moved < 1e-3:
        sys.exit("FAIL: the transformed model does not match its reference")

    device, dtype, name = where()
    batch = 64 if device == "cuda" else 4
    inp = torch.randn(batch, *x.shape[1:], device=device, dtype=dtype)
    dense_m, sparse_m = model.to(device, dtype), sparse.to(device, dtype)
    iters = 20 if device == "cuda" else (3 if not small else 1)
    t_dense, t_sparse = bench(dense_m, inp, iters), bench(sparse_m, inp, iters)
    tokens = (side // 16) ** 2 + 1
    share = attention_share(report, linear_flops(model, tokens))
    visited = sum(r.density for r in report if r.density is not None) / max(1, len(report))
    print(f"\nforward, batch {batch}, {str(dtype).removeprefix('torch.')} on {device} ({name}): "
          f"dense {t_dense:.1f} ms, sparse {t_sparse:.1f} ms ({t_dense / t_sparse:.2f}x)")
    print(f"why no win here: at {tokens} tokens attention is {share:.0%} of the model's FLOPs and the layouts still "
          f"visit {visited:.0%} of the score blocks on average; the sparse op's fixed costs are then as large as "
          f"what it skips. Sparsity pays on long sequences: part 2.")


# ------------------------------------------------------------------------------------------ part 2
def part2(small):
    device, dtype, name = where()
    if small:
        img, (dim, depth, heads), label = 256, (64, 4, 2), "a tiny ViT/16 at 256 px"
    elif device == "cuda":
        img, (dim, depth, heads), label = 1024, (768, 12, 12), "ViT-B/16 at 1024 px"
    else:
        img, (dim, depth, heads), label = 768, (384, 12, 6), "ViT-S/16 at 768 px"
    tokens = (img // 16) ** 2 + 1
    print("\n" + "=" * 100)
    print(f"Part 2: where sparsity pays, {label} ({tokens} tokens), random weights\n")
    model = vit(img, dim, depth, heads)
    keep_dense = 2  # the same recipe: the last blocks stay dense
    mask_fn = patterns.only(patterns.local_2d(window=2, prefix_tokens=1, block_size=64),
                            layers=range(depth - keep_dense))
    x = torch.randn(1, 3, img, img)
    sparse = fxsparse.transform(model, mask_fn, example_inputs=(x,))
    with torch.no_grad():
        got = sparse(x)
    report = fxsparse.report(sparse)
    print(report)
    saved = sum(r.flops_saved or 0 for r in report)
    share = attention_share(report, linear_flops(model, tokens))
    print(f"\nattention FLOPs saved per image: {saved / 1e9:.1f} G; attention is {share:.0%} of the dense model's FLOPs")
    want, _ = masked_forward(model, (x,), mask_fn)
    print("\ncheck:")
    if not check("sparse model vs the original masked at each attention (float64 oracle)", got, want):
        sys.exit("FAIL: the transformed model does not match its reference")

    batch = 8 if device == "cuda" else 1
    inp = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
    dense_m, sparse_m = model.to(device, dtype), sparse.to(device, dtype)
    iters = 10 if device == "cuda" else (2 if not small else 1)
    t_dense, t_sparse = bench(dense_m, inp, iters), bench(sparse_m, inp, iters)
    speedup = t_dense / t_sparse
    print(f"\nforward end to end, batch {batch}, {str(dtype).removeprefix('torch.')} on {device} ({name}): "
          f"dense {t_dense:.0f} ms, sparse {t_sparse:.0f} ms ({speedup:.2f}x)")
    if speedup >= 1:
        print(f"the sparse model is {speedup:.2f}x faster: {len(report) - keep_dense} of {len(report)} attentions skip "
              f"most of their blocks, and attention is {share:.0%} of the work (the linear layers are unchanged)")
    else:
        print(f"slower than dense here: at {tokens} tokens attention is only {share:.0%} of the work, or the machine "
              f"was busy while timing (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); run it "
              f"again on an idle machine")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="small models: the same steps in seconds")
    parser.add_argument("--part", type=int, choices=(1, 2), help="run one part only")
    args = parser.parse_args()
    if args.part in (None, 1):
        part1(args.small)
    if args.part in (None, 2):
        part2(args.small)


if __name__ == "__main__":
    main()
