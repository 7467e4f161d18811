"""Logs on stderr, shared by every tokenhive process: one JSON object per line, or one text
line per record for a person at a terminal (``configure_logging``'s ``fmt``; ``auto`` picks
text when stderr is a terminal, and ``TOKENHIVE_LOG_FORMAT`` sets it for child processes).

Use ``log = logging.getLogger("tokenhive.<part>")`` and pass fields through ``extra``::

    log.info("worker registered", extra={"worker": wid, "model": model})

Secrets never go into ``extra``; backends log key *sources* (env var names), never values.
Because a value can still reach a record by a path we do not write ourselves (an upstream
echoing a key in an error body, an exception message, a field holding a whole object), every
value registered with ``register_secret`` (``workers.backends.http.secrets.Secret`` does, for
every key it loads) is replaced by ``***`` in everything ``JsonFormatter`` writes: the
message, every extra field (strings and bytes, at any depth inside dicts, lists and structs,
and the text of objects it can only ``repr``), the traceback and the stack.

URLs can carry credentials too (signed download URLs: ``X-Amz-Signature=``, ``sig=``,
``token=``; ``user:password@``): ``redact_url`` keeps ``scheme://host[:port]/path`` only, and
``redact_urls`` does that to every http(s) URL inside a text. Code that logs or raises with a
URL it was given passes it through them; ``JsonFormatter`` does it to tracebacks, which quote
messages of libraries we do not control.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import msgspec

REDACTED = "***"
LOG_FORMAT_ENV = "TOKENHIVE_LOG_FORMAT"
LOG_FORMATS = ("auto", "text", "json")

_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_encode = msgspec.json.Encoder(enc_hook=repr).encode

# Every secret value loaded in this process, longest first (so a key that contains another
# is replaced whole). Replaced as a tuple, so readers need no lock.
_SECRETS: tuple[str, ...] = ()
_SECRETS_LOCK = threading.Lock()

_URL = re.compile(r"""(?i)\bhttps?://[^\s"'<>`]+""")


def register_secret(value: str) -> None:
    """From now on, ``scrub`` and ``JsonFormatter`` replace ``value`` with ``***``."""
    global _SECRETS
    if not value:
        return
    with _SECRETS_LOCK:
        if value not in _SECRETS:
            _SECRETS = tuple(sorted({*_SECRETS, value}, key=len, reverse=True))


def has_secrets() -> bool:
    return bool(_SECRETS)


def scrub(text: str) -> str:
    """``text`` with every registered secret value replaced by ``***``."""
    for value in _SECRETS:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def _scrub_bytes(data: bytes) -> bytes:
    for value in _SECRETS:
        raw = value.encode()
        if raw in data:
            data = data.replace(raw, REDACTED.encode())
    return data


def redact_url(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``: no user/password, query or fragment."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "<unparsable url>"
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_urls(text: str) -> str:
    """``text`` with every http(s) URL in it passed through ``redact_url``."""
    return _URL.sub(_redact_match, text)


def _redact_match(match: re.Match[str]) -> str:
    found = match[0]
    url = found.rstrip(".,;:!?)]}")  # sentence punctuation after a URL is not part of it
    return redact_url(url) + found[len(url):]


def _scrubbed(value: object) -> object:
    """``value`` (builtins only, from msgspec.to_builtins) with secrets replaced."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, bytes | bytearray):
        return _scrub_bytes(bytes(value))
    if isinstance(value, dict):
        return {_scrubbed(k): _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v) for v in value]
    return value


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
        # Tracebacks quote exception messages we did not write (an HTTP library's error may
        # carry the signed URL it was redirected to): their URLs are cut too.
        if record.exc_text:  # a filter or an earlier formatter already formatted it
            out["exc"] = redact_urls(record.exc_text)
        elif record.exc_info:
            out["exc"] = redact_urls(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redact_urls(self.formatStack(record.stack_info))
        if not _SECRETS:
            return _encode(out).decode()
        # Down to str/bytes/numbers/dicts/lists first (structs become dicts, objects msgspec
        # cannot encode become their repr), so no text escapes the scrub.
        plain = msgspec.to_builtins(out, enc_hook=repr, builtin_types=(bytes, bytearray))
        return _encode(_scrubbed(plain)).decode()


class TextFormatter(logging.Formatter):
    """``16:40:02 warning tokenhive.client: broker unavailable address=tcp://... silent_s=5.0``,
    with the same scrubbing as JsonFormatter (secrets, URLs in tracebacks)."""

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [f"{clock} {record.levelname.lower()} {record.name}: {record.getMessage()}"]
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                plain = msgspec.to_builtins(value, enc_hook=repr, str_keys=True)
                text = plain if isinstance(plain, str) else _encode(plain).decode()
                parts.append(f"{key}={text}")
        text = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + redact_urls(record.exc_text)
        if record.stack_info:
            text += "\n" + redact_urls(self.formatStack(record.stack_info))
        return scrub(text) if _SECRETS else text


def resolve_format(fmt: str | None = None) -> str:
    """``text`` or ``json``: ``fmt``, else TOKENHIVE_LOG_FORMAT, else by whether stderr is a
    terminal."""
    chosen = fmt or os.environ.get(LOG_FORMAT_ENV) or "auto"
    if chosen not in LOG_FORMATS:
        chosen = "auto"
    if chosen == "auto":
        try:
            return "text" if sys.stderr.isatty() else "json"
        except (AttributeError, ValueError):  # no stderr, or a closed one
            return "json"
    return chosen


def configure_logging(level: str = "info", fmt: str | None = None) -> None:
    """Route the ``tokenhive`` loggers to stderr at ``level``, as text or JSON lines
    (``resolve_format``)."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = TextFormatter() if resolve_format(fmt) == "text" else JsonFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger("tokenhive")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def monotonic_ms() -> float:
    return time.monotonic() * 1000.0
