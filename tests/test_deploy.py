"""deploy/: the example configs pass `config check`; the systemd unit is hardened."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kvstore.config import read_config
from kvstore.server.app import server_problems

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _configmap_toml(tmp_path: Path) -> Path:
    text = (DEPLOY / "k8s" / "kvstore-config.yaml").read_text()
    body = text.split("kvstore.toml: |\n", 1)[1]
    path = tmp_path / "configmap.toml"
    path.write_text("\n".join(line[4:] for line in body.splitlines()))
    return path


@pytest.mark.parametrize("name", ["kvstore.toml", "configmap"])
def test_example_configs_have_no_problems(tmp_path, name):
    path = _configmap_toml(tmp_path) if name == "configmap" else DEPLOY / name
    config, problems, _ = read_config(path)
    assert problems == []
    assert server_problems(config.server) == []


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            found.setdefault(m.group(1), []).append(m.group(2))
    return found


def test_systemd_unit_is_hardened():
    unit = _directives((DEPLOY / "kvstore.service").read_text())
    expected = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                "PrivateTmp": "yes", "UMask": "0077", "CapabilityBoundingSet": "",
                "RestrictSUIDSGID": "yes", "User": "kvstore", "KillSignal": "SIGTERM"}
    assert {k: unit.get(k, [None])[0] for k in expected} == expected
    assert "--config /etc/kvstore/kvstore.toml" in unit["ExecStart"][0]
    assert unit["CacheDirectory"] == ["kvstore"]  # tiers.disk.path of deploy/kvstore.toml
    assert 'path = "/var/cache/kvstore"' in (DEPLOY / "kvstore.toml").read_text()
    sysusers = (DEPLOY / "kvstore.sysusers").read_text()
    assert re.search(r"^u kvstore ", sysusers, re.MULTILINE)


def test_systemd_analyze_accepts_the_unit(tmp_path):
    analyze, kvstore = shutil.which("systemd-analyze"), shutil.which("kvstore")
    if analyze is None or kvstore is None:  # machines without systemd: the test above stands
        return
    unit = tmp_path / "kvstore.service"
    unit.write_text((DEPLOY / "kvstore.service").read_text().replace(
        "/usr/local/bin/kvstore", kvstore))
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run([analyze, "security", "--offline=yes", "--threshold=25",
                               str(unit)], capture_output=True, text=True)
    assert security.returncode == 0, security.stdout[-2000:]
    exposure = re.search(r"exposure level for kvstore.service: ([\d.]+)", security.stdout)
    assert exposure is not None and float(exposure.group(1)) <= 2.5
