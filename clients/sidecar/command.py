"""``tokenhive sidecar``: llmkit's ``local`` provider sidecar (JSON-RPC 2.0 over stdio), onto
the pool.

llmkit starts ``PYTHON_PATH SIDECAR_PATH`` with no arguments: point its ``sidecar_path`` at
the script ``tokenhive sidecar --path`` prints, and ``python_path`` at this environment's
Python. Its ``init`` names a ``model`` (a pool model name, whatever ``backend`` says) and
maybe a ``host``. The broker is ``--broker`` / ``TOKENHIVE_BROKER`` when set, else the local
pool of ``--config`` / ``TOKENHIVE_CONFIG`` or the pool flags, else init's ``host`` (a broker's
client address: ``tcp://127.0.0.1:5555`` or ``127.0.0.1:5555``), else a local pool of the
default model, started at init and stopped when the sidecar exits.

stdout carries the protocol and nothing else; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from tokenhive.clients.cli.common import (
    BROKER_ENV,
    EXIT_OK,
    EXIT_USAGE,
    add_log_level,
    configure_cli_logging,
)
from tokenhive.clients.loop_thread import new_event_loop
from tokenhive.clients.pool.options import (
    ConfigError,
    add_pool_arguments,
    pool_config_from_args,
)
from tokenhive.clients.sidecar.server import Sidecar
from tokenhive.clients.sidecar.stdio import LineReader, LineWriter, watch_hangup
from tokenhive.clients.sidecar.upstream import Upstream
from tokenhive.schemas.config import PoolConfig

CONFIG_ENV = "TOKENHIVE_CONFIG"
LOG_LEVEL_ENV = "TOKENHIVE_LOG_LEVEL"
SCRIPT = Path(__file__).with_name("llmkit_sidecar.py")
DEFAULT_MAX_LINE = 8 << 20  # a message with a long prompt fits; a runaway one does not

_POOL_DESTS = ("backend", "pool_model", "path", "workers", "slots", "gpus", "spec_json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", dest="print_path", action="store_true",
                        help="print the sidecar script's path (llmkit's sidecar_path) and exit")
    parser.add_argument("--broker", metavar="ADDR", default=os.environ.get(BROKER_ENV),
                        help=f"a running broker's client address (env {BROKER_ENV}); without "
                             "it, init's host, else a local pool")
    parser.add_argument("--ready-timeout", type=float, default=180.0, metavar="S",
                        help="local pool: seconds to wait for its workers at init")
    parser.add_argument("--broker-timeout", type=float, default=5.0, metavar="S",
                        help="fail in-flight requests after this much broker silence")
    parser.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE, metavar="N",
                        help="longest message accepted on stdin (longer ones are discarded "
                             "and answered with an error)")
    parser.add_argument("--max-in-flight", type=int, default=256, metavar="N",
                        help="requests running at once; more are refused")
    parser.add_argument("--eof-grace", type=float, default=30.0, metavar="S",
                        help="after stdin closes, seconds in-flight requests may still finish")
    add_pool_arguments(parser, path_flag="--gguf")
    add_log_level(parser, os.environ.get(LOG_LEVEL_ENV, "warning"))


def run(args: argparse.Namespace) -> int:
    if args.print_path:
        print(SCRIPT)
        return EXIT_OK
    try:
        choice = _choose_upstream(args)
    except ConfigError as exc:
        print(f"tokenhive sidecar: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.max_line_bytes < 1024 or args.max_in_flight < 1 or args.eof_grace < 0:
        print("tokenhive sidecar: --max-line-bytes >= 1024, --max-in-flight >= 1, "
              "--eof-grace >= 0", file=sys.stderr)
        return EXIT_USAGE
    configure_cli_logging(args)
    # stdout is the protocol's alone: keep a private descriptor for it, and point fd 1 at
    # stderr so nothing else (a library's print, a child's output) can write a line into it.
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_serve(args, choice, protocol_fd))


class UpstreamChoice(NamedTuple):
    broker: str | None
    pool_config: Callable[[], PoolConfig]
    operator_pool: bool


def _choose_upstream(args: argparse.Namespace) -> UpstreamChoice:
    """Where requests go (see the module doc); config problems are found now, not at init."""
    pool_flags = [d for d in _POOL_DESTS if getattr(args, d, None) is not None]
    if args.option:
        pool_flags.append("option")
    if args.config is None and not pool_flags and os.environ.get(CONFIG_ENV):
        args.config = os.environ[CONFIG_ENV]
    operator_pool = bool(args.config or pool_flags)
    if args.broker and operator_pool:
        raise ConfigError("--broker (or TOKENHIVE_BROKER) cannot be combined with a local "
                          "pool's --config or pool flags")
    config: PoolConfig | None = pool_config_from_args(args) if operator_pool else None

    def pool_config() -> PoolConfig:
        return config if config is not None else pool_config_from_args(args)

    return UpstreamChoice(args.broker or None, pool_config, operator_pool)


async def _serve(args: argparse.Namespace, choice: UpstreamChoice, protocol_fd: int) -> int:
    loop = asyncio.get_running_loop()
    out = LineWriter(protocol_fd)
    out.start()
    upstream = Upstream(broker=choice.broker, pool_config=choice.pool_config,
                        operator_pool=choice.operator_pool, log_level=args.log_level,
                        ready_timeout=args.ready_timeout, broker_timeout=args.broker_timeout)
    sidecar = Sidecar(upstream, out, version=_version(), max_in_flight=args.max_in_flight,
                      eof_grace=args.eof_grace)
    codes = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}
    for sig in codes:
        loop.add_signal_handler(sig, sidecar.request_stop, sig.name)
    watch_hangup(protocol_fd, lambda: sidecar.request_stop("stdout closed"))
    reader = LineReader(0, args.max_line_bytes)
    reader.start()
    why = await sidecar.serve(reader)
    await out.close()
    return next((code for sig, code in codes.items() if sig.name == why), EXIT_OK)


def _version() -> str:
    try:
        return importlib.metadata.version("tokenhive")
    except importlib.metadata.PackageNotFoundError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    """The script's entry point: ``tokenhive sidecar`` with these arguments."""
    parser = argparse.ArgumentParser(prog="tokenhive sidecar", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args)
