"""Progress bars for long jobs: on stderr, and only when stderr is a terminal.

A job that runs for tens of seconds (``kvstore calibrate``, sparse ``generate``, a
RAG build over many passages, a benchmark loop) shows how far it is; piped or
redirected output, and callers that pass ``enabled=False`` (``--quiet``), get
nothing. rich is a core dependency already (the stats table), so no new one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def is_shown(enabled: bool = True) -> bool:
    """Whether a bar would be drawn: enabled, and stderr is a terminal."""
    return enabled and sys.stderr.isatty()


class Progress:
    """A bar of ``total`` steps advanced by hand; a no-op when not shown.

    >>> with Progress("calibrating", total=17) as bar:
    ...     bar.advance()
    """

    def __init__(self, description: str, total: int, *, enabled: bool = True) -> None:
        self._description = description
        self._total = total
        self._bar: Any = None  # rich.progress.Progress while shown
        self._task: Any = None
        self._shown = is_shown(enabled)

    def __enter__(self) -> Progress:
        if self._shown:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True, redirect_stdout=False)
            self._bar.start()
            self._task = self._bar.add_task(self._description, total=self._total)
        return self

    def advance(self, steps: int = 1, description: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=steps,
                             **({"description": description} if description else {}))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def track(items: Iterable[T], description: str, *, total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """Yield ``items`` while a bar counts them (``total`` defaults to ``len(items)``)."""
    if not is_shown(enabled):
        yield from items
        return
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    with Progress(description, total) as bar:
        for item in items:
            yield item
            bar.advance()
