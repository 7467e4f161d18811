"""A FAKE HTTP/1.1 server for the error paths real servers will not produce on demand.

What it fakes: whatever a test scripts, byte for byte. It exists for 429 with Retry-After,
500 with a body, a stream cut mid-way, a malformed SSE line, a server that never answers, a
client that hangs up mid-stream, and for the Anthropic and Azure wire formats (no real
Anthropic or Azure endpoint is reachable from tests). Everything that a real server can do
is tested against a real server (llama-cpp-python, llama-server) instead.

It is a real server on a real socket (127.0.0.1, port 0, one thread per connection), so the
adapters under test go through their whole httpx stack. It records every request (method,
path, query, headers, body) for assertions on the wire format.

    with FakeHTTPServer() as fake:
        fake.script("/v1/chat/completions", Reply(429, headers={"retry-after": "2"}))
        ... base_url=fake.url ...
        assert fake.requests[0].headers["authorization"] == "Bearer ..."
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Reply:
    """One scripted response.

    ``parts`` are written (and flushed) one after another. With ``chunked`` they go out as
    HTTP chunks; otherwise a stream has no length and ends when the server closes. Then:
    ``cut`` drops the connection without finishing the body (chunked: no final chunk), so
    the client sees a broken response; ``hang`` keeps the connection open and silent until
    the server stops; ``drip`` keeps writing SSE comments until the client hangs up, then
    sets ``FakeHTTPServer.client_gone``. ``drop`` closes the connection without answering
    at all, as a server does with a keep-alive connection it has just timed out.
    """

    status: int = 200
    parts: list[bytes] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    cut: bool = False
    hang: bool = False
    drip: bool = False
    drop: bool = False


def sse(*events: Any, done: bool = False, named: bool = False) -> list[bytes]:
    """SSE parts: each event is a JSON-able object (``data: {json}``), a ``(name, obj)``
    pair when ``named`` (``event: name`` + data), or raw bytes written as they are."""
    out: list[bytes] = []
    for ev in events:
        if isinstance(ev, bytes):
            out.append(ev)
        elif named:
            name, obj = ev
            out.append(f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode())
        else:
            out.append(f"data: {json.dumps(ev)}\n\n".encode())
    if done:
        out.append(b"data: [DONE]\n\n")
    return out


def json_reply(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, [json.dumps(obj).encode()],
                 {"content-type": "application/json", **(headers or {})})


def sse_reply(parts: list[bytes], **kw: Any) -> Reply:
    headers = {"content-type": "text/event-stream", **kw.pop("headers", {})}
    return Reply(200, parts, headers, **kw)


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Script = Reply | Callable[[Recorded], Reply]


class FakeHTTPServer:
    """See the module docstring. Unscripted paths answer 404."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.client_gone = threading.Event()
        self._stop = threading.Event()
        self._scripts: dict[str, list[Script]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        # A short poll interval makes shutdown() return quickly (it waits for one poll).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def script(self, path: str, *replies: Script) -> None:
        """Answer ``path`` with these replies in turn; the last one repeats."""
        with self._lock:
            self._scripts[path] = list(replies)

    def next_reply(self, rec: Recorded) -> Reply:
        with self._lock:
            self.requests.append(rec)
            queue = self._scripts.get(rec.path)
            if not queue:
                return json_reply({"error": {"message": f"no script for {rec.path}"}}, 404)
            script = queue.pop(0) if len(queue) > 1 else queue[0]
        return script(rec) if callable(script) else script

    def __enter__(self) -> FakeHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # releases hanging / dripping handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def serve(self, handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        if reply.drop:
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
            return
        handler.send_response(reply.status)
        streaming = reply.chunked or reply.cut or reply.hang or reply.drip or len(reply.parts) != 1
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        if reply.chunked:
            handler.send_header("transfer-encoding", "chunked")
        elif streaming:
            handler.send_header("connection", "close")
            handler.close_connection = True
        else:
            handler.send_header("content-length", str(len(reply.parts[0])))
        handler.end_headers()
        out = handler.wfile
        try:
            for part in reply.parts:
                out.write(_framed(part, reply.chunked))
                out.flush()
            if reply.drip:
                while not self._stop.wait(0.01):
                    out.write(_framed(b": ping\n\n", reply.chunked))
                    out.flush()
            if reply.hang:
                self._stop.wait()
            if reply.cut:
                handler.connection.shutdown(socket.SHUT_RDWR)
                handler.close_connection = True
                return
            if reply.chunked:
                out.write(b"0\r\n\r\n")
                out.flush()
        except OSError:  # the client hung up
            self.client_gone.set()
            handler.close_connection = True


def _framed(part: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(part), part) if chunked else part


def _handler_for(fake: FakeHTTPServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            rec = Recorded(self.command, parts.path, parse_qs(parts.query),
                           {k.lower(): v for k, v in self.headers.items()}, body)
            fake.serve(self, fake.next_reply(rec))

        do_GET = do_POST

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    return Handler
