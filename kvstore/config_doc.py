"""The configuration reference generated from the typed config, and the effective config.

``reference()`` reads every field of ``kvstore.config.Config`` with its default and
the comment written beside it, so the README's table, ``kvstore config reference``
and the code cannot drift apart (tests/test_readme.py compares them).
``effective_toml`` prints a loaded config back as TOML, secrets redacted.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kvstore.config as config_module
from kvstore.config import Config

_FIELD_RE = re.compile(r"^\s+([a-z_][a-z0-9_]*)\s*:\s*[^=#]+?(?:=.*?)?(?:#\s*(.*))?$")
_SECRET_KEYS = frozenset({"server.tokens"})  # their table keys are bearer tokens


@dataclass(frozen=True, slots=True)
class ConfigField:
    """One leaf key of the config tree."""

    key: str  # dotted, e.g. "server.listen"
    default: str  # as the README shows it: `unset`, `true`, `64MiB`, ...
    doc: str  # the comment written beside the field (and above it)


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment lines (those right above it, then the trailing one)."""
    docs: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        m = _FIELD_RE.match(line)
        if m and not stripped.startswith(("def ", "@", '"""')):
            docs[m.group(1)] = " ".join(above + ([m.group(2).strip()] if m.group(2) else []))
        above = []
    return docs


def format_default(key: str, value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and key.endswith("_bytes") and value:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % size == 0:
                return f"{value // size}{unit}"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, str) and value.startswith(str(Path.home())):
        return "~" + value[len(str(Path.home())):]
    return str(value)


def reference(cls: type = Config, prefix: str = "") -> list[ConfigField]:
    """Every leaf key under ``cls`` with its default and documentation, in declaration order."""
    instance = cls()
    docs = _comments(cls)
    fields: list[ConfigField] = []
    for f in dataclasses.fields(cls):
        sub = getattr(config_module, str(f.type), None)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            fields += reference(sub, f"{prefix}{f.name}.")
            continue
        key = prefix + f.name
        fields.append(ConfigField(key, format_default(key, getattr(instance, f.name)),
                                  docs.get(f.name, "")))
    return fields


def reference_markdown() -> str:
    """The reference as the README's table: | key | default | meaning |."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{f.key}` | `{f.default}` | {f.doc} |" for f in reference()]
    return "\n".join(rows)


def effective_toml(config: Config) -> str:
    """``config`` as TOML, every key present (unset ones commented), tokens redacted."""
    out: list[str] = []

    def emit(obj: Any, table: str) -> None:
        leaves = [f for f in dataclasses.fields(obj) if not dataclasses.is_dataclass(
            getattr(obj, f.name))]
        if leaves:
            out.append(f"[{table}]")
        for f in leaves:
            key, value = f"{table}.{f.name}", getattr(obj, f.name)
            if key in _SECRET_KEYS and value:
                value = {f"<token {i + 1} redacted>": v for i, v in enumerate(value.values())}
            out.append(f"# {f.name} = (unset)" if value is None
                       else f"{f.name} = {_toml_value(value)}")
        for f in dataclasses.fields(obj):
            sub = getattr(obj, f.name)
            if dataclasses.is_dataclass(sub):
                if out and out[-1]:
                    out.append("")
                emit(sub, f"{table}.{f.name}" if table else f.name)

    emit(config, "")
    return "\n".join(out).strip() + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                                for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(f"no TOML form for {value!r}")
