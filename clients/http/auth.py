"""Optional bearer-key authentication for the HTTP API.

Keys come only from environment variables (``--api-key-env NAME``) and files
(``--api-key-file PATH``, one key per line, ``#`` comments), never from argv. Each key is
registered with the log scrubber, compared in constant time, and never echoed: a wrong key
gets the same 401 as a missing one. ``/health`` stays open (load balancers probe it); every
other path needs a key once any key is configured.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from tokenhive.clients.http.errors import AUTH, openai_error
from tokenhive.logs import register_secret
from tokenhive.schemas.config import ConfigError

OPEN_PATHS = frozenset({"/health"})


def load_keys(env_names: Sequence[str], files: Sequence[str | Path]) -> list[bytes]:
    """Every key the flags name; ConfigError naming the source (never the key) if one is
    missing or empty."""
    keys: list[str] = []
    for name in env_names:
        value = os.environ.get(name, "").strip()
        if not value:
            raise ConfigError(f"--api-key-env {name}: the environment variable is unset or empty")
        keys.append(value)
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--api-key-file {path}: cannot read it "
                              f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
        found = [line.strip() for line in text.splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ConfigError(f"--api-key-file {path}: no key in it")
        keys.extend(found)
    for key in keys:
        register_secret(key)
    return [key.encode() for key in dict.fromkeys(keys)]


def key_matches(presented: bytes, keys: Sequence[bytes]) -> bool:
    """Constant time per key, and every key is compared: timing tells nothing of which."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    return matched


class BearerAuth:
    """ASGI middleware: ``Authorization: Bearer <key>`` on every path but OPEN_PATHS."""

    def __init__(self, app: ASGIApp, keys: Sequence[bytes]) -> None:
        self.app = app
        self.keys = list(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = token.strip()
                break
        if presented and key_matches(presented, self.keys):
            await self.app(scope, receive, send)
            return
        response = openai_error(
            401, "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
            type=AUTH, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)
