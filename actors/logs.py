"""Logging setup: one JSON object per line (`monitoring.json_logging`) or a readable line.

Context travels in `extra={...}` (task_id, worker_id, queue, peer); only names in CONTEXT_FIELDS are
copied into a line, so a payload, result or API key passed by mistake never reaches the log.
"""

from __future__ import annotations

import json
import logging
import sys
import time

CONTEXT_FIELDS = ("task_id", "worker_id", "queue", "peer", "host", "port", "data_dir", "code", "path",
                  "count", "seconds")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{f}={_plain(record.__dict__[f])}" for f in CONTEXT_FIELDS
                           if record.__dict__.get(f) is not None)
        return f"{line} [{context}]" if context else line


def _plain(value: object) -> str:
    """A context value on one line: client-chosen ids must not forge log lines with newlines."""
    text = str(value)
    return text if text.isprintable() else repr(text)


def setup_logging(level: str, json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pykka").setLevel(logging.WARNING)
