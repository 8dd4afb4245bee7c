"""A real `python -m kvstore serve` process with a given TOML config, for fault tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kvstore.client import fetch_stats
from kvstore.errors import KVStoreError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """`python -m kvstore serve` on a free loopback port, configured by ``toml``."""

    def __init__(self, tmp: Path, data_dir: Path, toml: str) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        config = tmp / f"kvstore-{self.port}.toml"
        config.write_text(toml)
        self.log_path = tmp / f"daemon-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--config", str(config),
             "--listen", self.address, "--data-dir", str(data_dir)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                fetch_stats(self.address, timeout_s=1)
                return
            except KVStoreError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop(signal.SIGKILL)
                    raise RuntimeError(f"daemon did not start: {self.log()}") from None
                time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        code = self.proc.wait(timeout=60)
        self._log.close()
        return code
