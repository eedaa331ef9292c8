"""Setup shared by every test.

- Each test starts from the same global random state (``torch.manual_seed(0)``), so a test that draws
  from torch's global generator sees the same numbers alone, in any order, or in the whole suite.
- Tests marked ``interpret`` run fxsparse's Triton kernels: on a CUDA GPU, or on the CPU through
  Triton's interpreter. ``TRITON_INTERPRET=1`` must be set before triton is imported, so ``make test``
  runs them in a pytest process of their own (``TRITON_INTERPRET=1 pytest tests -m interpret``);
  with neither a GPU nor the variable they are skipped, and the reason says how to run them.

Helpers live in ``helpers.py`` (inputs, the transform's contract on one model), ``models.py`` (small
models of the common families) and, for the float64 oracles and the comparison, ``fxsparse.testing``.
"""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if INTERPRET or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="runs the Triton kernels: needs a CUDA GPU or TRITON_INTERPRET=1 "
                                   "(TRITON_INTERPRET=1 pytest tests -m interpret)")
    for item in items:
        if "interpret" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
