"""API keys: loaded from an environment variable or a file that config names, never shown.

Config never holds a key value, only where to find it (``api_key_env`` / ``api_key_file``).
``load_api_key`` reads it into a ``Secret``, whose ``repr``/``str`` name the *source* and
never the value; only ``reveal()`` gives the value, and only the code building an auth
header calls it.

More guards, because a key can leak through paths we do not write ourselves:

- every loaded value is registered with ``tokenhive.logs``, whose ``JsonFormatter`` (the
  formatter of every tokenhive process) replaces it with ``***`` anywhere in a record: the
  message, extra fields at any depth, tracebacks.
- ``scrub(text)`` replaces every loaded key value in a string with ``***``; error messages
  built from upstream bodies go through it (a 401 body may echo the key back).
- ``install_log_guard()`` puts a filter on the loggers of the HTTP stack, for whatever
  handler and formatter those records reach. hpack logs every header it encodes at DEBUG
  ("Adding b'x-api-key'=b'sk-…'"), and only ``authorization`` is marked sensitive there, so
  ``x-api-key`` / ``api-key`` would reach a DEBUG log verbatim. The filter drops hpack's
  DEBUG records (byte-level noise, and the huffman-coded header block they print is a
  reversible encoding of the key), scrubs the message and traceback of every other record,
  and cuts every URL in them to ``scheme://host/path`` (httpx logs each request's URL at
  INFO, and a signed download URL carries its signature in the query).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tokenhive.logs import REDACTED, redact_urls, register_secret, scrub
from tokenhive.schemas.errors import ModelLoadFailed

__all__ = ["REDACTED", "Secret", "install_log_guard", "load_api_key", "scrub"]

# Loggers of the HTTP stack that may see request headers.
_HTTP_LOGGERS = ("hpack.hpack", "hpack.table", "httpx", "httpcore.connection", "httpcore.http11",
                 "httpcore.http2", "httpcore.proxy", "httpcore.socks")


class Secret:
    """A secret string whose repr/str never show the value."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source  # e.g. "env:OPENAI_API_KEY" or "file:/run/keys/openai"
        register_secret(value)  # scrub() and every log record hide it from now on

    def reveal(self) -> str:
        """The value, for building an auth header. Never log or format the result."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret(source={self.source!r}, value={REDACTED!r})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> str:
        # Pickling would copy the value into a byte stream someone might log or store.
        raise TypeError("a Secret cannot be pickled")


def load_api_key(env: str | None, file: str | None, *, required: bool) -> Secret | None:
    """The key from ``env`` if that variable is set, else from ``file``.

    Returns None when neither is configured and the key is optional (local servers need
    none). Raises ModelLoadFailed naming the *source* (never a value) when a configured
    source is missing or empty, or when a required key has no source.
    """
    problems: list[str] = []
    if env:
        value = os.environ.get(env, "").strip()
        if value:
            return Secret(value, f"env:{env}")
        problems.append(f"environment variable {env} is not set or empty")
    if file:
        path = Path(file).expanduser()
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(f"cannot read api key file {str(path)!r}: {exc.strerror or exc}")
        else:
            if value:
                return Secret(value, f"file:{path}")
            problems.append(f"api key file {str(path)!r} is empty")
    if problems:
        raise ModelLoadFailed("api key not loaded: " + "; ".join(problems))
    if required:
        raise ModelLoadFailed("an api key is required: set api_key_env or api_key_file")
    return None


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("hpack") and record.levelno <= logging.DEBUG:
            return False
        message = record.getMessage()
        clean = redact_urls(scrub(message))
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set: format the traceback once, cleaned.
            record.exc_text = redact_urls(scrub(_TEXT.formatException(record.exc_info)))
        return True


_TEXT = logging.Formatter()
_GUARD = _RedactingFilter()


def install_log_guard() -> None:
    """Attach the redacting filter to the HTTP stack's loggers (idempotent).

    A logger's filters see only records logged on that logger itself, so every module
    logger is named (the list is checked against the installed libraries' getLogger calls).
    """
    for name in _HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if _GUARD not in logger.filters:
            logger.addFilter(_GUARD)
