"""Helpers every CLI command shares: the loop runner, common flags, error reporting."""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import msgspec

from tokenhive.clients.loop_thread import new_event_loop
from tokenhive.logs import LOG_FORMAT_ENV, LOG_FORMATS, configure_logging
from tokenhive.schemas.errors import InvalidRequest, TokenHiveError
from tokenhive.transport import CurveKeyError, CurveKeys, load_curve_keys

LOG_LEVELS = ["debug", "info", "warning", "error"]
BROKER_ENV = "TOKENHIVE_BROKER"

EXIT_OK = 0
EXIT_FAILED = 1  # the request(s) failed; the error was printed
EXIT_USAGE = 2  # bad flags or config
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class _LogFormat(argparse.Action):
    """Also exports the choice (TOKENHIVE_LOG_FORMAT), so whatever configures logging later
    in this command, and the processes it starts (a local pool), log the same way."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        os.environ[LOG_FORMAT_ENV] = str(values)


def add_log_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None, action=_LogFormat,
                        help="logs on stderr as text or JSON lines (default auto: text on a "
                             f"terminal, JSON otherwise; env {LOG_FORMAT_ENV})")


def add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-level", default=default, choices=LOG_LEVELS,
                        help=f"logs on stderr at this level (default {default})")
    add_log_format(parser)


def configure_cli_logging(args: argparse.Namespace) -> None:
    configure_logging(args.log_level, getattr(args, "log_format", None))


def add_broker(parser: argparse.ArgumentParser, required_help: str) -> None:
    parser.add_argument("--broker", metavar="ADDR", default=os.environ.get(BROKER_ENV),
                        help=f"broker client address, e.g. tcp://127.0.0.1:5555 "
                             f"(env {BROKER_ENV}); {required_help}")


def add_curve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--curve-secret-key", metavar="FILE",
                        help="our CURVE key pair (*.key_secret) for a broker run with keys")
    parser.add_argument("--curve-server-key", metavar="FILE",
                        help="the broker's public CURVE key (*.key)")


def curve_from_args(args: argparse.Namespace) -> CurveKeys | None:
    """The key pair and broker key the flags name (files, never key material); None
    without them; InvalidRequest for half a pair or an unreadable file."""
    secret, server = getattr(args, "curve_secret_key", None), getattr(args, "curve_server_key",
                                                                       None)
    if not secret and not server:
        return None
    if not secret or not server:
        raise InvalidRequest("--curve-secret-key and --curve-server-key go together")
    try:
        return load_curve_keys(secret, server)
    except CurveKeyError as exc:
        raise InvalidRequest(str(exc)) from None


def add_client_timing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker-timeout", type=float, default=5.0, metavar="S",
                        help="fail in-flight requests after this much broker silence")


def run_async(main: Coroutine[Any, Any, int], log_level: str,
              log_format: str | None = None) -> int:
    """Run a command's coroutine on a loop we own (uvloop where available). SIGTERM cancels
    it like Ctrl-C does, so its cleanup runs (a local pool is stopped and its runtime
    directory removed) instead of the process vanishing mid-way; the exit code is 143."""
    configure_logging(log_level, log_format)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            return runner.run(_cancelled_by_sigterm(main))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


async def _cancelled_by_sigterm(main: Coroutine[Any, Any, int]) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (ValueError, RuntimeError):  # not the main thread (a test calling main()): as before
        return await main
    try:
        return await main
    except asyncio.CancelledError:
        if not terminated:
            raise
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def report(exc: BaseException, command: str) -> int:
    """Print a request's typed error on one line; the exit code for it."""
    if getattr(exc, "says_it_all", False):  # e.g. target.NoBrokerAnswers: no code to add
        print(f"tokenhive {command}: {exc}", file=sys.stderr)
    elif isinstance(exc, TokenHiveError):
        print(f"tokenhive {command}: {exc.code.value}: {exc.message}", file=sys.stderr)
    else:
        print(f"tokenhive {command}: {exc}", file=sys.stderr)
    return EXIT_FAILED


def to_plain(value: Any) -> Any:
    """Structs as objects with named fields, also the ``array_like`` ones (Usage, Timings,
    StatusReply) that msgspec would encode as arrays: JSON for people and ``jq``."""
    if isinstance(value, msgspec.Struct):
        return {name: to_plain(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(to_plain(value), ensure_ascii=False) + "\n")
