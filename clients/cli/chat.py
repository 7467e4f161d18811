"""``tokenhive chat`` and ``tokenhive generate``: one request, streamed to the terminal.

``chat`` sends the prompt as a user message (with ``--system`` before it) through the
model's chat template; ``generate`` sends it as a raw completion prompt. The prompt is the
argument, or stdin when the argument is absent or ``-``.
"""

from __future__ import annotations

import argparse
import sys

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    add_log_level,
    print_json,
    report,
    run_async,
)
from tokenhive.clients.cli.target import add_target_arguments, open_target, resolve_model
from tokenhive.clients.pool.options import ConfigError
from tokenhive.clients.request_builder import RequestOptions
from tokenhive.clients.result import Result
from tokenhive.schemas.errors import TokenHiveError


def add_arguments(parser: argparse.ArgumentParser, *, chat: bool) -> None:
    parser.add_argument("prompt", nargs="?", default="-", help="the prompt; - or absent: stdin")
    if chat:
        parser.add_argument("--system", help="a system message before the prompt")
    parser.add_argument("--max-tokens", type=int, metavar="N")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", metavar="TEXT",
                        help="stop sequence (repeatable)")
    parser.add_argument("--timeout", type=float, metavar="S", help="for the whole request")
    parser.add_argument("--json", action="store_true",
                        help="print the whole result as one JSON object instead of streaming")
    parser.add_argument("--broker-timeout", type=float, default=5.0, metavar="S",
                        help="fail after this much broker silence")
    add_target_arguments(parser)
    add_log_level(parser, "warning")
    parser.set_defaults(chat=chat)


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    if not prompt.strip():
        print("tokenhive: empty prompt", file=sys.stderr)
        return EXIT_USAGE
    return run_async(_main(args, prompt), args.log_level)


async def _main(args: argparse.Namespace, prompt: str) -> int:
    command = "chat" if args.chat else "generate"
    try:
        async with open_target(args) as target:
            async with AsyncClient(target.address, broker_timeout=args.broker_timeout,
                                   curve=target.curve) as client:
                model = await resolve_model(client, args.pool_model, target)
                result = await _generate(client, args, prompt, model)
    except ConfigError as exc:
        print(f"tokenhive {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TokenHiveError as exc:
        return report(exc, command)
    if args.json:
        print_json(result)
    elif not result.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    return EXIT_OK


async def _generate(
    client: AsyncClient, args: argparse.Namespace, prompt: str, model: str
) -> Result:
    options: RequestOptions = {"model": model}
    for name in ("max_tokens", "temperature", "top_p", "seed", "stop", "timeout"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value  # type: ignore[literal-required]
    if args.chat and args.system:
        options["system"] = args.system
    if args.json:
        if args.chat:
            return await client.chat(prompt, **options)
        return await client.complete(prompt, **options)
    if args.chat:
        stream = client.stream(prompt, **options)
    else:
        stream = client.stream(prompt=prompt, **options)
    async with stream:
        async for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    return stream.result
