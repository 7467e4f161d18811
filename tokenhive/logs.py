"""Structured logs: one JSON object per line on stderr, shared by every tokenhive process.

Use ``log = logging.getLogger("tokenhive.<part>")`` and pass fields through ``extra``::

    log.info("worker registered", extra={"worker": wid, "model": model})

Secrets never go into ``extra``; backends log key *sources* (env var names), never values.
"""

from __future__ import annotations

import logging
import sys
import time

import msgspec

_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_encode = msgspec.json.Encoder(enc_hook=repr).encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encode(out).decode()


def configure_logging(level: str = "info") -> None:
    """Route the ``tokenhive`` loggers to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("tokenhive")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def monotonic_ms() -> float:
    return time.monotonic() * 1000.0
