"""Structured logs: one line per event, as ``key=value`` text or as a JSON object.

``configure_logging`` is called once by ``kvstore serve`` (``log.level``,
``log.format`` / ``--log-format``). Every line carries the time (UTC, ISO 8601 with
milliseconds), level, logger and message; a traceback goes into one ``exc`` field
(escaped newlines in text, a JSON string in json), so a log shipper never splits an
event over several lines. Extra fields passed with ``extra={...}`` are kept.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, Any]:
    when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    fields: dict[str, Any] = {
        "ts": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": record.levelname,
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            fields[key] = value
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    elif record.exc_text:
        fields["exc"] = record.exc_text
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record, self), default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One ``ts=... level=... logger=... msg="..."`` line per event (logfmt)."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt(v)}" for k, v in _fields(record, self).items())


def _logfmt(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\r\t\\'):
        return text
    return json.dumps(text, ensure_ascii=False)  # quotes, escapes newlines


def configure_logging(level: str = "INFO", fmt: str = "text",
                      stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (default stderr) in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
