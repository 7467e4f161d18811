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
- Exit status: 0 when every line has succeeded (now or before), 1 when some failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_log_level,
    report,
    run_async,
)
from tokenhive.clients.cli.openai_batch import (
    BatchItem,
    custom_id_of,
    error_line,
    parse_item,
    success_line,
)
from tokenhive.clients.cli.target import Target, add_target_arguments, open_target, resolve_model
from tokenhive.clients.pool.options import ConfigError
from tokenhive.clients.retry import RetryPolicy
from tokenhive.schemas.errors import InternalError, InvalidRequest, TokenHiveError
from tokenhive.schemas.messages import Kind


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
    return run_async(_main(args), args.log_level)


def done_ids(output: Path) -> set[str]:
    """custom_ids that already have a success line in ``output``."""
    done: set[str] = set()
    if not output.exists():
        return done
    with output.open(encoding="utf-8") as f:
        for text in f:
            try:
                line = json.loads(text)
            except ValueError:
                continue  # a line cut short by a crash: its request runs again
            response = line.get("response") if isinstance(line, dict) else None
            if isinstance(response, dict) and response.get("status_code") == 200:
                if (cid := custom_id_of(line)) is not None:
                    done.add(cid)
    return done


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


class BatchRun:
    def __init__(self, args: argparse.Namespace, out: IO[str], progress: tqdm[Any]) -> None:
        self.args = args
        self.out = out
        self.progress = progress
        self.succeeded = self.failed = 0

    def write(self, line: dict[str, Any], ok: bool) -> None:
        self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.out.flush()
        if ok:
            self.succeeded += 1
        else:
            self.failed += 1
        self.progress.update(1)

    async def run_one(self, client: AsyncClient, item: BatchItem) -> None:
        try:
            result = await client.execute(item.request)
            if item.request.kind is Kind.EMBEDDING and (
                result.embeddings is None or len(result.embeddings) != len(item.request.input)
            ):
                raise InternalError(f"expected {len(item.request.input)} embeddings from "
                                    f"worker {result.worker!r}")
        except TokenHiveError as exc:
            self.write(error_line(item.custom_id, exc), ok=False)
        except Exception as exc:  # a bug must cost one line, not the batch
            self.write(error_line(item.custom_id, InternalError(repr(exc))), ok=False)
        else:
            self.write(success_line(item, result), ok=True)


async def _main(args: argparse.Namespace) -> int:
    done = done_ids(args.output)
    todo = sum(1 for _, line in read_lines(args.input) if custom_id_of(line) not in done)
    try:
        async with open_target(args) as target:
            policy = RetryPolicy(max_attempts=args.max_attempts)
            async with AsyncClient(target.address, broker_timeout=args.broker_timeout,
                                   retry=policy) as client:
                model_for = await _model_chooser(client, args, target)
                batch = await _run_batch(args, client, done, todo, model_for)
    except ConfigError as exc:
        print(f"tokenhive batch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TokenHiveError as exc:
        return report(exc, "batch")
    skipped = len(done)
    print(f"tokenhive batch: {batch.succeeded} succeeded, {batch.failed} failed, "
          f"{skipped} already done -> {args.output}", file=sys.stderr)
    return EXIT_OK if batch.failed == 0 else EXIT_FAILED


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
    args: argparse.Namespace, client: AsyncClient, done: set[str], todo: int,
    model_for: Callable[[str | None], str | None],
) -> BatchRun:
    disable = args.no_progress or not sys.stderr.isatty()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    _end_with_newline(args.output)
    with args.output.open("a", encoding="utf-8") as out, \
            tqdm(total=todo, file=sys.stderr, disable=disable, unit="req") as progress:
        batch = BatchRun(args, out, progress)
        slots = asyncio.Semaphore(args.concurrency)
        tasks: set[asyncio.Task[None]] = set()
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
                batch.write(error_line(cid, exc), ok=False)
                continue
            seen.add(item.custom_id)
            await slots.acquire()
            task = asyncio.create_task(batch.run_one(client, item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _: slots.release())
        await asyncio.gather(*tasks)
    return batch


def _end_with_newline(path: Path) -> None:
    """A previous run killed mid-write may have left a partial last line: close it off, so
    the next line appended starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, 2)
        if f.read(1) != b"\n":
            f.write(b"\n")
