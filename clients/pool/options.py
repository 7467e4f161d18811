"""The flags that describe a pool (``up``, and ``chat``/``generate``/``batch`` without
``--broker``), and the PoolConfig they mean.

A pool comes from ``--config pool.toml`` or from flags, not both. With neither, it is one
worker of the default model (Gemma 3 270M, ``tokenhive.workers.models.default``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from tokenhive.broker.validate import config_problems
from tokenhive.cli_options import parse_option, parse_spec_json
from tokenhive.schemas.config import (
    AnyWorkerSpec,
    ConfigError,
    PoolConfig,
    load_pool_config,
)


def add_pool_arguments(parser: argparse.ArgumentParser, *, path_flag: str = "--path") -> None:
    """``path_flag`` names the GGUF file flag (``sidecar`` keeps ``--path`` for its own)."""
    group = parser.add_argument_group("pool (a config file, or flags for one worker spec)")
    group.add_argument("--config", metavar="POOL.TOML", help="pool definition (see `up`)")
    group.add_argument("--backend", help="echo | gguf | openai | anthropic | azure | binary")
    group.add_argument("--model", dest="pool_model", metavar="NAME",
                       help="the model name to serve (local pool) and to ask for")
    group.add_argument(path_flag, dest="path", help="GGUF file (implies --backend gguf)")
    group.add_argument("--workers", type=int, metavar="N", help="worker replicas (default 1)")
    group.add_argument("--slots", type=int, metavar="N", help="requests per worker at once")
    group.add_argument("--gpus", metavar="0,1", help="replica i gets CUDA_VISIBLE_DEVICES=gpus[i]")
    group.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                       help="any other field of the backend's spec (repeatable)")
    group.add_argument("--spec-json", help="a whole worker spec as JSON (tagged by \"backend\")")


#: argparse dest -> the flag, for "cannot combine" messages
_POOL_FLAGS = {
    "backend": "--backend", "pool_model": "--model", "path": "--path", "workers": "--workers",
    "slots": "--slots", "gpus": "--gpus", "spec_json": "--spec-json",
}


def pool_config_from_args(args: argparse.Namespace) -> PoolConfig:
    """--config, or the flags; ConfigError naming the problem (an unknown key included)."""
    used = [flag for dest, flag in _POOL_FLAGS.items() if getattr(args, dest, None) is not None]
    if args.option:
        used.append("--option")
    if args.config:
        if used:
            raise ConfigError(f"--config cannot be combined with {', '.join(used)}")
        return read_pool_file(Path(args.config))
    return PoolConfig(workers=[spec_from_flags(args)])


C = TypeVar("C", bound="HasWorkers")


class HasWorkers(Protocol):
    @property
    def workers(self) -> list[AnyWorkerSpec]: ...


def read_workers_file(path: Path, load: Callable[[bytes], C]) -> C:
    """A pool or node TOML file through ``load``; ConfigError naming the file and the problem
    (unreadable, a bad or unknown key, no ``[[workers]]``)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        config = load(text)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not config.workers:
        raise ConfigError(f"{path}: no [[workers]] defined")
    return config


def read_pool_file(path: Path) -> PoolConfig:
    config = read_workers_file(path, load_pool_config)
    check_pool(config)
    return config


def spec_from_flags(args: argparse.Namespace) -> AnyWorkerSpec:
    raw: dict[str, Any] = parse_spec_json(args.spec_json) if args.spec_json else {}
    if args.backend:
        raw["backend"] = args.backend
    if args.path:
        raw.setdefault("backend", "gguf")
        raw["path"] = args.path
    if "backend" not in raw:
        base = default_spec_dict()  # the embedded default model
        raw = {**base, **raw}
    raw.setdefault("model", args.pool_model or _default_name(raw))
    if args.pool_model:
        raw["model"] = args.pool_model
    for flag, key in (("workers", "count"), ("slots", "slots")):
        if getattr(args, flag) is not None:
            raw[key] = getattr(args, flag)
    if args.gpus:
        try:
            raw["gpus"] = [int(g) for g in args.gpus.split(",") if g.strip()]
        except ValueError:
            raise ConfigError(f"--gpus {args.gpus!r}: expected comma-separated integers") from None
    for item in args.option:
        key, value = parse_option(item)
        raw[key] = value
    try:
        spec = msgspec.convert(raw, type=AnyWorkerSpec)  # type: ignore[arg-type]
    except msgspec.ValidationError as exc:
        raise ConfigError(f"worker spec: {exc}") from None
    check_pool(PoolConfig(workers=[spec]))
    return spec


def check_pool(config: PoolConfig) -> None:
    # The broker would refuse these too, but only as an exit code after the pool started.
    if problems := config_problems(config.broker):
        raise ConfigError("; ".join(problems))
    for i, spec in enumerate(config.workers):
        where = f"workers[{i}] ({spec.model})"
        if spec.count < 1 or spec.slots < 1:
            raise ConfigError(f"{where}: count and slots must be >= 1")
        if any(g < 0 for g in spec.gpus):
            raise ConfigError(f"{where}: gpus must be >= 0")


def with_broker(config: PoolConfig, clients: str | None, workers: str | None) -> PoolConfig:
    broker = config.broker
    if clients or workers:
        broker = msgspec.structs.replace(
            broker, clients=clients or broker.clients, workers=workers or broker.workers
        )
    return msgspec.structs.replace(config, broker=broker)


def default_spec_dict() -> dict[str, Any]:
    try:
        from tokenhive.workers.models.default import default_spec
    except ImportError as exc:
        raise ConfigError(
            f"no model configured and the default model is unavailable ({exc}); "
            "pass --config, --path or --backend"
        ) from None
    try:
        spec = default_spec()
    except Exception as exc:  # ModelLoadFailed: the model package is missing or damaged
        raise ConfigError(f"no model configured and the default model failed: {exc}") from None
    out: dict[str, Any] = msgspec.to_builtins(spec)
    return out


def _default_name(raw: dict[str, Any]) -> str:
    if raw.get("path"):
        return Path(str(raw["path"])).stem
    return str(raw.get("backend", "model"))


