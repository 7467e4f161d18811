"""llmkit's side of the ``local`` provider protocol, for driving a real sidecar process.

It writes what llmkit's Go client writes, byte for byte: ``encoding/json`` output (compact,
struct field order, ``omitempty`` fields left out, ``<``, ``>``, ``&``, U+2028 and U+2029
escaped as ``\\u003c`` ...), one message per line, ids counting up from 1, ``shutdown`` with
no params, ``stream.start`` as a notification. It reads the way llmkit reads
(``bufio.Reader.ReadBytes('\\n')``), keeping every line so tests can check the exact shapes.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
              "\u2029": "\\u2029"}


def go_json(value: Any) -> bytes:
    """``json.Marshal(value)`` as Go writes it (dicts must be in the struct's field order)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in GO_ESCAPES.items():
        text = text.replace(char, escaped)
    return text.encode()


def complete_params(content: str, *, model: str = "", max_tokens: int = 0,
                    stream: bool = False, system_prompt: str = "",
                    temperature: float = 0.0, options: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """CompleteParams in Go's field order, with its ``omitempty`` rules."""
    params: dict[str, Any] = {"messages": [{"role": "user", "content": content}]}
    for key, value in (("model", model), ("system_prompt", system_prompt),
                       ("max_tokens", max_tokens), ("temperature", temperature),
                       ("stream", stream), ("options", options)):
        if value:
            params[key] = value
    return params


class LlmkitPeer:
    """A sidecar subprocess with llmkit's pipes: stdin and stdout ours, stderr to a file."""

    def __init__(self, argv: list[str], stderr_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env={**os.environ, **(env or {})},
                                     cwd=cwd)
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.raw: list[bytes] = []  # every line read, newline included
        self._next_id = 0
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            self.lines.put(line)
        self.lines.put(None)

    # -- writing, as llmkit does ----------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def request(self, method: str, params: Any = None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        message["id"] = self._next_id
        self.send_raw(go_json(message) + b"\n")
        return self._next_id

    def notify(self, method: str, params: Any) -> None:
        self.send_raw(go_json({"jsonrpc": "2.0", "method": method, "params": params}) + b"\n")

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    # -- reading --------------------------------------------------------------------------

    def read(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next message; AssertionError at EOF, TimeoutError if none comes."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message in {timeout}s; stderr:\n{self.stderr()[-2000:]}"
                               ) from None
        assert line is not None, f"sidecar closed stdout; stderr:\n{self.stderr()[-2000:]}"
        assert line.endswith(b"\n") and line.count(b"\n") == 1, line[:200]
        self.raw.append(line)
        message = json.loads(line)
        assert isinstance(message, dict) and message["jsonrpc"] == "2.0", message
        return message

    def read_until(self, done: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Messages up to and including the first for which ``done(message)`` is true."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            message = self.read(max(0.01, deadline - time.monotonic()))
            out.append(message)
            if done(message):
                return out

    def call(self, method: str, params: Any = None, timeout: float = 30.0) -> dict[str, Any]:
        """Send a request and return its response (any other message on the way is an
        error here: tests that interleave read for themselves)."""
        request_id = self.request(method, params)
        message = self.read(timeout)
        assert message.get("id") == request_id, message
        return message

    def at_eof(self, timeout: float = 30.0) -> bool:
        try:
            return self.lines.get(timeout=timeout) is None
        except queue.Empty:
            return False

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass
