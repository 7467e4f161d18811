"""The ZeroMQ transport the broker, the worker and the client share.

One place for how sockets are made and how messages cross them; the wire protocol (frames,
codecs) lives in ``tokenhive.schemas.frames`` and knows nothing of sockets. Authentication,
is added here once: a ``CurveKeys`` value given to ``router`` / ``dealer`` turns CurveZMQ on
(encryption plus the peer's long-term key checked against an allow-list by ZAP, see
``CurveAuthenticator``); without one the socket stays plain (ipc, loopback).

Sockets (``router`` for the broker's two sides, ``dealer`` for workers and clients), every
option set before bind/connect because most apply only to pipes created afterwards:

* ``SNDHWM``/``RCVHWM``: the high-water marks, in messages.
* ``MAXMSGSIZE``: the largest frame a peer may send us, in bytes. A bigger one makes libzmq
  drop that peer's connection as soon as the frame's header arrives, so a garbage or hostile
  64 MiB frame is never buffered or handed to Python (the peer may reconnect; its earlier
  complete messages are unaffected).
* ``LINGER``: how long close() waits for unsent messages (0 unless said otherwise).
* ``TCP_KEEPALIVE*``: kernel keepalive on tcp links, so a half-open connection (a peer
  whose host vanished, a NAT that forgot us) is noticed even while no message is due.
  Harmless on ipc and inproc.
* ROUTER: ``ROUTER_MANDATORY`` (a send to an unknown or full peer raises EHOSTUNREACH /
  EAGAIN instead of a silent drop) and ``ROUTER_HANDOVER`` (a reconnecting peer with a set
  identity takes its old place).
* DEALER: ``ROUTING_ID``, ``IMMEDIATE`` and the reconnect interval, when asked for.

``bind`` accepts ``tcp://host:0`` for "any free port" and returns the endpoint actually
bound (``LAST_ENDPOINT``), with the real port.

I/O on the hot paths goes through the socket's C-level methods (``raw``), not pyzmq's
Python wrappers: ``send_multipart``/``recv_multipart`` spend several microseconds per
message in Python layers, IntFlag arithmetic and a RCVMORE query per frame. The helpers
take those bound methods and plain-int flags:

* ``send_pair`` / ``send_triple`` / ``send_message``: a whole multipart message or (raising
  ``zmq.Again``) none of it. A multipart message is atomic: once its first frame is
  accepted so are the rest, so ``zmq.Again`` can only come from the first frame (all are
  sent NOBLOCK all the same: a surprise must raise, never hang the event loop).
* ``recv_message`` (any socket) / ``recv_routed`` (a ROUTER, identity frame first): one
  whole multipart message without blocking, ``zmq.Again`` if none. A zero-copy frame
  carries the "more" bit itself, which is cheaper than asking RCVMORE after every frame.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

DEFAULT_HWM = 100_000  # messages
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # largest inbound frame
# Keepalive: first probe after this many idle seconds, then every INTVL s, CNT probes.
KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTVL_S = 10
KEEPALIVE_CNT = 3

# Plain-int flags: IntFlag arithmetic costs more than the C call it decorates.
NOBLOCK = int(zmq.NOBLOCK)
NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
POLLOUT = int(zmq.POLLOUT)

_Socket = TypeVar("_Socket", bound=zmq.Socket[Any])
_Backend = zmq.backend.Socket


# -- CurveZMQ -------------------------------------------------------------------------------


class CurveKeys(NamedTuple):
    """One peer's CURVE key pair (z85 bytes), plus, on a connecting peer, the public key of
    the server it expects (a connection to any other server fails its handshake)."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None


class CurveKeyError(ValueError):
    """A key file that is missing, unreadable or holds no key of the kind asked for."""


def _read_key_file(path: str | os.PathLike[str], *, need_secret: bool) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read CURVE key file {os.fspath(path)!r}: {exc}") from None
    if need_secret and not secret:
        raise CurveKeyError(f"{os.fspath(path)!r} holds no secret key (give the "
                            "*.key_secret file)")
    return public, secret or b""


def load_curve_keys(secret_file: str | os.PathLike[str],
                    server_key_file: str | os.PathLike[str] | None = None) -> CurveKeys:
    """Our key pair from ``secret_file`` (a ``*.key_secret`` as ``create_certificates``
    writes it) and, for a client or worker, the broker's public key from ``server_key_file``."""
    public, secret = _read_key_file(secret_file, need_secret=True)
    server = None
    if server_key_file is not None:
        server, _ = _read_key_file(server_key_file, need_secret=False)
    return CurveKeys(public, secret, server)


class CurveAuthenticator(ThreadAuthenticator):
    """ZAP in a background thread: one allow-list directory of public ``*.key`` files per
    ZAP domain (the broker's worker and client sockets each name theirs). A peer that
    passes gets its public key (z85) as the User-Id of every message it sends, which the
    broker reads to bind a worker id to the key that registered it (refusals are counted
    from the sockets' handshake events, ``watch_handshakes``).

    The directory is read at each handshake, so a key removed from it is refused from the
    next connection on, without a restart. ``own_public`` (the broker's own public key) is
    always allowed: whoever holds the broker's secret key file runs the broker anyway, and
    that is how ``tokenhive up`` keys its own workers and its own readiness client."""

    def __init__(self, context: zmq.Context[Any], allow: Mapping[str, str],
                 own_public: bytes | None = None) -> None:
        super().__init__(context, log=logging.getLogger("tokenhive.auth"))
        self._allow = dict(allow)
        self._own = own_public

    def start(self) -> None:
        for domain, directory in self._allow.items():
            if not Path(directory).is_dir():
                raise CurveKeyError(f"CURVE allow-list {directory!r} is not a directory")
            self.configure_curve_callback(domain, _AllowList(directory, self._own))
        super().start()


class _AllowList:
    """A ZAP credentials provider: the keys in ``directory`` now, plus ``own``."""

    def __init__(self, directory: str, own: bytes | None) -> None:
        self.directory = directory
        self.own = own

    def callback(self, domain: str, key: bytes) -> bool:
        if self.own is not None and key == self.own:
            return True
        try:
            return bool(zmq.auth.load_certificates(self.directory).get(key))
        except OSError:  # the directory went away: nobody but ourselves
            return False


def watch_handshakes(sock: zmq.Socket[Any], name: str) -> zmq.Socket[Any]:
    """A monitor (PAIR) socket for ``sock``'s failed handshakes: a peer without CURVE, with
    the wrong server key or an unknown key fails there before any message reaches us."""
    events = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    return sock.get_monitor_socket(events, f"inproc://tokenhive-handshakes-{name}-{id(sock)}")


def _curve_server(sock: zmq.Socket[Any], keys: CurveKeys, zap_domain: str) -> None:
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, zap_domain.encode())


def _curve_client(sock: zmq.Socket[Any], keys: CurveKeys) -> None:
    if keys.server_public is None:
        raise CurveKeyError("a connecting CURVE peer needs the server's public key")
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


# -- sockets -------------------------------------------------------------------------------


def _common(sock: zmq.Socket[Any], hwm: int, max_message_bytes: int, linger_ms: int) -> None:
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTVL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_CNT)


def router(
    ctx: zmq.Context[_Socket],
    *,
    hwm: int = DEFAULT_HWM,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    linger_ms: int = 0,
    curve: CurveKeys | None = None,
    zap_domain: str = "",
) -> _Socket:
    """A ROUTER that never drops silently (MANDATORY) and lets reconnecting peers in.

    With ``curve`` it is a CURVE server checked by ZAP in ``zap_domain``, and without
    ROUTER_HANDOVER: a peer-chosen identity proves nothing, so a newcomer must not take an
    existing peer's place (CURVE peers let the ROUTER pick their identity instead)."""
    sock = ctx.socket(zmq.ROUTER)
    try:
        _common(sock, hwm, max_message_bytes, linger_ms)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0 if curve else 1)
        if curve is not None:
            _curve_server(sock, curve, zap_domain)
    except BaseException:
        sock.close(linger=0)  # a leaked socket would hang Context.term()
        raise
    return sock


def dealer(
    ctx: zmq.Context[_Socket],
    *,
    hwm: int = DEFAULT_HWM,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    linger_ms: int = 0,
    routing_id: bytes | None = None,
    immediate: bool = False,
    reconnect_ivl_ms: int | None = None,
    reconnect_ivl_max_ms: int | None = None,
    curve: CurveKeys | None = None,
) -> _Socket:
    """A DEALER with the shared options, plus the identity and reconnect policy asked for;
    a CURVE client of ``curve.server_public`` when ``curve`` is given."""
    sock = ctx.socket(zmq.DEALER)
    try:
        _common(sock, hwm, max_message_bytes, linger_ms)
        if curve is not None:
            _curve_client(sock, curve)
        if routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        if immediate:
            sock.setsockopt(zmq.IMMEDIATE, 1)
        if reconnect_ivl_ms is not None:
            sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ivl_ms)
        if reconnect_ivl_max_ms is not None:
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_ivl_max_ms)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def is_loopback(address: str) -> bool:
    """Whether binding ``address`` reaches only this host: ipc/inproc, or tcp on a loopback
    host. Anything else (0.0.0.0, an interface, a public address) is reachable by others."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bindable(address: str) -> str:
    """``tcp://host:0`` means any free port; zmq spells that ``tcp://host:*``."""
    if address.startswith("tcp://") and address.endswith(":0"):
        return address[:-1] + "*"
    return address


def claim_ipc(address: str) -> None:
    """Before binding ``ipc://PATH``: libzmq unlinks whatever is at PATH, so a second broker
    would silently take a live socket from the first (and another user could squat a fixed
    name in /tmp). Refuse a path where something is listening or that is not a socket; make
    a missing parent directory private (0700) and refuse one that another user owns."""
    if not address.startswith("ipc://") or address.startswith("ipc://@"):
        return  # abstract namespace (Linux) has no file to steal
    path = address[len("ipc://"):]
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    if hasattr(os, "getuid") and os.stat(parent).st_uid not in (os.getuid(), 0):
        raise zmq.ZMQError(errno.EACCES, f"refusing to bind {address}: its directory "
                           f"{parent} belongs to another user")
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise zmq.ZMQError(errno.EEXIST, f"refusing to bind {address}: {path} exists and is "
                           "not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return  # stale: nobody listens; libzmq replaces it
    finally:
        probe.close()
    raise zmq.ZMQError(errno.EADDRINUSE, f"refusing to bind {address}: another process is "
                       "listening there (a second broker would take it over)")


def bind(sock: zmq.Socket[Any], address: str) -> str:
    """Bind ``address`` (``tcp://host:0`` picks a free port); the endpoint actually bound.
    An ipc path is claimed first (``claim_ipc``)."""
    claim_ipc(address)
    sock.bind(bindable(address))
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    return endpoint.decode()


def connect(sock: zmq.Socket[Any], address: str) -> None:
    """Connect, or close the socket and raise: a leaked socket would hang Context.term()."""
    try:
        sock.connect(address)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise


# -- raw I/O -------------------------------------------------------------------------------


class Raw(NamedTuple):
    """A socket's C-level methods, bound: ``send(data, flags)``, ``recv(flags, copy=True)``,
    ``get(option)``."""

    send: Callable[..., Any]
    recv: Callable[..., Any]
    get: Callable[[int], Any]


def raw(sock: zmq.Socket[Any]) -> Raw:
    return Raw(
        types.MethodType(_Backend.send, sock),
        types.MethodType(_Backend.recv, sock),
        types.MethodType(_Backend.get, sock),
    )


def send_pair(send: Callable[..., Any], first: bytes, second: bytes) -> None:
    """Send ``[first, second]``, or nothing (zmq.Again) if the pipe is full."""
    send(first, NOBLOCK_MORE)
    send(second, NOBLOCK)


def send_triple(send: Callable[..., Any], first: bytes, second: bytes, third: bytes) -> None:
    """Send ``[first, second, third]``, or nothing (zmq.Again) if the pipe is full."""
    send(first, NOBLOCK_MORE)
    send(second, NOBLOCK_MORE)
    send(third, NOBLOCK)


def send_message(send: Callable[..., Any], frames: Sequence[bytes]) -> None:
    """Send all ``frames`` (at least one), or none of them (zmq.Again)."""
    last = len(frames) - 1
    for i in range(last):
        send(frames[i], NOBLOCK_MORE)
    send(frames[last], NOBLOCK)


def recv_message(recv: Callable[..., Any]) -> list[bytes]:
    """One whole multipart message without blocking (zmq.Again if none is waiting)."""
    frame = recv(NOBLOCK, copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = recv(NOBLOCK, copy=False)  # the rest of the message is already here
        frames.append(frame.bytes)
    return frames


def recv_routed_user(recv: Callable[..., Any]) -> tuple[list[bytes], str | None]:
    """``recv_routed`` plus, for a control message (``[ident, version, b"", body]``: the empty
    route frame), the sender's ZAP User-Id (its CURVE public key, z85); None for other
    messages (asking costs a libzmq call per message) or on a socket without ZAP."""
    frames = [recv(NOBLOCK)]
    frame = recv(NOBLOCK, copy=False)
    frames.append(frame.bytes)
    control: Any = None
    while frame.more:
        frame = recv(NOBLOCK, copy=False)
        data = frame.bytes
        if len(frames) == 2 and not data:
            control = frame
        frames.append(data)
    user: str | None = None
    if control is not None:
        try:
            user = control.get("User-Id")
        except zmq.ZMQError:
            user = None
    return frames, user


def recv_routed_sender(recv: Callable[..., Any]) -> tuple[list[bytes], str | None]:
    """``recv_routed`` plus the message's ZAP User-Id (the sender's CURVE public key, z85),
    read from its last frame; None on a socket without ZAP. For the client socket, whose
    messages are few (requests, not chunks)."""
    frames = [recv(NOBLOCK)]
    frame = recv(NOBLOCK, copy=False)
    frames.append(frame.bytes)
    while frame.more:
        frame = recv(NOBLOCK, copy=False)
        frames.append(frame.bytes)
    try:
        user: str | None = frame.get("User-Id")
    except zmq.ZMQError:
        user = None
    return frames, user


def recv_routed(recv: Callable[..., Any]) -> list[bytes]:
    """``recv_message`` for a ROUTER: the identity frame needs no "more" check, a ROUTER
    always delivers it with at least one frame after it."""
    frames = [recv(NOBLOCK)]
    frame = recv(NOBLOCK, copy=False)
    frames.append(frame.bytes)
    while frame.more:
        frame = recv(NOBLOCK, copy=False)
        frames.append(frame.bytes)
    return frames
