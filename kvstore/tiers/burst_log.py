"""A log line per burst of failures: the first at WARNING, the rest counted into the next."""

from __future__ import annotations

import logging
import threading
import time


class BurstLog:
    """Rate-limits one kind of failure message of one component.

    A failing disk fails every put; one WARNING per put would bury the log (and
    cost a formatted line per chunk). The first failure of a burst is logged; the
    ones within ``quiet_s`` of the last logged line are only counted (and logged
    at DEBUG), and the next line logged says how many were left out.
    """

    def __init__(self, logger: logging.Logger, quiet_s: float = 10.0) -> None:
        self._logger = logger
        self._quiet_s = quiet_s
        self._lock = threading.Lock()
        self._last_logged: float | None = None  # time.monotonic() of the last WARNING
        self._num_unlogged = 0  # failures since then not logged at WARNING

    def warning(self, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at WARNING unless one was logged in the last ``quiet_s``.

        Returns:
            True if the line was logged at WARNING.
        """
        now = time.monotonic()
        with self._lock:
            last = self._last_logged
            if last is not None and now - last < self._quiet_s:
                self._num_unlogged += 1
                unlogged = -1
            else:
                unlogged, self._num_unlogged, self._last_logged = self._num_unlogged, 0, now
        if unlogged < 0:
            self._logger.debug(msg, *args)
            return False
        if unlogged:
            self._logger.warning(msg + " (%d similar failures not logged in the %.0f s before)",
                                 *args, unlogged, self._quiet_s)
        else:
            self._logger.warning(msg, *args)
        return True
