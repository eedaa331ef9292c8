"""Each example runs to the end in a small configuration (its own checks pass: a failing check exits non-zero)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_demo_both_parts():
    out = run_example("sparse_vit.py", "--small")
    assert "Part 1" in out and "Part 2" in out
    assert out.count("max error") == 3 and "the checks have teeth" in out
    assert "attention FLOPs saved per image" in out
    last = out.strip().splitlines()[-1]  # a speedup, or a slowdown with its reason
    assert "faster" in last or ("slower than dense here" in last and "attention is only" in last), last


def test_gallery(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "gallery.png"
    out = run_example("gallery.py", str(path))
    assert "wrote" in out
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (1280, 380)  # 4 panels


@pytest.mark.slow  # about 40 s on a busy 2-core machine
def test_finetune_loss_goes_down():
    out = run_example("finetune.py", "--small", "--steps", "20")  # exits 1 unless the loss falls by a fifth
    assert "mean loss of the first" in out


def test_calibrate_example():
    out = run_example("calibrate_vit.py", "--small", "--batches", "2")
    assert "block density asked 30.0%" in out and "of the attention mass" in out
    assert "max error" in out


def test_hf_bert_long_padded():
    pytest.importorskip("transformers")
    out = run_example("hf_bert_long.py", "--small")
    assert "rewritten" in out and "real tokens: max error" in out


def test_hf_causal_lm_generates_with_a_window():
    pytest.importorskip("transformers")
    out = run_example("hf_causal_lm.py", "--small")
    assert "identical to the original model decoding with the window as a 4-D mask: True" in out


def test_packed_documents_training():
    out = run_example("packed_documents.py")  # exits non-zero unless step 0 equals the dense masked model
    assert "max |sparse - dense|" in out and out.count("blocks visited") == 8
