"""Whole models, one run, the same mask for every method (GPU).

Methods: the model as shipped (dense SDPA), SDPA given the bool mask, FlexAttention with the same
mask written as a ``mask_mod`` in index arithmetic (compiled, as its users write it), and
``fxsparse.transform``. Forward (no grad) and training step (forward + backward), bf16, medians of
CUDA-event timings. A correctness line compares fxsparse with Flex in fp32 and shows how far the mask
moves the output (so the check has teeth). Then a GPT-2-small-shaped LM at 8k tokens with every site
kept dense (mask_fn returns None): the transformed model must cost what the original costs; the same LM
with a causal sliding window against Flex; a BERT-base-shaped encoder whose samples are half padding.

    PYTHONPATH=. python benchmarks/models.py [--quick] [--cases lm-window,vit2048] [--profile]

Prints a table; writes ``benchmarks/out/models.json``. ``--profile`` adds, per case and method, where
one step's time goes (torch.profiler): the GPU time of the attention kernels and of the rest of the
model, the GPU's idle time within the step, the host time to issue the step, and the heaviest kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.overrides import TorchFunctionMode

import fxsparse
from fxsparse import patterns

flex = torch.compile(flex_attention, dynamic=False)
PROFILE = False  # --profile


class SdpaWith(TorchFunctionMode):
    """Every SDPA call of the model gets the bool mask (baseline: SDPA given the mask) or runs
    FlexAttention with the block mask instead (baseline: the model's attention as Flex)."""

    def __init__(self, attn_mask=None, block_mask=None):
        super().__init__()
        self.attn_mask, self.block_mask = attn_mask, block_mask

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            if self.block_mask is not None:
                return flex(q, k, v, block_mask=self.block_mask)
            return func(q, k, v, attn_mask=self.attn_mask)
        return func(*args, **kwargs)


def timed(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


ATTENTION_KERNELS = ("forward_kernel", "dq_kernel", "dkdv_kernel",  # fxsparse
                     "triton_tem_", "flex_attention",  # FlexAttention (inductor templates)
                     "flash", "fmha", "attention", "sdpa")  # PyTorch's SDPA kernels


def profile_step(fn, steps=3):
    """Where one step's time goes: GPU ms of attention kernels and of the rest, wall ms per step (CUDA
    events), host ms to issue a step (no synchronisation inside it), and the five heaviest kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    issue = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        issue.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
    kernels: dict = {}
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            kernels[evt.name] = kernels.get(evt.name, 0.0) + evt.time_range.elapsed_us() / 1e3 / steps
    attention = sum(ms for name, ms in kernels.items() if any(a in name for a in ATTENTION_KERNELS))
    total = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:5]
    return dict(wall_ms=start.elapsed_time(end) / steps, gpu_ms=total, attention_ms=attention, rest_ms=total - attention,
                issue_ms=statistics.median(issue), kernels=sum(1 for _ in prof.events() if _.device_type == DeviceType.CUDA) // steps,
                top=[(name[:60], round(ms, 3)) for name, ms in top])


def print_profile(case, method, p):
    print(f"profile {case} {method}: step {p['wall_ms']:.2f} ms (profiled), kernels {p['gpu_ms']:.2f} ms "
          f"= attention {p['attention_ms']:.2f} + rest {p['rest_ms']:.2f}; GPU idle {p['wall_ms'] - p['gpu_ms']:.2f} ms; "
          f"host issues the step in {p['issue_ms']:.2f} ms; {p['kernels']} kernels")
    for name, ms in p["top"]:
        print(f"    {ms:8.3f} ms  {name}")


def time_in_turns(case: str, methods: dict, forward, train: bool) -> dict:
    """Each method's step time in ms: the better median of two rounds, the methods timed in turns.
    ``methods``: name -> (module, the context its steps run in: a baseline's SdpaWith, or None);
    ``forward(module)`` is the model's output, whose mean square a training step differentiates.
    With --profile, also where one step's time goes, once per method."""
    results, profiled = {}, set()
    for method in list(methods) * 2:
        net, mode = methods[method]

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16), mode if mode is not None else contextlib.nullcontext():
                out = forward(net)
            if train:
                out.float().square().mean().backward()
        net.train(train)
        with torch.set_grad_enabled(train):
            t = timed(step)
            if PROFILE and method not in profiled:
                profiled.add(method)
                print_profile(f"{case} {'train' if train else 'forward'}", method, profile_step(step))
        results[method] = min(t, results.get(method, t))
    return results


def local_window_mod(grid, window, prefix):
    """The local 2-D window with global prefix tokens, as index arithmetic."""
    def mask_mod(b, h, q_idx, kv_idx):
        qp, kp = q_idx - prefix, kv_idx - prefix
        near = ((qp // grid - kp // grid).abs() <= window) & ((qp % grid - kp % grid).abs() <= window)
        return (q_idx < prefix) | (kv_idx < prefix) | near
    return mask_mod


def vit_case(img, window, batch, rows, quick):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", img_size=img, pretrained=False).cuda()
    grid, n = img // 16, (img // 16) ** 2 + 1
    mask_mod = local_window_mod(grid, window, 1)
    block_mask = create_block_mask(mask_mod, None, None, n, n, device="cuda")
    bool_mask = create_mask_dense(mask_mod, n)
    mask_fn = patterns.local_2d(window=window, prefix_tokens=1)
    x = torch.randn(batch, 3, img, img, device="cuda")
    sparse = fxsparse.transform(model, mask_fn)
    density = None
    methods = {"fxsparse": (sparse, None), "dense": (model, None),
               "sdpa+mask": (model, SdpaWith(attn_mask=bool_mask)), "flex": (model, SdpaWith(block_mask=block_mask))}
    for train in (False, True) if not quick else (False,):
        results = time_in_turns(f"ViT {img}px", methods, lambda net: net(x), train)
        density = density or fxsparse.report(sparse).rows[0].density
        rows.append(dict(model=f"ViT-B/16 {img}px ({n} tok, {2 * window + 1}x{2 * window + 1} + CLS)", batch=batch,
                         mode="train step" if train else "forward", density=density, **results))
    model.eval(), sparse.eval()
    with torch.no_grad():  # correctness in fp32 on one image
        xs = x[:1]
        got = sparse(xs)
        with SdpaWith(block_mask=block_mask):
            want = model(xs)
        dense = model(xs)
    err = ((got - want).abs().max() / want.abs().max()).item()
    moved = ((dense - want).abs().max() / want.abs().max()).item()
    print(f"check ViT {img}px fp32: fxsparse vs Flex max rel err {err:.2e}; the mask moves the output by {moved:.2e}")
    return err


def create_mask_dense(mask_mod, n):
    i = torch.arange(n, device="cuda")
    return mask_mod(0, 0, i[:, None], i[None, :])


def lm_dense_sites(rows, quick):
    import transformers

    n = 2048 if quick else 8192
    cfg = transformers.GPT2Config(n_positions=n, n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 50257, (1, n), device="cuda")
    sparse = fxsparse.transform(model, lambda site: None, example_inputs={"input_ids": ids})
    with torch.no_grad():
        t = {}
        for name, m in (("dense", model), ("fxsparse", sparse)) * 2:
            ms = timed(lambda m=m: m(input_ids=ids, use_cache=False))
            t[name] = min(ms, t.get(name, ms))
    rows.append(dict(model=f"GPT-2-small shape, {n} tok, every site kept dense", batch=1, mode="forward",
                     density=1.0, **t))


def lm_window(rows, quick):
    """A GPT-2-small-shaped causal LM with a causal sliding window, against Flex with the same mask."""
    import transformers

    n, window = (2048, 256) if quick else (8192, 1024)
    cfg = transformers.GPT2Config(n_positions=n, n_embd=768, n_layer=12, n_head=12, vocab_size=50257, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).cuda()
    ids = torch.randint(0, 50257, (1, n), device="cuda")

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

    block_mask = create_block_mask(mask_mod, None, None, n, n, device="cuda")
    sparse = fxsparse.transform(model, patterns.sliding_window(window, causal=True),
                                example_inputs={"input_ids": ids[:, :128]})
    methods = {"fxsparse": (sparse, None), "dense": (model, None), "flex": (model, SdpaWith(block_mask=block_mask))}
    for train in (False, True):
        results = time_in_turns("GPT-2 window", methods, lambda net: net(input_ids=ids, use_cache=False).logits, train)
        rows.append(dict(model=f"GPT-2-small shape, {n} tok, causal window {window}", batch=1,
                         mode="train step" if train else "forward", density=fxsparse.report(sparse).rows[0].density,
                         **results))
    model.eval(), sparse.eval()
    with torch.no_grad():
        got = sparse(input_ids=ids, use_cache=False).logits
        with SdpaWith(block_mask=block_mask):
            want = model(input_ids=ids, use_cache=False).logits
    print(f"check GPT-2 window fp32: fxsparse vs Flex max rel err {((got - want).abs().max() / want.abs().max()).item():.2e}")


def bert_padding(rows, quick):
    """A BERT-base-shaped encoder on a batch whose samples are half padding: the padding as a dense
    mask (the model as shipped) against fxsparse skipping the padded blocks (all-True mask_fn)."""
    import transformers

    n = 1024 if quick else 4096
    cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, max_position_embeddings=n, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).cuda().eval()
    ids = torch.randint(0, 30000, (4, n), device="cuda")
    mask = torch.ones(4, n, dtype=torch.long, device="cuda")
    mask[:, n // 2:] = 0
    example = {"input_ids": ids[:, :128], "attention_mask": mask[:, :128]}
    sparse = fxsparse.transform(model, patterns.dense(), example_inputs=example)
    unfolded = fxsparse.transform(model, patterns.dense(), example_inputs=example)
    for site in fxsparse.site.site_modules(unfolded):  # the padding stays an additive bias over every block
        site.skip_padding = False
    results = {}
    nets = (("fxsparse", sparse), ("dense", model), ("unfolded", unfolded),
            ("fxsparse compiled", torch.compile(sparse)), ("dense compiled", torch.compile(model)))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for method, net in nets * 2:
            t = timed(lambda net=net: net(input_ids=ids, attention_mask=mask))
            results[method] = min(t, results.get(method, t))
    name = f"BERT-base shape, {n} tok, half of each sample padding"
    rows.append(dict(model=name, batch=4, mode="forward", density=0.5, dense=results["dense"],
                     fxsparse=results["fxsparse"]))
    rows.append(dict(model=name + " (skip_padding=False)", batch=4, mode="forward", density=1.0,
                     dense=results["dense"], fxsparse=results["unfolded"]))
    rows.append(dict(model=name + " (both torch.compile'd)", batch=4, mode="forward", density=0.5,
                     dense=results["dense compiled"], fxsparse=results["fxsparse compiled"]))
    with torch.no_grad():
        got = sparse(input_ids=ids, attention_mask=mask).last_hidden_state[:, : n // 2]
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, : n // 2]
    print(f"check BERT padding fp32: fxsparse vs the model max rel err {((got - want).abs().max() / want.abs().max()).item():.2e}")


class MHABlock(torch.nn.Module):
    """A pre-norm encoder block as a user writes it around nn.MultiheadAttention."""

    def __init__(self, width=768, heads=12):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width))

    def forward(self, x, pad):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MHAEncoder(torch.nn.Module):
    def __init__(self, depth=12):
        super().__init__()
        self.blocks = torch.nn.ModuleList(MHABlock() for _ in range(depth))

    def forward(self, x, pad):
        for blk in self.blocks:
            x = blk(x, pad)
        return x


def torch_encoder(rows, quick):
    """PyTorch's own nn.TransformerEncoder, and a user's encoder of nn.MultiheadAttention blocks (both
    BERT-base-sized: 12 layers, 768 wide, 12 heads) on a batch whose samples are half padding (the key
    padding mask), in eval mode. The originals take PyTorch's fused fast paths (nested tensors skip the
    padding in the encoder); fxsparse's models fold the padding into an all-True layout (its blocks
    skipped), and add a sliding window of 256 tokens on top."""
    n = 1024 if quick else 4096
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True)
    models = {"nn.TransformerEncoder": (torch.nn.TransformerEncoder(layer, 12).cuda().eval(), "src_key_padding_mask"),
              "nn.MultiheadAttention blocks": (MHAEncoder().cuda().eval(), "pad")}
    x = torch.randn(4, n, 768, device="cuda")
    pad = torch.zeros(4, n, dtype=torch.bool, device="cuda")
    pad[:, n // 2:] = True
    real = ~pad[..., None]
    for label, (model, pad_name) in models.items():
        example = (x[:, :128], None, pad[:, :128]) if pad_name != "pad" else (x[:, :128], pad[:, :128])
        dense = fxsparse.transform(model, patterns.dense(), example_inputs=example)
        window = fxsparse.transform(model, patterns.sliding_window(256), example_inputs=example)
        results = {}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for method, net in (("dense", model), ("fxsparse", dense), ("window", window)) * 4:  # host-bound: 4 turns
                t = timed(lambda net=net: net(x, **{pad_name: pad}))
                results[method] = min(t, results.get(method, t))
            got, want = dense(x, **{pad_name: pad}) * real, model(x, **{pad_name: pad}) * real
        name = f"{label} (12 x 768, 12 heads), {n} tok, half of each sample padding, eval"
        rows.append(dict(model=name + ", all-True mask_fn", batch=4, mode="forward", density=0.5,
                         dense=results["dense"], fxsparse=results["fxsparse"]))
        rows.append(dict(model=name + ", sliding window 256", batch=4, mode="forward", density=float("nan"),
                         dense=results["dense"], fxsparse=results["window"]))
        print(f"check {label} bf16: fxsparse vs the model on the real tokens, max rel err "
              f"{((got - want).abs().max() / want.abs().max()).item():.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, forward only")
    parser.add_argument("--only-new", action="store_true", help="skip the ViT cases")
    parser.add_argument("--cases", default="vit1024,vit2048,lm-dense,lm-window,bert,torch-encoder",
                        help="which cases to run, of vit1024, vit2048, lm-dense, lm-window, bert, torch-encoder")
    parser.add_argument("--profile", action="store_true",
                        help="also print where one step's time goes, per case and method (torch.profiler)")
    args = parser.parse_args()
    global PROFILE
    PROFILE = args.profile
    cases = set(args.cases.split(","))
    if args.only_new:
        cases -= {"vit1024", "vit2048"}
    rows = []
    if "vit1024" in cases:
        vit_case(512 if args.quick else 1024, 3, 4 if not args.quick else 2, rows, args.quick)
    if "vit2048" in cases and not args.quick:
        vit_case(2048, 3, 1, rows, True)
    if "lm-dense" in cases:
        lm_dense_sites(rows, args.quick)
    if "lm-window" in cases:
        lm_window(rows, args.quick)
    if "bert" in cases:
        bert_padding(rows, args.quick)
    if "torch-encoder" in cases:
        torch_encoder(rows, args.quick)
    from tabulate import tabulate

    table = []
    for r in rows:
        base = r["dense"]
        cells = [r["model"], r["batch"], r["mode"], f"{r['density']:.1%}"]
        for m in ("dense", "sdpa+mask", "flex", "fxsparse"):
            cells.append("" if m not in r else f"{r[m]:.2f} ({base / r[m]:.2f}x)")
        table.append(cells)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms (speed-up over dense)")
    print(tabulate(table, headers=["model", "batch", "mode", "density", "dense", "sdpa+mask", "flex", "fxsparse"]))
    os.makedirs("benchmarks/out", exist_ok=True)
    with open("benchmarks/out/models.json", "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
