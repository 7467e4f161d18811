"""What the core sends through. The socket loop implements it; unit tests record it."""

from __future__ import annotations

from typing import Protocol

# Results of a send. Anything but SENT is handled by the core, never ignored.
SENT = 0
GONE = 1  # no such peer any more (EHOSTUNREACH under ROUTER_MANDATORY)
FULL = 2  # the peer is not reading: its pipe (and, for clients, the broker's buffer) is full


class Sink(Protocol):
    def to_client(self, ident: bytes, body: bytes) -> int:
        """Send ``[ident, VERSION, body]`` on the client socket; never blocks.

        Slow clients are buffered by the implementation. It returns FULL once, when a
        client's buffer first overflows; later sends to that client are still buffered
        (the core sends it only final answers after that) and return SENT.
        """
        ...

    def to_worker(self, ident: bytes, body: bytes) -> int:
        """Send ``[ident, VERSION, body]`` on the worker socket; never blocks."""
        ...
