"""``python -m fxsparse inspect``: the report it prints and the one-line errors it exits 2 with."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxsparse.__main__ import main

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_VIT = ["timm:vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=3",
            "--input", "1,3,32,32"]


class TinyLM(nn.Module):
    """Token ids -> embeddings -> two causal SDPA attentions."""

    def __init__(self, dim=32, heads=2, depth=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(100, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(depth))

    def forward(self, ids):
        x = self.embed(ids)
        b, n, d = x.shape
        for qkv in self.qkv:
            q, k, v = qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
        return x


def tiny_lm():
    torch.manual_seed(0)
    return TinyLM()


def inspect(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "fxsparse", "inspect", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def site_rows(stdout):
    """Rows of the report table: lines that start with a site index."""
    return [line.split() for line in stdout.splitlines() if line.strip()[:1].isdigit()]


def test_timm_vit_with_pattern_layers_and_block_size():
    proc = inspect(*TINY_VIT, "--pattern", "union(local_2d(window=1, prefix_tokens=1), global_tokens(1))",
                   "--block-size", "32", "--layers", "0:2")
    assert proc.returncode == 0, proc.stderr
    rows = site_rows(proc.stdout)
    assert [r[1] for r in rows] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert all("rewritten" in r for r in rows[:2])  # the status column (a reason may follow it)
    assert " ".join(rows[2][-4:]) == "dense mask_fn returned None"
    assert all(r[r.index("17×17") + 1] == "32" for r in rows[:2])  # the block column


def test_module_callable_with_tokens():
    proc = inspect("test_cli:tiny_lm", "--tokens", "2,256", "--pattern", "sliding_window(32, causal=True)",
                   "--block-size", "32")
    assert proc.returncode == 0, proc.stderr
    rows = site_rows(proc.stdout)
    assert len(rows) == 2 and all("rewritten" in r for r in rows)
    assert all("256×256" in r for r in rows)


def test_bad_pattern_exits_2_with_one_line():
    proc = inspect(*TINY_VIT, "--pattern", '__import__("os").system("true")')
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("fxsparse: --pattern") and "expected a call" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,words", [
    (["--pattern", "eval('1')"], "unknown pattern 'eval'"),
    (["--pattern", "dense_mask(4, 4)"], "unknown pattern 'dense_mask'"),
    (["--pattern", "local_2d(window=x)"], "not a literal"),
    (["--pattern", "local_2d(window=[1] * 3)"], "not a literal"),
    (["--pattern", "local_2d(wndow=1)"], "unexpected keyword"),
    (["--pattern", "dense("], "not an expression"),
    (["--layers", "a:b"], "--layers"),
    (["--model-kwargs", "img_size"], "--model-kwargs"),
])
def test_bad_arguments_in_process(args, words, capsys):
    assert main(["inspect", *TINY_VIT[:3], *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_unknown_model_and_failing_forward_exit_2(capsys):
    for args, words in [(["timm:no_such_model"], "timm:no_such_model"),
                        (["no_such_module:make"], "No module named"),
                        # the forward fails on a 3-D image; which exception the model raises is its own business
                        ([*TINY_VIT[:3], "--input", "1,3,31"], "fxsparse: timm:vit_tiny_patch16_224: ")]:
        assert main(["inspect", *args]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_plot_writes_the_layouts_of_the_rewritten_sites(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sites.png"
    assert main(["inspect", *TINY_VIT, "--pattern", "local_2d(window=1, prefix_tokens=1)", "--block-size", "32",
                 "--layers", "0:2", "--plot", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # nothing rewritten with a layout: a one-line error, status 2
    assert main(["inspect", *TINY_VIT, "--layers", "9", "--plot", str(tmp_path / "none.png")]) == 2
    assert "no rewritten site has a layout" in capsys.readouterr().err
