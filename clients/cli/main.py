"""The ``tokenhive`` command: one subcommand per module, imported only when it runs.

    tokenhive up        a broker and workers from a pool file or flags, until Ctrl-C
    tokenhive broker    just a broker            (tokenhive.broker.command)
    tokenhive worker    just a worker            (tokenhive.workers.command)
    tokenhive node      a machine's GPU workers, joined to a broker (tokenhive.clients.node)
    tokenhive chat      one chat request, streamed to the terminal
    tokenhive generate  one raw completion, streamed to the terminal
    tokenhive status    the pool as the broker sees it, by node
    tokenhive drain     send no new work to a node (undrain: resume)
    tokenhive batch     an OpenAI Batch API file through the pool (resumable)
    tokenhive serve     the OpenAI-compatible HTTP API (and Files/Batches) onto the pool
    tokenhive sidecar   llmkit's stdio JSON-RPC sidecar onto the pool

``chat``, ``generate``, ``batch``, ``serve`` and ``sidecar`` use a running broker with
``--broker ADDR``; without it they start a local pool for the length of the command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

#: subcommand -> (module, one-line help). Modules export add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("tokenhive.clients.cli.up", "run a broker and its workers (a whole pool)"),
    "broker": ("tokenhive.broker.command", "run a broker"),
    "worker": ("tokenhive.workers.command", "run one worker"),
    "node": ("tokenhive.clients.node.command",
             "run this machine's workers (one per GPU) joined to a broker"),
    "chat": ("tokenhive.clients.cli.chat", "send a chat request; stream the answer"),
    "generate": ("tokenhive.clients.cli.chat", "send a raw completion; stream the answer"),
    "status": ("tokenhive.clients.cli.status", "show nodes, workers, queues and counters"),
    "drain": ("tokenhive.clients.cli.drain", "send no new work to a node"),
    "undrain": ("tokenhive.clients.cli.drain", "let a drained node take work again"),
    "batch": ("tokenhive.clients.cli.batch", "run an OpenAI Batch API JSONL file"),
    "serve": ("tokenhive.clients.http.command", "serve the OpenAI-compatible HTTP API"),
    "sidecar": ("tokenhive.clients.sidecar.command", "the llmkit stdio JSON-RPC sidecar"),
    "keys": ("tokenhive.clients.cli.keys", "generate CurveZMQ key pairs for tcp links"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser, with full arguments only for ``command`` (the others list their help):
    building a subparser imports its module, and `tokenhive chat` need not import the broker."""
    parser = argparse.ArgumentParser(
        prog="tokenhive", description="High-throughput LLM generation pool.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            module = importlib.import_module(module_name)
            sub.description = module.__doc__ or help_text  # `tokenhive batch --help`: the rules
            add: Callable[..., None] = module.add_arguments
            if name in ("chat", "generate"):
                add(sub, chat=name == "chat")
            else:
                add(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help (0) or a usage error (2): a return code, not a raise
        return exc.code if isinstance(exc.code, int) else 2
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return int(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
