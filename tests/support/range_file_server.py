"""A local HTTP server for one file, with Range support and an optional mid-body cut.

Used by the model download tests; it binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RangeFileServer:
    """Serves one payload at ``/<name>`` over HTTP, honouring ``Range: bytes=N-`` (206).

    FAKE BEHAVIOUR, on purpose: with ``cut_first_after=N`` the first GET sends full headers,
    then N body bytes, then drops the connection - a network cut that no healthy server
    produces on demand. With ``ranges=False`` it ignores Range and never advertises
    ``Accept-Ranges`` (a server that cannot resume). ``status`` forces an error status.
    ``range_headers`` records each GET's Range header (None when absent), in order.
    With ``stall_first_after=N`` the first GET sends N body bytes and then stalls until
    ``release`` is set (a server that hangs mid-download, so a download stays in progress).
    """

    def __init__(
        self, payload: bytes, *, name: str = "model.gguf", cut_first_after: int | None = None,
        ranges: bool = True, status: int = 200, stall_first_after: int | None = None,
    ) -> None:
        self.payload = payload
        self.name = name
        self.cut_first_after = cut_first_after
        self.ranges = ranges
        self.status = status
        self.stall_first_after = stall_first_after
        self.release = threading.Event()
        self.range_headers: list[str | None] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{self.name}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                with server._lock:
                    first = not server.range_headers
                    server.range_headers.append(self.headers.get("Range"))
                if server.status != 200:
                    self.send_error(server.status)
                    return
                body, size, start = server.payload, len(server.payload), 0
                rng = self.headers.get("Range")
                if server.ranges and rng and rng.startswith("bytes="):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                if server.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(size - start))
                self.end_headers()
                body = body[start:]
                if first and server.cut_first_after is not None:
                    self.wfile.write(body[: server.cut_first_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if first and server.stall_first_after is not None:
                    self.wfile.write(body[: server.stall_first_after])
                    self.wfile.flush()
                    server.release.wait(timeout=60)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler

    def __enter__(self) -> RangeFileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
