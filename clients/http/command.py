"""``tokenhive serve``: the OpenAI-compatible HTTP API onto the pool.

    tokenhive serve                                   # a local pool of the embedded model
    tokenhive serve --broker tcp://127.0.0.1:5555 --port 8000 --api-key-env TOKENHIVE_API_KEY

Endpoints: POST /v1/chat/completions, /v1/completions (both with "stream": true),
/v1/embeddings; GET /v1/models, /v1/models/{id}, /health (200 while a worker serves),
/metrics (Prometheus). The server holds no model and no state: run several against one
broker. It binds 127.0.0.1 unless --host says otherwise; with --api-key-env/--api-key-file
(repeatable; a file holds one key per line) every path but /health needs
"Authorization: Bearer <key>". Prints "tokenhive serve: listening on http://HOST:PORT" once
it accepts connections; Ctrl-C or SIGTERM stops it (and a local pool) cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.batch.service import BatchJobs, add_batch_arguments, batch_jobs
from tokenhive.clients.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_log_level, run_async
from tokenhive.clients.cli.target import add_target_arguments, open_target
from tokenhive.clients.http.app import build_app
from tokenhive.clients.http.auth import load_keys
from tokenhive.clients.http.batch_routes import batch_routes
from tokenhive.clients.http.body_limit import DEFAULT_MAX_BODY_BYTES
from tokenhive.clients.http.context import ServeContext, ServeRetry
from tokenhive.clients.pool.options import ConfigError
from tokenhive.schemas.errors import TokenHiveError

DEFAULT_PORT = 8000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--api-key-env", action="append", default=[], metavar="NAME",
                        help="require a bearer key: the one in this environment variable "
                             "(repeatable)")
    parser.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                        help="require a bearer key: one of those in this file, one per line "
                             "(repeatable)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        metavar="N", help="larger request bodies get 413 (default 8 MiB)")
    parser.add_argument("--max-connections", type=int, default=10_000, metavar="N",
                        help="concurrent connections beyond this get 503 (default 10000)")
    parser.add_argument("--request-timeout", type=float, metavar="S",
                        help="per request, queueing included; past it the caller gets 504")
    parser.add_argument("--max-attempts", type=int, default=3, metavar="N",
                        help="submissions per request when a worker fails before its first "
                             "token (default 3); overload is passed back at once")
    parser.add_argument("--broker-timeout", type=float, default=5.0, metavar="S",
                        help="fail in-flight requests after this much broker silence")
    parser.add_argument("--shutdown-grace", type=float, default=5.0, metavar="S",
                        help="on stop, wait this long for open requests to finish")
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    add_batch_arguments(parser)
    add_target_arguments(parser)
    add_log_level(parser, "warning")


def run(args: argparse.Namespace) -> int:
    problems = [f"{flag} must be > 0" for flag, value in (
        ("--max-body-bytes", args.max_body_bytes), ("--max-connections", args.max_connections),
        ("--max-attempts", args.max_attempts), ("--broker-timeout", args.broker_timeout),
        ("--request-timeout", args.request_timeout or 1),
    ) if value <= 0]
    if problems or not 0 <= args.port <= 65535:
        print(f"tokenhive serve: {'; '.join(problems) or '--port must be 0..65535'}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        keys = load_keys(args.api_key_env, args.api_key_file)
        listener = bind(args.host, args.port)
    except (ConfigError, OSError) as exc:
        print(f"tokenhive serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with listener:
        return run_async(_main(args, keys, listener), args.log_level)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything starts so a taken port fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def make_app(args: argparse.Namespace, client: AsyncClient, keys: list[bytes],
             jobs: BatchJobs | None = None) -> Starlette:
    """The application for these flags. (Extra routes and hooks plug in here.)"""
    ctx = ServeContext(client=client, request_timeout=args.request_timeout,
                       status_timeout=min(2.0, args.broker_timeout))
    return build_app(ctx, api_keys=keys, max_body_bytes=args.max_body_bytes,
                     extra_routes=batch_routes(jobs) if jobs else (),
                     body_limits=jobs.body_limits if jobs else None)


async def _main(args: argparse.Namespace, keys: list[bytes], listener: socket.socket) -> int:
    try:
        async with open_target(args) as target:
            retry = ServeRetry(max_attempts=args.max_attempts)
            async with AsyncClient(target.address, broker_timeout=args.broker_timeout,
                                   retry=retry) as client, \
                    batch_jobs(args, client, target.models) as jobs:  # Files/Batches API
                app = make_app(args, client, keys, jobs)
                config = uvicorn.Config(
                    app, loop="uvloop", http="httptools", lifespan="on", log_config=None,
                    access_log=args.access_log, limit_concurrency=args.max_connections,
                    timeout_graceful_shutdown=args.shutdown_grace,
                )
                server = Server(config, url=url_of(listener))
                await server.serve(sockets=[listener])
                return EXIT_OK if server.started else EXIT_FAILED
    except ConfigError as exc:
        print(f"tokenhive serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TokenHiveError as exc:
        print(f"tokenhive serve: {exc.code.value}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED


def url_of(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server, announcing itself once it accepts connections, and stopping on
    SIGINT/SIGTERM through the event loop (uvicorn's own handlers would re-raise the signal
    after shutdown, cutting short the local pool's orderly stop)."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"tokenhive serve: listening on {self.url}", flush=True)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self._stop)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def _stop(self) -> None:
        if self.should_exit:
            self.force_exit = True  # a second Ctrl-C: stop waiting for open requests
        self.should_exit = True
