"""``tokenhive keys generate DIR [--name NAME]``: a CurveZMQ key pair for the broker, a
worker or a client.

Writes ``DIR/NAME.key`` (the public key: copy it to the broker's allow-list directory, or,
for the broker's own pair, to every worker and client) and ``DIR/NAME.key_secret`` (the
pair: mode 0600, it never leaves its host). Existing files are never overwritten. Flags name
these FILES (``--curve-secret-key``, ``--curve-server-key``, ``--curve-allow DIR``); key
material never appears on a command line.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import zmq.auth

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    generate = actions.add_parser("generate", help="write a new key pair into DIR")
    generate.add_argument("dir", type=Path, metavar="DIR",
                          help="directory for the files (created 0700 if missing)")
    generate.add_argument("--name", default="tokenhive",
                          help="file stem: NAME.key and NAME.key_secret (default: tokenhive)")


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """The new public and secret key files; ValueError for a bad name or existing files."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: letters, digits, '.', '_' and '-' only")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ValueError(f"{path} exists; refusing to overwrite a key")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        written_public, written_secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(written_secret, 0o600)
    os.chmod(written_public, 0o644)  # a public key: meant to be copied and read
    return Path(written_public), Path(written_secret)


def run(args: argparse.Namespace) -> int:
    try:
        public, secret = generate(args.dir, args.name)
    except (ValueError, OSError) as exc:
        print(f"tokenhive keys: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret} (0600: keep it on this host)")
    return 0
