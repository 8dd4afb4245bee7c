"""`kvstore config check FILE`: the effective config and every error with its key and line."""

from __future__ import annotations

import tomllib
from pathlib import Path

from kvstore.cli import main
from kvstore.config import key_lines, read_config

BAD = """\
# a daemon config with mistakes
[server]
listen = "127.0.0.1:7000"
listen_port = 7000

[engine]
write_policy = "sometimes"

[tiers.cpu]
capacity_bytes = "lots"

[tiers.disk]
fsync = "yes"

[log]
format = "xml"
"""


def test_check_reports_every_error_with_its_key_and_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    assert main(["config", "check", str(path)]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "line " in line]
    assert [e.split(": ")[1] for e in errors] == [
        "line 4", "line 7", "line 10", "line 13", "line 16"]
    assert "server.listen_port: unknown config key" in captured.err
    assert "engine.write_policy must be" in captured.err
    assert "tiers.cpu.capacity_bytes" in captured.err and "tiers.disk.fsync" in captured.err
    assert "log.format must be" in captured.err
    assert "5 error(s)" in captured.err
    effective = tomllib.loads(captured.out)  # the effective config is valid TOML
    assert effective["server"]["listen"] == "127.0.0.1:7000"
    assert effective["engine"]["write_policy"] == "write-back"  # the bad value left at default


def test_check_of_a_good_file_exits_0_and_redacts_tokens(tmp_path: Path, capsys) -> None:
    path = tmp_path / "good.toml"
    path.write_text('[server]\ntokens = { "s3cret-token" = "alice" }\n'
                    '[tenants]\nquota_bytes = { alice = "1GiB" }\nover_quota = "evict"\n')
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "s3cret-token" not in out and "alice" in out
    assert tomllib.loads(out)["tenants"]["quota_bytes"] == {"alice": 1 << 30}


def test_check_reports_a_non_loopback_bind_without_tls(tmp_path: Path, capsys) -> None:
    path = tmp_path / "remote.toml"
    path.write_text('\n[server]\nlisten = "0.0.0.0:50051"\n')
    assert main(["config", "check", str(path)]) == 1
    assert "line 3: server.listen" in capsys.readouterr().err


def test_key_lines_follow_tables_dotted_keys_and_quotes() -> None:
    text = 'a = 1\n[server]\n"listen" = "x"\n[tiers.disk]\npath.x = 2\n[[arr]]\n  k = 1\n'
    assert key_lines(text) == {"a": 1, "server": 2, "server.listen": 3, "tiers.disk": 4,
                               "tiers.disk.path.x": 5, "arr": 6, "arr.k": 7}


def test_read_config_keeps_going_after_the_first_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(BAD)
    config, problems, _ = read_config(path)
    assert len(problems) == 5 and config.server.listen == "127.0.0.1:7000"


def test_reference_command_prints_every_key(capsys) -> None:
    assert main(["config", "reference"]) == 0
    out = capsys.readouterr().out
    for key in ("server.tls_client_ca_file", "tenants.quota_bytes", "log.format"):
        assert f"`{key}`" in out
