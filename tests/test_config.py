"""The typed config tree: TOML, overrides, units and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.config import load_config, parse_bytes
from kvstore.errors import InvalidArgument


def test_defaults_bind_loopback_with_dram_and_disk() -> None:
    config = load_config()
    assert config.server.listen == "127.0.0.1:50051"
    assert not config.server.allow_insecure_remote
    assert config.tiers.disk.enabled and config.tiers.redis.url is None


def test_toml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "kvstore.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:7000"\n[tiers.cpu]\ncapacity_bytes = "1GiB"\n'
                    '[tiers.disk]\ncapacity_bytes = 4096\n')
    config = load_config(path, {"server.listen": "127.0.0.1:0"})
    assert config.server.listen == "127.0.0.1:0"
    assert config.tiers.cpu.capacity_bytes == 1 << 30
    assert config.tiers.disk.capacity_bytes == 4096


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "k.toml"
    path.write_text('[engine]\nwrite_policy = "write-through"\n')
    monkeypatch.setenv("KVSTORE_CONFIG", str(path))
    assert load_config().engine.write_policy == "write-through"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[server]\nlisten_port = 1\n", "line 2: server.listen_port: unknown config key"),
        ("[engine]\nwrite_policy = \"sometimes\"\n", "write_policy"),
        ("[tiers.cpu]\ncapacity_bytes = \"lots\"\n", "byte size"),
        ("[server]\nallow_insecure_remote = \"yes\"\n", "allow_insecure_remote must be bool"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=match):
        load_config(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")


def test_parse_bytes_units() -> None:
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("2 GB") == 2 * 10**9
    assert parse_bytes(7) == 7
    with pytest.raises(InvalidArgument):
        parse_bytes(-1)
