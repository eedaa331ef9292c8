"""Runtime masks and training at long context (GPU), fxsparse against its baselines in one run.

* ``padding``: a BERT-base-shaped batch (4 x 4096 tokens, 12 heads of 64, half of the tokens padding,
  sample lengths 1536 to 2560) through 12 attention layers, as a transformed model runs them: the
  model's [B, 1, N, N] bool mask (HuggingFace's, a key-padding mask expanded along the queries) folded
  into the layout once per forward (``SiteAttention.skip_padding``), then the op at every layer;
  against SDPA given the bool mask (the padding applied densely). Also the fold of the additive mask
  alone (bias kept, only fully padded blocks skipped) and no fold. Forward, and forward + backward.
* ``documents``: a packed-document training step at 32k tokens (16 heads of 64, 16 documents whose
  lengths are drawn again every step, causal within each): ``masks.packed_layout`` (from the lengths:
  its Triton build eagerly, the same replayed from a CUDA graph, and its torch build, the CPU path;
  also ``masks.document_layout``, from document ids) + forward +
  backward against FlexAttention's ``create_block_mask`` (compiled, and not) + compiled
  ``flex_attention`` forward + backward, the same documents for both. Then checks that the Triton
  build's tables equal the torch build's at 32k and 128k tokens, and times both builds.
* ``long``: the GPT-2-small-shaped causal LM (12 layers, 768 wide, 12 heads) with a 1,024-token causal
  sliding window, one training step (forward, backward, AdamW) at 131,072 tokens on one GPU: step time
  and peak memory; the loss over the vocabulary is computed in chunks (each recomputed in the
  backward), the blocks without activation checkpointing unless that runs out of memory.

Medians of CUDA-event timings after warm-ups, methods in turns. bf16.

    PYTHONPATH=. python benchmarks/training.py [--parts padding,documents,long] [--quick]

Prints a table; writes ``benchmarks/out/training.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F

import fxsparse
from fxsparse import patterns
from fxsparse.masks import _packed_layout_torch, document_ids, document_layout, packed_layout
from fxsparse.op import kernel_layout
from fxsparse.site import _fold_mask_bias, _to_bias


def timed(fn, warmup=3, reps=10, before=None):
    """Median ms of fn() over reps calls; ``before()`` (untimed) prepares each call."""
    times = []
    for i in range(warmup + reps):
        arg = before() if before is not None else None
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(arg)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


# ------------------------------------------------------------------------------ padding
def padding(rows, quick):
    b, h, n, d, layers = 4, 12, (1024 if quick else 4096), 64, 12
    torch.manual_seed(0)
    lengths = torch.tensor([3 * n // 8, 7 * n // 16, 9 * n // 16, 5 * n // 8], device="cuda")  # half padding
    keep = torch.arange(n, device="cuda")[None, :] < lengths[:, None]
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    base = kernel_layout(patterns.dense().layout(n, n, device="cuda"), d)  # what a site holds for mask_fn

    def model_mask():  # a new mask tensor every forward, as a model makes it (HF: key padding expanded)
        return keep[:, None, None, :].expand(b, 1, n, n)

    def sdpa(mask, grad):
        for _ in range(layers):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if grad:
                torch.autograd.grad(out, (q, k, v), dout)

    def sparse(mode):
        def run(mask, grad):
            # the site gets SDPA's bool mask ("fold"); the other two stand for a model that hands its
            # attention the mask made additive (HuggingFace's eager attention), once per forward
            bias = None if mode == "fold" else _to_bias(mask, q)
            for _ in range(layers):
                layout, bi = base, bias
                if mode == "fold":
                    layout, bi = _fold_mask_bias(base, None, mask, like=q)
                elif mode == "fold, bias kept":
                    layout, bi = _fold_mask_bias(base, bias)
                out = fxsparse.sparse_attention(q, k, v, layout, bias=bi)
                if grad:
                    torch.autograd.grad(out, (q, k, v), dout)
        return run

    methods = {"sdpa+mask": sdpa, "fxsparse": sparse("fold"), "fold, bias kept": sparse("fold, bias kept"),
               "no fold": sparse("none")}
    for grad in (False, True):
        for t in (q, k, v):
            t.requires_grad_(grad)
        res = {}
        for name, fn in list(methods.items()) * 2:
            ms = timed(lambda mask, fn=fn: fn(mask, grad), before=model_mask)
            res[name] = min(ms, res.get(name, ms))
        rows.append(dict(case=f"padding: {layers} attention layers, {b}x{h}x{n}x{d}, half of the tokens padding",
                         mode="fwd+bwd" if grad else "fwd", base="sdpa+mask", **res))
    with torch.no_grad():  # exactness on the real query rows, fp32
        qf, kf, vf = (t.detach().float() for t in (q, k, v))
        mask = model_mask()
        layout, bias = _fold_mask_bias(base, None, mask, like=qf)
        got = fxsparse.sparse_attention(qf, kf, vf, layout, bias=bias)
        want = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)
        real = keep[:, None, :, None]
        err = rel_err(got * real, want * real)
    print(f"check padding fp32: folded layout {layout} vs SDPA with the mask: max rel err {err:.2e}")
    return err


# ------------------------------------------------------------------------------ packed documents
def documents(rows, quick):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    cbm = torch.compile(create_block_mask)
    n, h, d, docs = (8192 if quick else 32768), 16, 64, 16
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    gen = torch.Generator().manual_seed(1)

    def draw():  # 16 documents of 0.5 to 1.5 times the mean length, filling n tokens
        w = 0.5 + torch.rand(docs, generator=gen)
        lengths = (w / w.sum() * n).long()
        lengths[-1] += n - lengths.sum()
        lengths = lengths.cuda()
        return lengths, document_ids(lengths, total=n)

    def fx_step(bs, build="packed_layout"):
        def run(drawn):
            lengths, ids = drawn
            if build == "packed_layout":  # on the GPU: the Triton build (fxsparse.kernels.tables)
                layout = packed_layout(lengths, n, causal=True, block_size=bs)
            elif build == "torch":  # the same tables in torch operations (the CPU path)
                layout = _packed_layout_torch(lengths[None], n, bs, True)
            else:
                layout = document_layout(ids, causal=True, block_size=bs)
            out = fxsparse.sparse_attention(q, k, v, layout)
            torch.autograd.grad(out, (q, k, v), dout)
        return run

    # packed_layout reads nothing back to the host, so one CUDA graph replays its whole build
    static_lengths = draw()[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            packed_layout(static_lengths, n, causal=True, block_size=64)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_layout = packed_layout(static_lengths, n, causal=True, block_size=64)

    def fx_graph_step(drawn):
        static_lengths.copy_(drawn[0])
        graph.replay()  # rewrites graph_layout's tables for this step's lengths
        torch.autograd.grad(fxsparse.sparse_attention(q, k, v, graph_layout), (q, k, v), dout)

    doc = torch.zeros(n, dtype=torch.long, device="cuda")  # one tensor the mask_mod reads: no recompiles

    def flex_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    def flex_step(build):
        def run(drawn):
            doc.copy_(drawn[1])
            block_mask = build(flex_mod, None, None, n, n, device="cuda")
            out = flex(q, k, v, block_mask=block_mask)
            torch.autograd.grad(out, (q, k, v), dout)
        return run

    methods = {"fxsparse packed_layout (CUDA graph)": fx_graph_step, "fxsparse packed_layout": fx_step(64),
               "fxsparse packed_layout (torch build)": fx_step(64, "torch"),
               "fxsparse packed_layout (128-blocks)": fx_step(128), "fxsparse document_layout": fx_step(64, "ids"),
               "flex (compiled create_block_mask)": flex_step(cbm), "flex": flex_step(create_block_mask)}
    res = {}
    for name, fn in list(methods.items()) * 2:
        gen.manual_seed(2)  # the same documents for every method
        ms = timed(fn, warmup=3, reps=10, before=draw)
        res[name] = min(ms, res.get(name, ms))
    rows.append(dict(case=f"documents: layout + fwd + bwd, 1x{h}x{n}x{d}, {docs} documents re-drawn every step",
                     mode="step", base="flex (compiled create_block_mask)", **res))
    # parts of the step, for the table's note
    lengths, ids = draw()
    doc.copy_(ids)
    parts = {"fxsparse packed_layout": timed(lambda _: packed_layout(lengths, n, causal=True, block_size=64)),
             "fxsparse packed_layout (torch build)": timed(lambda _: _packed_layout_torch(lengths[None], n, 64, True)),
             "fxsparse document_layout": timed(lambda _: document_layout(ids, causal=True, block_size=64))}
    static_lengths.copy_(lengths)
    parts["fxsparse packed_layout (CUDA graph)"] = timed(lambda _: graph.replay())
    same_graph = torch.equal(graph_layout.data, packed_layout(lengths, n, causal=True, block_size=64).data)
    parts["flex create_block_mask (compiled)"] = timed(lambda _: cbm(flex_mod, None, None, n, n, device="cuda"))
    layout = packed_layout(lengths, n, causal=True, block_size=64)
    block_mask = cbm(flex_mod, None, None, n, n, device="cuda")

    def fx_fb(_):
        torch.autograd.grad(fxsparse.sparse_attention(q, k, v, layout), (q, k, v), dout)

    def flex_fb(_):
        torch.autograd.grad(flex(q, k, v, block_mask=block_mask), (q, k, v), dout)
    parts["fxsparse fwd+bwd"], parts["flex fwd+bwd"] = timed(fx_fb), timed(flex_fb)
    print("documents, parts of a step (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    with torch.no_grad():
        err = rel_err(fxsparse.sparse_attention(q, k, v, layout), flex(q, k, v, block_mask=block_mask))
    same = torch.equal(layout.to_mask(), document_layout(ids, causal=True, block_size=64).to_mask())
    print(f"check documents bf16: fxsparse vs Flex max rel err {err:.2e}; packed_layout equals document_layout: {same}, "
          f"its CUDA graph replay equals it: {same_graph}")
    rows[-1]["parts"] = parts
    rows[-1]["builds_equal"] = packed_builds_equal(n, quick)
    return err


def packed_builds_equal(n, quick) -> bool:
    """packed_layout's Triton build against its torch build, every table bit for bit: at the step's
    length and at 128k tokens (32k with --quick), causal or not, blocks of 64 and 128, a batch of 2 with
    padding after the documents; and the build's time at the long length."""
    gen = torch.Generator().manual_seed(3)
    ok = True
    for total in (n, 32768 if quick else 131072):
        w = 0.5 + torch.rand(2, 16, generator=gen)
        lengths = (w / w.sum(-1, keepdim=True) * (total - 100)).long().cuda()  # ~100 tokens of padding each
        lengths[1, 3] = 0  # an empty document
        for causal in (True, False):
            for bs in (64, 128):
                got = packed_layout(lengths, total, causal=causal, block_size=bs)
                want = _packed_layout_torch(lengths, total, bs, causal)
                same = torch.equal(got.data, want.data)
                ok &= same
                print(f"check packed_layout builds, {total} tokens, batch 2, causal={causal}, blocks of {bs}: "
                      f"the Triton build's tables equal the torch build's: {same}")
        one = lengths[:1]
        print(f"packed_layout build, {total} tokens, 16 documents, blocks of 64 (ms): Triton "
              f"{timed(lambda _: packed_layout(one, total, causal=True, block_size=64)):.3f}, torch "
              f"{timed(lambda _: _packed_layout_torch(one, total, 64, True)):.3f}")
    return ok


# ------------------------------------------------------------------------------ 131k-token LM
def chunked_loss(hidden, weight, labels, chunks=8):
    """Mean next-token cross-entropy over the vocabulary, a slice of the tokens at a time; each slice's
    logits are recomputed in the backward instead of kept (131k x 50k logits would be 13 GB in bf16)."""
    from torch.utils.checkpoint import checkpoint

    def part(h, y):
        return F.cross_entropy((h @ weight.t()).float(), y, reduction="sum")
    total = sum(checkpoint(part, h, y, use_reentrant=False)
                for h, y in zip(hidden.chunk(chunks, 0), labels.chunk(chunks, 0)))
    return total / labels.numel()


def long_lm(rows, quick):
    import transformers

    n, window = (16384 if quick else 131072), 1024
    cfg = transformers.GPT2Config(n_positions=n, n_embd=768, n_layer=12, n_head=12, vocab_size=50257, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).cuda()
    ids = torch.randint(0, 50257, (1, n), device="cuda")
    out = {}
    for method in ("fxsparse", "dense (causal SDPA, no window)"):
        net = fxsparse.transform(model, patterns.sliding_window(window, causal=True),
                                 example_inputs={"input_ids": ids[:, :128]}) if method == "fxsparse" else model
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        checkpointing = False

        def step(_, net=net, opt=opt):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                hidden = net.transformer(input_ids=ids, use_cache=False).last_hidden_state[0]
                loss = chunked_loss(hidden[:-1], net.lm_head.weight, ids[0, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        while True:
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                ms = timed(step, warmup=1, reps=3)
                break
            except torch.OutOfMemoryError:
                if checkpointing:
                    raise
                opt.zero_grad(set_to_none=True)
                net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                checkpointing = True
        out[method] = dict(ms=ms, peak_gib=torch.cuda.max_memory_allocated() / 2**30, checkpointing=checkpointing)
        print(f"{method}: GPT-2-small shape, {n} tokens, causal window {window}: training step {ms:.1f} ms, "
              f"peak {out[method]['peak_gib']:.1f} GiB, activation checkpointing {'on' if checkpointing else 'off'}")
        net = opt = None  # free the optimizer's state before the next method
        if quick:
            break
    rows.append(dict(case=f"GPT-2-small shape, {n} tokens, causal window {window}: training step", mode="step",
                     base=None, **{k: v["ms"] for k, v in out.items()}, memory=out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="padding,documents,long")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    rows = []
    if "padding" in parts:
        padding(rows, args.quick)
    if "documents" in parts:
        documents(rows, args.quick)
    if "long" in parts:
        long_lm(rows, args.quick)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms (speed-up over the baseline)")
    for r in rows:
        base = r["base"]
        cells = [f"{k} {r[k]:.2f}" + (f" ({r[base] / r[k]:.2f}x)" if base else "")
                 for k in r if isinstance(r[k], float)]
        print(f"{r['case']} [{r['mode']}]: " + "; ".join(cells))
    os.makedirs("benchmarks/out", exist_ok=True)
    with open("benchmarks/out/training.json", "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
