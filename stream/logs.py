"""Structured logging at the edge: one JSON object per line on stderr.

Modules log through `logging.getLogger(__name__)` with %-style arguments and put
fields such as `request_id` and `stage` in `extra=`; this formatter turns them into keys.
Prompts, outputs and secrets are never passed to a logger unless STREAM_LOG_CONTENT is set.

aiokafka is not as careful: at DEBUG it logs the key and value of every record it sends
and every request and response it exchanges, record batches and SASL PLAIN passwords
included. Its lines keep their shape here, but never that content (`_Redact`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka.protocol.struct import Struct

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


class _Redact(logging.Filter):
    """aiokafka's arguments without content: a protocol request or response (record
    batches, SASL tokens: never shown) by its name, and bytes (record keys and values) by
    their size unless content may be logged."""

    def __init__(self, *, content: bool) -> None:
        super().__init__()
        self._content = content

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("aiokafka") and record.args:
            args = record.args
            if isinstance(args, Mapping):
                record.args = {key: self._safe(value) for key, value in args.items()}
            else:
                record.args = tuple(self._safe(value) for value in args)
        return True

    def _safe(self, value: Any) -> Any:
        if isinstance(value, Struct):
            return f"<{type(value).__name__}>"
        if isinstance(value, bytes | bytearray | memoryview) and not self._content:
            return f"<{len(value)} bytes>"
        return value


def configure(level: str = "INFO", *, json: bool = True, content: bool = False) -> None:
    """Send log records to stderr, as JSON lines (workers) or short text (commands);
    record content from aiokafka only when `content` (STREAM_LOG_CONTENT) allows it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Redact(content=content))
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
