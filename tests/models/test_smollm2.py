"""The SmolLM2 loader's one-time conversion: concurrent first loads must not collide."""

from pathlib import Path

import pytest

from kvstore.models.smollm2 import publish_conversion


def _conversion(folder: Path, weights: bytes) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_publish_moves_the_conversion_into_place_when_first(tmp_path: Path) -> None:
    cached = tmp_path / "model"
    publish_conversion(_conversion(tmp_path / "model.a1", b"ours"), cached)
    assert (cached / "model.safetensors").read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publish_keeps_the_finished_copy_when_another_process_won(tmp_path: Path) -> None:
    cached = _conversion(tmp_path / "model", b"theirs")
    publish_conversion(_conversion(tmp_path / "model.b2", b"ours"), cached)
    assert (cached / "model.safetensors").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publish_raises_when_the_target_is_not_a_finished_conversion(tmp_path: Path) -> None:
    cached = tmp_path / "model"
    cached.mkdir()
    (cached / "partial").write_text("")  # non-empty, no config.json
    with pytest.raises(OSError):
        publish_conversion(_conversion(tmp_path / "model.c3", b"ours"), cached)
