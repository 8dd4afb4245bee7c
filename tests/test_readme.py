"""The README's configuration reference names every field of the config tree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import kvstore.config as config_module
from kvstore.config import Config

README = Path(__file__).resolve().parent.parent / "README.md"


def _dotted_fields(cls: type, prefix: str = "") -> list[str]:
    names: list[str] = []
    for f in dataclasses.fields(cls):
        sub = getattr(config_module, str(f.type), None)
        if sub is not None and dataclasses.is_dataclass(sub):
            names += _dotted_fields(sub, f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


def test_readme_config_table_lists_every_field() -> None:
    text = README.read_text()
    missing = [name for name in _dotted_fields(Config)
               if f"`{name}`" not in text and f"`{name}`," not in text]
    # TLS files share one row: `server.tls_cert_file`, `server.tls_key_file`.
    assert missing == [], f"README configuration table lacks {missing}"
