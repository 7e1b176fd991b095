"""Log output of the `edgetune` command: readable lines by default, JSON lines for machines.

    >>> setup_logging("INFO", "json")
    >>> logging.getLogger("edgetune.train").info("step %d", 3)
    {"time": "2025-01-01T12:00:00.123+00:00", "level": "INFO", "logger": "edgetune.train", "message": "step 3"}

Every process started with the CLI (`edgetune coordinator`, `edgetune node`,
`edgetune finetune`, ...) calls setup_logging once, from `--log-level` and
`--log-format`.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import TextIO

from edgetune.runtime.errors import ConfigError

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "setup_logging"]

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (ISO 8601, UTC), level, logger, message,
    and `exception` (the formatted traceback) / `stack` when the record carries them."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes newlines (tracebacks) and non-ASCII, so a record stays one line
        return json.dumps(entry, default=str)


class _EdgetuneHandler(logging.StreamHandler):
    """The handler setup_logging installs; marked so a second call replaces it instead of doubling lines."""


def setup_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Send log records at `level` and above to `stream` (default: stderr) as `fmt` ('text' or 'json').

    Configures the root logger, so libraries' records come out in the same format.
    Handlers installed by others (e.g. pytest's capture) are left in place.
    """
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    if level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    handler = _EdgetuneHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _EdgetuneHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
