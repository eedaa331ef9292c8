"""HuggingFace BERT on long padded sequences: a sliding window plus a global [CLS] token.

A BertModel with random weights (transformers' own code, untouched) reads two sequences of up to
2048 tokens, the second padded. Its attention mask (the padding) stays in force inside the sparse
op; fxsparse adds a sliding window of 128 tokens each side with the first token global. Checked
against the original model masked with the same window at each attention (float64 oracle) on the
real tokens, then timed against the dense model.

    python examples/hf_bert_long.py [--small]

HuggingFace models are captured with torch.export: pass ``example_inputs`` as a dict of the keyword
arguments you call the model with. Other lengths work afterwards (each new length builds its layout
once at its first call).
"""
import os

# as in sparse_vit.py: OpenMP threads that spin between operations take a shared CPU's cores from the work
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import fxsparse  # noqa: E402
from fxsparse import patterns  # noqa: E402
from fxsparse.testing import masked_forward, relative_error  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="256 tokens instead of 2048 (seconds)")
    args = parser.parse_args()
    n, window = (256, 32) if args.small else (2048, 128)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=n, attn_implementation="sdpa")
    model = transformers.BertModel(config).eval()
    ids = torch.randint(1, 1000, (2, n))
    attention_mask = torch.ones(2, n, dtype=torch.long)
    attention_mask[1, n * 5 // 8:] = 0  # the second sequence is padded

    mask_fn = patterns.union(patterns.sliding_window(window), patterns.global_tokens(1), block_size=64)
    sparse = fxsparse.transform(model, mask_fn, example_inputs={"input_ids": ids, "attention_mask": attention_mask})
    print(fxsparse.report(sparse))

    with torch.no_grad():
        got = sparse(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        dense = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    want = masked_forward(model, (ids, attention_mask), mask_fn)[0].last_hidden_state
    real = attention_mask.bool()
    err = relative_error(got[real], want[real])
    moved = relative_error(want[real], dense[real])
    print(f"\nsparse vs the original masked with the same window (float64), real tokens: max error {err:.1e} of "
          f"the output's scale; the window moves the output by {moved:.1e}")
    if err > 1e-5 or moved < 1e-3:
        sys.exit("FAIL: the sparse model does not match its reference")

    def timed(m):
        """Median milliseconds of three calls after a warm-up."""
        times = []
        with torch.no_grad():
            for i in range(4):
                t = time.perf_counter()
                m(input_ids=ids, attention_mask=attention_mask)
                times.append((time.perf_counter() - t) * 1e3)
        return sorted(times[1:])[1]

    t_dense, t_sparse = timed(model), timed(sparse)
    density = sum(r.density for r in fxsparse.report(sparse)) / len(fxsparse.report(sparse))
    print(f"forward, batch 2 x {n} tokens on {torch.get_num_threads()} CPU threads: dense {t_dense:.0f} ms, sparse "
          f"{t_sparse:.0f} ms ({t_dense / t_sparse:.2f}x) with {density:.0%} of the score blocks visited"
          + ("" if t_sparse < t_dense else f"; slower: the machine was busy (load average {os.getloadavg()[0]:.1f} "
                                            f"on {os.cpu_count()} cores) or the sequence is too short to pay"))


if __name__ == "__main__":
    main()
