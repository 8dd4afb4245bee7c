"""A circuit breaker: stop calling a backend that keeps failing until it answers again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class CircuitBreaker:
    """Closed -> open after ``failure_threshold`` consecutive failures; one probe per ``open_s``.

    A dead Redis node costs a connect timeout per call. Once the breaker is open,
    ``allow`` refuses calls without touching the network; every ``open_s`` it lets
    exactly one call through (half-open). That call's success closes the breaker,
    its failure keeps it open for another ``open_s``.
    """

    failure_threshold: int = 2  # consecutive failures that open the breaker
    open_s: float = 1.0  # seconds an open breaker refuses calls before one probe
    clock: Callable[[], float] = time.monotonic  # injectable for tests
    _failures: int = 0  # consecutive failures since the last success
    _opened_at: float | None = None  # clock() when it opened; None while closed
    _probe_in_flight: bool = False  # a half-open probe has been let through
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def is_open(self) -> bool:
        """True while calls are being refused (half-open counts as open)."""
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether the caller may contact the backend now."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._probe_in_flight or self.clock() - self._opened_at < self.open_s:
                return False
            self._probe_in_flight = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probe_in_flight = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._probe_in_flight = False
            if self._opened_at is not None or self._failures >= self.failure_threshold:
                self._opened_at = self.clock()
