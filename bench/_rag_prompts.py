"""Prompt sets of bench_rag.py: ``prefix + retrieved passages + question``.

- ``bench``: pydoc_data.topics passages (the language reference), each topic's first
  tokens; the set the RAG methods were tuned on.
- ``held-out``: the same topics read from token 128 on, in reverse order, another
  prefix and question (used by earlier sessions to check the lead choice).
- ``stdlib``: never used for tuning anything. Passages are the docstrings of
  standard-library modules (module docstring, then each public member's), from
  token 64 on; another prefix, question and answer wording. Other topics (library
  APIs, not the language reference) and other text (docstrings, not the manual).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

PROMPT_SETS = ("bench", "held-out", "stdlib")
PREFIX = "You are a helpful assistant. Answer the question using the documentation below.\n\n"
QUESTION = "\n\nQuestion: According to the documentation above, what is '{topic}' about?\nAnswer:"
HELD_OUT_PREFIX = "Use the following reference material to answer.\n\n"
HELD_OUT_QUESTION = "\n\nQ: Explain '{topic}' based on the text above.\nA:"
HELD_OUT_OFFSET = 128  # tokens skipped at the start of each passage
STDLIB_PREFIX = "Below are excerpts from the Python standard library's docstrings.\n\n"
STDLIB_QUESTION = "\n\nUsing only these excerpts, how would I use the {topic} module?\nReply:"
STDLIB_OFFSET = 64
STDLIB_MODULES = (
    "argparse base64 calendar collections configparser contextlib csv dataclasses datetime "
    "difflib email.message enum fractions ftplib functools getopt gettext glob gzip heapq "
    "hmac http.client http.cookies imaplib inspect ipaddress json locale logging mailbox "
    "optparse pathlib pickle pprint queue random shlex shutil smtplib socket statistics "
    "string subprocess tarfile tempfile textwrap threading tokenize typing unittest.case "
    "urllib.parse uuid wave zipfile"
).split()


def _stdlib_text(name: str) -> str:
    """A module's docstring, then ``member: docstring`` for each public member that has one."""
    module = importlib.import_module(name)
    parts = [inspect.cleandoc(module.__doc__ or "")]
    for member in sorted(getattr(module, "__all__", None) or dir(module)):
        obj = getattr(module, member, None)
        if member.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) == name and obj.__doc__:
            parts.append(f"{member}: {inspect.cleandoc(obj.__doc__)}")
    return "\n\n".join(parts)


def _passages(tokenizer: Any, prompt_set: str, chunk_tokens: int) -> list[tuple[str, list[int]]]:
    if prompt_set == "stdlib":
        texts = [(name, _stdlib_text(name)) for name in STDLIB_MODULES]
        offset = STDLIB_OFFSET
    else:
        from pydoc_data.topics import topics

        texts = [(name, topics[name]) for name in sorted(topics, reverse=prompt_set != "bench")]
        offset = 0 if prompt_set == "bench" else HELD_OUT_OFFSET
    passages = []
    for name, text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= offset + chunk_tokens:
            passages.append((name, ids[offset : offset + chunk_tokens]))
    return passages


def make_prompts(
    tokenizer: Any, prompt_set: str, num_prompts: int, num_chunks: int, chunk_tokens: int
) -> list[dict]:
    """``num_prompts`` prompts of ``num_chunks`` distinct passages of ``chunk_tokens`` tokens.

    Returns dicts with ``prefix``, ``chunks`` (token-id lists) and ``query``.
    """
    passages = _passages(tokenizer, prompt_set, chunk_tokens)
    if not passages:
        raise ValueError(f"no {prompt_set} passage has {chunk_tokens} tokens")
    step = max(1, len(passages) // (num_prompts * num_chunks))
    prefix, question = {
        "bench": (PREFIX, QUESTION),
        "held-out": (HELD_OUT_PREFIX, HELD_OUT_QUESTION),
        "stdlib": (STDLIB_PREFIX, STDLIB_QUESTION),
    }[prompt_set]
    shift = {"bench": 0, "held-out": 3, "stdlib": 1}[prompt_set]  # first passage
    asked = {"bench": 0, "held-out": 1, "stdlib": 2}[prompt_set]  # which passage is asked about
    prompts = []
    for p in range(num_prompts):
        picked = [
            passages[((p * num_chunks + c) * step + shift) % len(passages)]
            for c in range(num_chunks)
        ]
        topic = picked[(p + asked) % num_chunks][0]
        prompts.append(
            {
                "prefix": tokenizer(prefix)["input_ids"],
                "chunks": [ids for _, ids in picked],
                "query": tokenizer(question.format(topic=topic))["input_ids"],
            }
        )
    return prompts
