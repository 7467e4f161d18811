"""A tiny HTTP server for ``GET /metrics``, inside the asyncio loop of the process it reports
on (the broker, a node agent).

It runs on the loop that runs the broker, so rendering (``render``, which reads the broker
state) happens between two of the broker's own callbacks and never races with them. It
speaks just enough HTTP/1.1 for a Prometheus scraper, one request per connection:

* ``GET`` or ``HEAD /metrics`` (any query string): 200, Prometheus text;
* another path: 404; another method: 405 (with ``Allow``); a malformed request line: 400;
* a request head over ``HEAD_LIMIT`` bytes: 431; none complete within ``READ_TIMEOUT``: the
  connection is closed; past ``MAX_CONNECTIONS`` open at once, new ones are closed at once.

The address is ``HOST:PORT`` (``[v6addr]:PORT``; ``PORT`` or ``:PORT`` alone bind loopback);
port 0 picks a free one, and ``start`` returns the bound address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger("tokenhive.broker")

HEAD_LIMIT = 8192  # bytes of request line + headers
READ_TIMEOUT = 5.0  # seconds to receive the whole head
WRITE_TIMEOUT = 10.0  # seconds for the client to take the answer
MAX_CONNECTIONS = 16
LOOPBACK = "127.0.0.1"

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ValueError saying what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # ValueError if not one
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"metrics must be HOST:PORT, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port must be 0..65535, got {port}")
    if any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"metrics host {host!r} is not a host name or address")
    return host or LOOPBACK, port


def metrics_problems(text: str) -> list[str]:
    """For config validation: [] when ``text`` is empty (metrics off) or a usable address."""
    if not text:
        return []
    try:
        parse_address(text)
    except ValueError as exc:
        return [str(exc)]
    return []


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsServer:
    def __init__(self, render: Callable[[], bytes]) -> None:
        self.render = render
        self.open = 0  # connections being served
        self._server: asyncio.Server | None = None

    async def start(self, address: str) -> str:
        """Listen on ``address``; the bound ``HOST:PORT`` (the real port for 0). OSError if
        the address cannot be bound."""
        host, port = parse_address(address)
        self._server = await asyncio.start_server(self._serve, host, port, limit=HEAD_LIMIT)
        bound = self._server.sockets[0].getsockname()
        return format_address(bound[0], bound[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_CONNECTIONS:
            writer.close()
            return
        self.open += 1
        try:
            answer = await self._answer(reader)
            if answer is not None:
                writer.write(answer)
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (OSError, TimeoutError):
            pass  # the scraper went away or stalled: nothing to answer
        finally:
            self.open -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes | None:
        """The response to send, or None to close without one (timeout, early EOF)."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            return _response(431, b"request head over %d bytes\n" % HEAD_LIMIT)
        except (asyncio.IncompleteReadError, TimeoutError):
            return None
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(400, b"malformed request line\n")
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET and HEAD\n", allow=True)
        if target.split(b"?", 1)[0] != b"/metrics":
            return _response(404, b"metrics are at /metrics\n")
        try:
            body = self.render()
        except Exception:  # a bug in a collector must not take the broker down
            log.exception("metrics rendering failed")
            return _response(500, b"metrics rendering failed\n")
        return _response(200, body, content_type=CONTENT_TYPE_LATEST, head_only=method == b"HEAD")


def _response(status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
              allow: bool = False, head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close"]
    if allow:
        lines.append("Allow: GET, HEAD")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head if head_only else head + body
