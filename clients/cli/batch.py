"""``tokenhive batch IN.jsonl -o OUT.jsonl``: run an OpenAI Batch API file through the pool.

- Output lines are appended and flushed one by one, in completion order (not input order;
  match them by ``custom_id``), so a crash loses at most the requests in flight.
- Resumable: a rerun skips every ``custom_id`` that already has a success line in OUT.
  Failed lines are retried on a rerun, and their new outcome is appended: OUT may then hold
  an old error line and a later success line for the same ``custom_id`` — the success wins.
- A line that is not valid (bad JSON, unknown url, unsupported body field, duplicate
  ``custom_id``) becomes an error line (``invalid_request``); it never stops the run.
- Model: ``--model`` overrides every line's ``body.model``. With a local pool (no
  ``--broker``), a line naming a model the pool does not serve goes to the pool's model, so
  a file written for another provider runs as is; against a broker, ``body.model`` is used.
- One run per output: a second ``tokenhive batch`` on the same OUT while one runs is refused
  (exit 2); ``OUT.lock`` beside it is the lock.
- Ctrl-C stops cleanly: requests in flight are cancelled (their lines are not written, so a
  rerun runs them), one summary line is printed, exit status 130.
- Exit status: 0 when every line has succeeded (now or before), 1 when some failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from pathlib import Path

from tqdm import tqdm

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.batch.engine import BatchEngine
from tokenhive.clients.batch.openai_format import BatchItem, custom_id_of, parse_item
from tokenhive.clients.batch.output_file import OutputFile, OutputLocked, OutputWriteError
from tokenhive.clients.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    add_log_level,
    report,
    run_async,
)
from tokenhive.clients.cli.target import Target, add_target_arguments, open_target, resolve_model
from tokenhive.clients.pool.options import ConfigError
from tokenhive.clients.retry import NO_RETRY, RetryPolicy
from tokenhive.schemas.errors import InvalidRequest, TokenHiveError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="OpenAI Batch API request lines (JSONL)")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="response lines are appended here; rerun to resume")
    parser.add_argument("--concurrency", type=int, default=16, metavar="N",
                        help="requests in flight at once (default 16)")
    parser.add_argument("--timeout", type=float, metavar="S", help="per request")
    parser.add_argument("--max-attempts", type=int, default=3, metavar="N",
                        help="per request, for retryable errors (default 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--broker-timeout", type=float, default=10.0, metavar="S",
                        help="fail in-flight requests after this much broker silence")
    add_target_arguments(parser)
    add_log_level(parser, "warning")


def run(args: argparse.Namespace) -> int:
    if args.concurrency < 1 or args.max_attempts < 1:
        print("tokenhive batch: --concurrency and --max-attempts must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    if not args.input.is_file():
        print(f"tokenhive batch: no such file: {args.input}", file=sys.stderr)
        return EXIT_USAGE
    output = OutputFile(args.output)
    try:
        output.lock()
    except OutputLocked as exc:
        print(f"tokenhive batch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run_async(_main(args, output), args.log_level)
    finally:
        output.unlock()


def read_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, decoded JSON or the InvalidRequest it raised); blank lines skipped."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except ValueError as exc:
                yield number, InvalidRequest(f"line {number}: not valid JSON: {exc}")


async def _main(args: argparse.Namespace, output: OutputFile) -> int:
    done = output.done_ids()
    todo = sum(1 for _, line in read_lines(args.input) if custom_id_of(line) not in done)
    engine: BatchEngine | None = None
    try:
        async with open_target(args) as target:
            async with AsyncClient(target.address, broker_timeout=args.broker_timeout,
                                   retry=NO_RETRY, curve=target.curve) as client:
                model_for = await _model_chooser(client, args, target)
                engine = BatchEngine(client, output, concurrency=args.concurrency,
                                     retry=RetryPolicy(max_attempts=args.max_attempts))
                await _run_batch(args, engine, output, done, todo, model_for)
    except asyncio.CancelledError:  # Ctrl-C: asyncio.Runner cancelled us; in-flight work is
        succeeded, failed = _counts(engine)  # cancelled and the output closed by now
        print(f"tokenhive batch: interrupted: {succeeded} succeeded, {failed} failed, "
              f"{todo - succeeded - failed} not run; rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"tokenhive batch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutputWriteError as exc:  # disk full, permissions: the run stops there
        print(f"tokenhive batch: {exc}; rerun to resume", file=sys.stderr)
        return EXIT_FAILED
    except TokenHiveError as exc:
        return report(exc, "batch")
    succeeded, failed = _counts(engine)
    print(f"tokenhive batch: {succeeded} succeeded, {failed} failed, "
          f"{len(done)} already done, {_cost(engine)} -> {args.output}", file=sys.stderr)
    return EXIT_OK if failed == 0 else EXIT_FAILED


def _cost(engine: BatchEngine | None) -> str:
    """This run's cost from the broker's price table, flagged when some usage was estimated."""
    if engine is None:
        return "cost $0"
    note = f" (usage estimated for {engine.estimated})" if engine.estimated else ""
    return f"cost ${engine.cost_usd:.6f}{note}"


def _counts(engine: BatchEngine | None) -> tuple[int, int]:
    return (engine.succeeded, engine.failed) if engine is not None else (0, 0)


async def _model_chooser(
    client: AsyncClient, args: argparse.Namespace, target: Target
) -> Callable[[str | None], str | None]:
    """--model wins; a local pool answers every line with its model unless the line names
    another model it serves; against a running broker, the line's model is used as is."""
    forced: str | None = args.pool_model
    local = target.models
    fallback: str | None = forced or (local[0] if local else None)
    if fallback is None:
        try:
            fallback = await resolve_model(client, None, target)
        except TokenHiveError:
            fallback = None  # lines without body.model become error lines

    def choose(body_model: str | None) -> str | None:
        if forced:
            return forced
        if local:
            return body_model if body_model in local else local[0]
        return body_model or fallback

    return choose


async def _run_batch(
    args: argparse.Namespace, engine: BatchEngine, output: OutputFile, done: set[str],
    todo: int, model_for: Callable[[str | None], str | None],
) -> None:
    disable = args.no_progress or not sys.stderr.isatty()

    async def items() -> AsyncIterator[tuple[Hashable, BatchItem]]:
        seen: set[str] = set()
        for number, line in read_lines(args.input):
            cid = custom_id_of(line)
            if cid in done:
                continue
            try:
                if isinstance(line, InvalidRequest):
                    raise line
                if cid in seen:
                    raise InvalidRequest(f"line {number}: duplicate custom_id {cid!r}")
                item = parse_item(line, model_for, args.timeout)
            except InvalidRequest as exc:
                await engine.record_invalid(number, cid, exc)
                continue
            seen.add(item.custom_id)
            yield number, item

    with output, tqdm(total=todo, file=sys.stderr, disable=disable, unit="req") as progress:
        output.progress = progress
        await engine.run(items())
