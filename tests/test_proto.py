"""The committed generated code matches proto/kvstore/v1/kvstore.proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_proto_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    for name in generate.FILES:
        committed = (ROOT / "kvstore" / "_proto" / name).read_text()
        assert (tmp_path / name).read_text() == committed, (
            f"kvstore/_proto/{name} is stale: run `python proto/generate.py`"
        )


def test_every_proto_field_is_commented() -> None:
    lines = (ROOT / "proto" / "kvstore" / "v1" / "kvstore.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(
            ("//", "syntax", "package", "option", "reserved"))
        if is_field and "//" not in line:
            # A comment on the line(s) right above counts too.
            assert lines[i - 1].strip().startswith("//"), f"uncommented field: {stripped}"
