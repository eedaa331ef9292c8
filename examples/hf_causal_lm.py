"""A HuggingFace causal LM generating with a sliding window: ``generate()`` as usual, on the model fxsparse hands back.

A small LlamaForCausalLM (random weights, grouped-query attention) gets a causal sliding window of
64 tokens at every layer. The prompt's forward (prefill) runs the block-sparse op; each decoding
step (one query against the KV cache) runs the window as a token mask. The generated tokens are
checked against the original model decoding without a cache, given the same window as an explicit
4-D attention mask at every step (float64, so no near-tie flips a greedy choice).

    python examples/hf_causal_lm.py [--small]

The cache, ``generate()``'s options and the model's class are HuggingFace's own: fxsparse changed
only the attention modules. Lengths vary at every decoding step; each new (q_len, kv_len) builds its
layout once.
"""
import argparse
import sys
import time

import torch
import transformers

import fxsparse
from fxsparse import patterns


def greedy_with_window(model, ids, steps, window):
    """The original model, no cache, each step given the causal window as an explicit 4-D mask."""
    for _ in range(steps):
        n = ids.shape[1]
        i = torch.arange(n)
        keep = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window)
        mask = torch.zeros(n, n, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
        logits = model(input_ids=ids, attention_mask=mask[None, None].expand(ids.shape[0], 1, n, n)).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a shorter prompt and fewer new tokens (seconds)")
    args = parser.parse_args()
    prompt, new, window = (96, 8, 32) if args.small else (512, 24, 64)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM(config).eval().double()
    model.generation_config.eos_token_id = None  # random weights: generate every requested token
    ids = torch.randint(1, 500, (2, prompt))

    mask_fn = patterns.sliding_window(window, causal=True, block_size=64)
    sparse = fxsparse.transform(model, mask_fn, example_inputs={"input_ids": ids})
    print(fxsparse.report(sparse))
    with torch.no_grad():
        t = time.perf_counter()
        got = sparse.generate(ids, max_new_tokens=new, do_sample=False)
        took = time.perf_counter() - t
        want = greedy_with_window(model, ids, new, window)
        dense = model.generate(ids, max_new_tokens=new, do_sample=False)
    print(f"\ngenerated {new} tokens after a {prompt}-token prompt in {took:.1f} s: {got[0, prompt:].tolist()}")
    same = torch.equal(got, want)
    print(f"identical to the original model decoding with the window as a 4-D mask: {same}; "
          f"differs from dense decoding in {int((got != dense).sum())} of {got[:, prompt:].numel()} tokens")
    if not same:
        sys.exit("FAIL: generation with the window differs from its reference")


if __name__ == "__main__":
    main()
