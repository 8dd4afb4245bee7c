"""A real kvstore daemon process for the engine connector tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from signal import SIGCONT, SIGKILL
from typing import Any


class DaemonProcess:
    """`python -m kvstore serve` on a fixed loopback port, so a restart keeps the address."""

    def __init__(self, tmp: Any, port: int) -> None:
        self.tmp, self.address = tmp, f"127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        from kvstore.client import fetch_stats
        from kvstore.errors import KVStoreError

        config = self.tmp / "kvstore.toml"
        config.write_text("[engine]\nflush_interval_s = 0.1\n[server]\ndrain_timeout_s = 2.0\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--config", str(config), "--listen",
             self.address, "--data-dir", str(self.tmp / "data")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                fetch_stats(self.address, timeout_s=2)
                return
            except KVStoreError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("kvstore daemon did not start") from None
                time.sleep(0.1)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, sig: int = SIGKILL) -> None:
        self.signal(SIGCONT)
        self.signal(sig)
        self.proc.wait(timeout=60)
