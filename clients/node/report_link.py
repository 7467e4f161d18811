"""The node agent's own socket to the broker's worker endpoint: NodeReports out.

A DEALER from ``tokenhive.transport`` sending ``[VERSION, b"", NodeReport]`` like a worker's
control messages. Reports are periodic, so one that cannot leave now (no connection yet, a
full pipe) is dropped: the next carries fresher facts (``IMMEDIATE`` keeps a report from
queuing for a broker that is not there). Only the last report, on the way out, waits a
little for a connection. The broker does not answer reports; whatever it does send (a
Rejected, say) is logged.

Without CURVE the socket's routing id is ``node/<id>``, apart from every worker id; with
CURVE the broker's ROUTER picks identities, and the node id travels in the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import typing
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from tokenhive import transport
from tokenhive.schemas.frames import (
    ROUTE_CONTROL,
    VERSION_FRAME,
    broker_to_worker_decoder,
    encode,
    version_of,
)
from tokenhive.schemas.messages import NodeReport, Rejected

log = logging.getLogger("tokenhive.node")

REPORT_HWM = 16  # reports queued on a live connection; older facts are worth little
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2_000


class ReportLink:
    def __init__(self, address: str, node: str,
                 curve: transport.CurveKeys | None = None) -> None:
        self.address = address
        self.ctx = zmq.asyncio.Context()
        self.sock = transport.dealer(
            self.ctx, hwm=REPORT_HWM, routing_id=None if curve else f"node/{node}".encode(),
            immediate=True, reconnect_ivl_ms=RECONNECT_IVL_MS,
            reconnect_ivl_max_ms=RECONNECT_IVL_MAX_MS, curve=curve)
        transport.connect(self.sock, address)
        self.sent = 0
        self.dropped = 0
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="node-inbox")

    def send_or_drop(self, report: NodeReport) -> bool:
        # zmq.asyncio answers a NOBLOCK send with a future that is already done: sent, or
        # failed with zmq.Again (no connection, full pipe); it raises nothing itself.
        sending = typing.cast("asyncio.Future[Any]", self.sock.send_multipart(
            _frames(report), flags=zmq.NOBLOCK))
        if not sending.done():  # not expected with NOBLOCK; let it finish on its own
            sending.add_done_callback(_retrieve)
        elif (exc := sending.exception()) is not None:
            if not isinstance(exc, zmq.Again):
                raise exc
            self.dropped += 1
            return False
        self.sent += 1
        return True

    async def send_last(self, report: NodeReport, wait_s: float) -> bool:
        """Send ``report``, waiting up to ``wait_s`` for a connection; then let it leave."""
        try:
            await asyncio.wait_for(self.sock.send_multipart(_frames(report)), wait_s)
        except TimeoutError:
            log.warning("no broker connection for the node's last report",
                        extra={"broker": self.address})
            return False
        self.sent += 1
        return True

    async def close(self, linger_ms: int = 1000) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self.sock.close(linger=linger_ms)  # the last report still leaves
        self.ctx.term()

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) != 2 or version_of(frames[0]) is None:
                log.warning("unexpected message from the broker", extra={"frames": len(frames)})
                continue
            try:
                msg = broker_to_worker_decoder.decode(frames[1])
            except msgspec.DecodeError as exc:
                log.warning("undecodable message from the broker", extra={"error": str(exc)})
                continue
            if isinstance(msg, Rejected):
                log.error("the broker refused the node's report: %s", msg.message,
                          extra={"code": msg.code.value})
            else:
                log.debug("broker message ignored by the node", extra={
                    "type": type(msg).__name__})


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("a node report was not sent", extra={"error": str(future.exception())})


def _frames(report: NodeReport) -> list[bytes]:
    return [VERSION_FRAME, ROUTE_CONTROL, encode(report)]
