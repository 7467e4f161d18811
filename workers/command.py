"""``python -m tokenhive.workers`` (and ``tokenhive worker``): run one worker process.

The spec comes from ``--spec-json`` (a whole spec tagged by ``"backend"``, as ``tokenhive up``
passes it) and/or ``--backend``/``--model``/... flags, with ``--option KEY=VALUE`` for any other
field of that backend's spec (the value is read as a TOML or JSON scalar, else as a plain
string). Flags override the JSON. Validation goes through ``msgspec.convert`` so an error
names the field.

Exit codes:

==  ==========================================================================
0   stopped cleanly: SIGTERM/SIGINT, in-flight work drained, Goodbye sent
1   crashed: an unexpected exception in the runtime (a bug; the log has it)
2   usage or configuration error: bad flag, unknown --option key, invalid value
3   model load failed: the backend could not start; Goodbye(model_load_failed) sent
4   rejected by the broker: it speaks another protocol version
==  ==========================================================================
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import typing
from collections.abc import Coroutine
from typing import Any

import msgspec

from tokenhive import transport
from tokenhive.cli_options import parse_option, parse_spec_json
from tokenhive.logs import configure_logging
from tokenhive.schemas.config import (
    AnyWorkerSpec,
    ConfigError,
    WorkerConfig,
)
from tokenhive.workers.backends import REGISTRY
from tokenhive.workers.runtime import ExitCode, WorkerRuntime

log = logging.getLogger("tokenhive.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", help="broker's worker endpoint, e.g. ipc:///tmp/th.sock")
    parser.add_argument("--backend", help=f"one of: {', '.join(sorted(REGISTRY))}")
    parser.add_argument("--model", help="the model name clients ask for")
    parser.add_argument("--slots", type=int, help="requests served at once")
    parser.add_argument("--id", help="worker id (default <model>-<pid>)")
    parser.add_argument("--coalesce-ms", type=float,
                        help="merge tokens produced within this window into one chunk")
    parser.add_argument("--heartbeat-interval", type=float, help="seconds between heartbeats")
    parser.add_argument("--heartbeat-liveness", type=int,
                        help="silent broker intervals before reconnecting")
    parser.add_argument("--reconnect-max", type=float, help="reconnect backoff ceiling, seconds")
    parser.add_argument("--drain-timeout", type=float,
                        help="on SIGTERM, seconds to let in-flight work finish")
    parser.add_argument("--node", help="the node it runs under, for grouping and node health "
                                       "(default: $TOKENHIVE_NODE, which `tokenhive node` sets)")
    parser.add_argument("--curve-secret-key", metavar="FILE",
                        help="our CURVE key pair (a *.key_secret file) for a keyed broker")
    parser.add_argument("--curve-server-key", metavar="FILE",
                        help="the broker's public CURVE key (a *.key file)")
    parser.add_argument("--pack-chunks", action="store_true", default=None,
                        help="send the chunks of one decode step that go to the same client "
                        "as one message (far fewer broker messages for batch clients)")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="any other spec field of the backend (repeatable)")
    parser.add_argument("--spec-json",
                        help="a whole worker spec as JSON, tagged by \"backend\"; `-` reads it "
                        "from stdin (how `tokenhive up` passes it: argv is world-readable)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])


def spec_fields(backend: str) -> list[str]:
    for cls in typing.get_args(AnyWorkerSpec):
        if cls.__struct_config__.tag == backend:
            return [f.name for f in msgspec.structs.fields(cls)]
    raise ConfigError(f"unknown backend {backend!r}; known: {', '.join(sorted(REGISTRY))}")


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    text = sys.stdin.read() if args.spec_json == "-" else args.spec_json
    spec: dict[str, Any] = parse_spec_json(text) if text else {}
    if args.backend:
        spec["backend"] = args.backend
    backend = spec.get("backend")
    if not isinstance(backend, str):
        raise ConfigError("--backend is required (or --spec-json with a \"backend\" key)")
    fields = spec_fields(backend)
    for flag in ("model", "slots", "id", "coalesce_ms"):
        value = getattr(args, flag)
        if value is not None:
            spec[flag] = value
    for item in args.option:
        key, value = parse_option(item)
        if key not in fields:
            raise ConfigError(
                f"--option {key!r}: unknown option for backend {backend!r} "
                f"(known: {', '.join(sorted(fields))})"
            )
        spec[key] = value
    if "model" not in spec:
        raise ConfigError("--model is required (or \"model\" in --spec-json)")
    return spec


def build_config(args: argparse.Namespace) -> WorkerConfig:
    """The WorkerConfig a command line describes; ConfigError / ValidationError if none."""
    raw: dict[str, Any] = {"spec": build_spec(args)}
    for flag in ("broker", "heartbeat_interval", "heartbeat_liveness", "reconnect_max",
                 "drain_timeout", "curve_secret_key", "curve_server_key", "pack_chunks",
                 "node"):
        value = getattr(args, flag)
        if value is not None:
            raw[flag] = value
    config = msgspec.convert(raw, type=WorkerConfig)
    if not re.fullmatch(r"(tcp|ipc|inproc|ws|wss)://.+", config.broker):
        raise ConfigError(f"--broker {config.broker!r}: expected tcp://HOST:PORT or ipc://PATH")
    if bool(config.curve_secret_key) != bool(config.curve_server_key):
        raise ConfigError("--curve-secret-key and --curve-server-key go together")
    if config.curve_secret_key:
        try:
            transport.load_curve_keys(config.curve_secret_key, config.curve_server_key)
        except transport.CurveKeyError as exc:
            raise ConfigError(str(exc)) from None
    problems = [
        name for name, bad in (
            ("slots", config.spec.slots < 1),
            ("heartbeat_interval", config.heartbeat_interval <= 0),
            ("heartbeat_liveness", config.heartbeat_liveness < 1),
            ("coalesce_ms", config.spec.coalesce_ms < 0),
        ) if bad
    ]
    if problems:
        raise ConfigError(f"out of range: {', '.join(problems)}")
    return config


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # e.g. Windows: the standard loop works, only slower
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(config: WorkerConfig) -> int:
    return await WorkerRuntime(config).run()


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        config = build_config(args)
    except (ConfigError, msgspec.ValidationError) as exc:
        print(f"tokenhive worker: invalid configuration: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    try:
        return _run_loop(_serve(config))
    except Exception:
        log.exception("worker crashed")
        return int(ExitCode.CRASHED)
