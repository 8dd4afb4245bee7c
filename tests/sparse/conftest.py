"""Sparse-decode tests: Triton kernels run interpreted on the CPU when no GPU is present.

TRITON_INTERPRET must be set before the kernels are decorated (at import), so it
is set here, ahead of collecting the test modules that import them.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
