"""The README's configuration table is the reference generated from the typed config."""

from __future__ import annotations

import re
from pathlib import Path

from kvstore.config_doc import reference

README = Path(__file__).resolve().parent.parent / "README.md"
_ROW_RE = re.compile(r"^\| `([a-z_.]+)` \| `([^`]*)` \| (.+) \|$")


def _readme_rows() -> dict[str, str]:
    """key -> default column of the README's configuration table."""
    text = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        m = _ROW_RE.match(line)
        if m:
            assert m.group(1) not in rows, f"README lists {m.group(1)} twice"
            rows[m.group(1)] = m.group(2)
    return rows


def test_readme_config_table_lists_every_key_with_its_default() -> None:
    rows = _readme_rows()
    generated = {f.key: f.default for f in reference()}
    assert sorted(set(generated) - set(rows)) == [], "README configuration table lacks keys"
    assert sorted(set(rows) - set(generated)) == [], "README lists keys the config lacks"
    wrong = {k: (rows[k], d) for k, d in generated.items() if rows[k] != d}
    assert wrong == {}, f"README default differs from the code (readme, code): {wrong}"


def test_every_config_key_is_documented_in_the_code() -> None:
    assert [f.key for f in reference() if not f.doc] == []
