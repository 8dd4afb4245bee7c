"""Structured logs: one line per event, text (logfmt) or JSON; `serve --log-format json`."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstore.logs import configure_logging


@pytest.fixture
def restore_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _emit(fmt: str) -> list[str]:
    stream = io.StringIO()
    configure_logging("DEBUG", fmt, stream)
    log = logging.getLogger("kvstore.test")
    log.info("put %d chunks for %s", 3, "alice", extra={"tenant": "alice"})
    try:
        raise ValueError("bad\nbytes")
    except ValueError:
        log.exception("request failed")
    return stream.getvalue().splitlines()


def test_json_format_is_one_object_per_line(restore_root_logging):
    lines = _emit("json")
    assert len(lines) == 2  # the traceback stays inside its event's line
    first, second = map(json.loads, lines)
    assert first["msg"] == "put 3 chunks for alice" and first["level"] == "INFO"
    assert first["logger"] == "kvstore.test" and first["tenant"] == "alice"
    assert first["ts"].endswith("Z")
    assert "ValueError: bad\nbytes" in second["exc"]


def test_text_format_is_one_logfmt_line_per_event(restore_root_logging):
    lines = _emit("text")
    assert len(lines) == 2
    assert 'level=INFO logger=kvstore.test msg="put 3 chunks for alice" tenant=alice' in lines[0]
    assert lines[1].startswith("ts=") and "exc=" in lines[1] and "\\n" in lines[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_with_log_format_json_writes_json_lines(tmp_path: Path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "serve", "--listen", f"127.0.0.1:{_free_port()}",
         "--data-dir", str(tmp_path / "d"), "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        lines: list[str] = []
        while not any("listening" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stderr.readline())
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=30)
    events = [json.loads(line) for line in lines + rest.splitlines() if line.strip()]
    assert any("listening" in e["msg"] for e in events)
    assert any(e["msg"] == "daemon stopped" for e in events)
    assert proc.returncode == 0
