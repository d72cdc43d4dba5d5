"""Structured logging at the edge: one JSON object per line on stderr.

Modules log through `logging.getLogger(__name__)` with %-style arguments and put
fields such as `request_id` and `stage` in `extra=`; this formatter turns them into keys.
Prompts, outputs and secrets are never passed to a logger unless STREAM_LOG_CONTENT is set.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

__all__ = ["JsonFormatter", "configure"]

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "INFO", *, json: bool = True) -> None:
    """Send log records to stderr, as JSON lines (workers) or short text (commands)."""
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka reports every reconnect attempt at ERROR; our own code says what matters.
    logging.getLogger("aiokafka").setLevel("DEBUG" if level == "DEBUG" else "CRITICAL")
    # httpx logs every request at INFO: a thousand lines a second at full speed.
    logging.getLogger("httpx").setLevel("DEBUG" if level == "DEBUG" else "WARNING")
