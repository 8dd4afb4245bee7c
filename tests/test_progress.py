"""Progress bars go to stderr on a terminal only, and never when disabled."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

SCRIPT = ("import sys, time; from kvstore._progress import track\n"
          "for _ in track(range(3), 'working hard', enabled=sys.argv[1] == 'on'):\n"
          "    time.sleep(0.3)\n"
          "print('done')\n")


def _run(stderr_is_tty: bool, enabled: str) -> tuple[str, str]:
    """(stdout, stderr) of SCRIPT, stderr on a pseudo-terminal or a pipe."""
    if not stderr_is_tty:
        out = subprocess.run([sys.executable, "-c", SCRIPT, enabled], capture_output=True,
                             text=True, timeout=60)
        return out.stdout, out.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, enabled], stdout=subprocess.PIPE,
                            stderr=slave, text=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout = proc.stdout.read()
    proc.wait(timeout=60)
    return stdout, b"".join(chunks).decode(errors="replace")


def test_progress_is_drawn_on_a_terminal_stderr():
    stdout, stderr = _run(stderr_is_tty=True, enabled="on")
    assert stdout == "done\n"  # never on stdout
    assert "working hard" in stderr


def test_progress_is_silent_when_stderr_is_not_a_terminal_or_disabled():
    assert _run(stderr_is_tty=False, enabled="on") == ("done\n", "")
    stdout, stderr = _run(stderr_is_tty=True, enabled="off")
    assert stdout == "done\n" and "working hard" not in stderr
