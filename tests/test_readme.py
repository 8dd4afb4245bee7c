"""The README stands alone and its examples run: the configuration table names every
field of the config tree, every ```python block runs as written against a real daemon,
and no README or doc points outside the repository.

Blocks run in README order in one namespace, as a reader would run them in one
session (the codec block continues the sidecar one); the only change made to a block
is the daemon address, ``127.0.0.1:50051``, replaced by the test daemon's (port 0).
A block whose first line is ``# requires: model`` loads SmolLM2 and runs in the
``model``-marked test; ``# requires: cuda`` blocks need a CUDA GPU.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.config_doc import reference
from kvstore.server.app import ServerThread
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_ADDRESS = "127.0.0.1:50051"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
_REQUIRES = re.compile(r"^# requires: (\w+)")
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


def readme_blocks() -> list[tuple[str | None, str]]:
    """(requirement or None, source) of every ```python block, in README order."""
    blocks = []
    for match in _BLOCK.finditer(README.read_text()):
        source = match.group(1)
        requires = _REQUIRES.match(source)
        blocks.append((requires.group(1) if requires else None, source))
    return blocks


def _run(source: str, address: str, scope: dict[str, Any]) -> None:
    code = compile(source.replace(README_ADDRESS, address), str(README), "exec")
    exec(code, scope)  # noqa: S102 - running the README is the point of this test


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    config = make_config(tmp_path_factory.mktemp("readme"),
                         **{"tiers.cpu.capacity_bytes": 256 << 20})
    with ServerThread(config) as server:
        yield server


def test_readme_marks_every_block_it_cannot_run_everywhere() -> None:
    blocks = readme_blocks()
    assert {req for req, _ in blocks} <= {None, "model", "cuda"}
    assert sum(req is None for req, _ in blocks) >= 2
    for req, source in blocks:  # a GPU-only call must sit in a cuda block
        assert ('device="cuda"' in source) == (req == "cuda"), source


def test_readme_python_blocks_run(daemon: ServerThread, capsys: pytest.CaptureFixture) -> None:
    scope: dict[str, Any] = {"__name__": "__readme__"}
    for requires, source in readme_blocks():
        if requires is None:
            _run(source, daemon.address, scope)
    assert "tiers" in capsys.readouterr().out  # the sidecar block prints the stats


def test_cuda_decode_without_cuda_is_a_clear_error(daemon: ServerThread) -> None:
    """What the README's cuda block does on a machine without CUDA."""
    from kvstore.errors import InvalidArgument

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the cuda block runs in test_readme_cuda_blocks_run")
    scope: dict[str, Any] = {"__name__": "__readme__"}
    for requires, source in readme_blocks():
        if requires is None:
            _run(source, daemon.address, scope)
    cuda_blocks = [source for requires, source in readme_blocks() if requires == "cuda"]
    with pytest.raises(InvalidArgument, match="torch.cuda.is_available"):
        _run(cuda_blocks[0], daemon.address, scope)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda blocks need a CUDA GPU")
def test_readme_cuda_blocks_run(daemon: ServerThread) -> None:
    scope: dict[str, Any] = {"__name__": "__readme__"}
    for requires, source in readme_blocks():
        if requires in (None, "cuda"):
            _run(source, daemon.address, scope)


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("index", [i for i, (req, _) in enumerate(readme_blocks())
                                   if req == "model"])
def test_readme_model_blocks_run(daemon: ServerThread, index: int,
                                 capsys: pytest.CaptureFixture) -> None:
    _, source = readme_blocks()[index]
    _run(source, daemon.address, {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # each prints what it computed


def _docs() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md",
            *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())]


def test_docs_never_point_outside_the_repository() -> None:
    outside = [f"{p.relative_to(ROOT)}: {line.strip()}" for p in _docs()
               for line in p.read_text().splitlines()
               if re.search(r"\.\./shared|DESIGN\.md|DESIGN §", line)]
    assert outside == []


def test_deploy_says_how_to_build_the_image_it_runs() -> None:
    deploy = ROOT / "deploy"
    assert "docker build -f deploy/Dockerfile -t kvstore:latest ." in \
        (deploy / "README.md").read_text()
    assert "dockerfile: deploy/Dockerfile" in (deploy / "docker-compose.yml").read_text()
    manifests = [p for p in sorted((deploy / "k8s").glob("*.yaml"))
                 if "image: kvstore:latest" in p.read_text()]
    assert len(manifests) == 3  # the DaemonSet, the sidecar and the vLLM pod
    for manifest in manifests:
        # :latest is pulled by default, and this image is built locally, not published.
        assert "imagePullPolicy: IfNotPresent" in manifest.read_text(), manifest.name
