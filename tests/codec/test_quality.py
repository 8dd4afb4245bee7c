"""Quality on the real model: SmolLM2 KV through the codec, perplexity of the next tokens."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore import codec
from kvstore.layout import KVLayout

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2_run() -> tuple:
    torch = pytest.importorskip("torch")
    from kvstore.codec.calibrate_model import continuation_logprobs, prefill
    from kvstore.models.smollm2 import load_smollm2, sample_tokens

    model, tokenizer = load_smollm2()
    ids = sample_tokens(tokenizer, 512 + 257, offset=20_000)
    exact = prefill(model, ids, 512)
    ref = continuation_logprobs(model, exact, ids, 512, 257)
    targets = torch.tensor(ids[513 : 512 + 257])
    return model, ids, exact, ref, targets, continuation_logprobs


def _dppl_and_bits(run: tuple, level: str) -> tuple[float, float]:
    model, ids, exact, ref, targets, logprobs = run
    layout = KVLayout(30, 3, 64, "float16", 256)
    fp16 = exact.astype(np.float16)
    chunks = [codec.encode(np.ascontiguousarray(fp16[:, :, :, t : t + 256]), layout, level)
              for t in (0, 256)]
    kv = np.concatenate([codec.decode(c).numpy() for c in chunks], axis=3)
    lp = logprobs(model, kv.astype(np.float32), ids, 512, 257)

    def nll(x: object) -> float:
        return float(-x[:-1].gather(1, targets[:, None]).mean())  # type: ignore[index]

    bits = 8 * sum(len(c) for c in chunks) / fp16.size
    return 100 * (np.exp(nll(lp) - nll(ref)) - 1), bits


@pytest.mark.parametrize(("level", "max_dppl", "max_bits"),
                         [("near-lossless", 1.0, 5.5), ("balanced", 3.0, 3.4)])
def test_uncalibrated_levels_keep_perplexity_on_real_kv(smollm2_run: tuple, level: str,
                                                        max_dppl: float, max_bits: float) -> None:
    dppl, bits = _dppl_and_bits(smollm2_run, level)
    assert dppl < max_dppl and bits < max_bits, (dppl, bits)
