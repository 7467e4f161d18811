"""Where a command sends its requests: a running broker (``--broker``), or a local pool
started for the length of the command from ``--config`` or the pool flags."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from tokenhive import transport
from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.cli.common import add_curve_arguments, curve_from_args
from tokenhive.clients.pool.local import local_pool
from tokenhive.clients.pool.options import ConfigError, add_pool_arguments, pool_config_from_args
from tokenhive.schemas.errors import BrokerUnavailable, InvalidRequest, UnknownModel
from tokenhive.transport import CurveKeys

log = logging.getLogger("tokenhive.cli")

#: how long a command waits for a connection, then for a status reply, before saying no
#: broker answers (a refused connection says so at once)
CONNECT_TIMEOUT = 2.0
STATUS_TIMEOUT = 5.0


class NoBrokerAnswers(BrokerUnavailable):
    """Nothing answered at the address a command was given: said in one line, at once,
    instead of each request failing after its broker timeout and retries."""

    says_it_all = True  # common.report prints the message alone

    def __init__(self, address: str) -> None:
        super().__init__(f"no broker answers at {address} (is it running?)")
        self.address = address


class Target(msgspec.Struct):
    address: str
    models: list[str]  # known when we started the pool; empty for a running broker
    curve: CurveKeys | None = None  # --curve-* keys for a running broker


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", metavar="ADDR",
                        help="a running broker's client address (tcp://host:port, ipc://path); "
                             "without it a local pool is started for this command")
    add_curve_arguments(parser)
    parser.add_argument("--ready-timeout", type=float, default=180.0, metavar="S",
                        help="local pool: seconds to wait for the workers to load")
    add_pool_arguments(parser)


@asynccontextmanager
async def open_target(args: argparse.Namespace) -> AsyncIterator[Target]:
    if args.broker:
        pool_only = [f for f in ("config", "backend", "path", "workers", "slots", "gpus",
                                 "spec_json") if getattr(args, f, None) is not None]
        if pool_only or args.option:
            names = ", ".join("--" + f.replace("_", "-") for f in pool_only) or "--option"
            raise ConfigError(f"{names}: pool flags only apply without --broker")
        curve = curve_from_args(args)
        await probe_broker(args.broker, curve=curve)
        yield Target(address=args.broker, models=[], curve=curve)
        return
    config = pool_config_from_args(args)
    async with local_pool(config, log_level=args.log_level,
                          ready_timeout=args.ready_timeout) as pool:
        yield Target(address=pool.address, models=pool.models)


async def probe_broker(address: str, *, connect_timeout: float = CONNECT_TIMEOUT,
                       status_timeout: float = STATUS_TIMEOUT,
                       curve: CurveKeys | None = None) -> None:
    """NoBrokerAnswers unless a broker at ``address`` answers a status query. Nothing
    listening there (connection refused) is known at once; a connection that opens gets
    ``status_timeout`` for the reply, so a busy broker is not mistaken for none."""
    refused = await _refused(address, connect_timeout, curve)
    log.debug("broker probe", extra={"address": address, "refused": refused})
    if refused:
        raise NoBrokerAnswers(address)
    async with AsyncClient(address, broker_timeout=status_timeout * 2, curve=curve) as probe:
        try:
            await probe.status(timeout=status_timeout)
        except BrokerUnavailable:
            raise NoBrokerAnswers(address) from None


async def _refused(address: str, limit: float, curve: CurveKeys | None = None) -> bool:
    """True when connecting to ``address`` fails (ZeroMQ would retry it forever, quietly);
    False when it connects, or when neither happened within ``limit`` (a dropped SYN).
    With ``curve`` the probe handshakes with the keys, so a keyed broker does not count it
    as a refused peer."""
    context = zmq.asyncio.Context.instance()
    sock = transport.dealer(context, curve=curve)
    # keyed: wait for the handshake's end too, since closing in the middle of it would count
    # at the broker as a refused peer
    reached = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
               if curve is not None else zmq.EVENT_CONNECTED)
    monitor = sock.get_monitor_socket(reached | zmq.EVENT_CONNECT_RETRIED)
    try:
        sock.connect(address)
        async with asyncio.timeout(limit):
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event & reached:
                    return False
                if event == zmq.EVENT_CONNECT_RETRIED:
                    return True
    except TimeoutError:
        return False
    except zmq.ZMQError:  # a malformed address: the client says so, as for any command
        return False
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


async def resolve_model(client: AsyncClient, wanted: str | None, target: Target) -> str:
    """``--model``, else the local pool's first model, else the running broker's only one."""
    if wanted:
        return wanted
    if target.models:
        return target.models[0]
    status = await client.status()
    served = sorted({w.model for w in status.workers})
    if len(served) == 1:
        return served[0]
    if not served:
        raise UnknownModel(f"the broker at {target.address} has no workers yet")
    raise InvalidRequest(f"the broker serves several models ({', '.join(served)}): pass --model")
