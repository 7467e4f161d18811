"""The one folder where downloaded and assembled models live, shared by all workers.

Several workers may start at once and want the same file. Whoever takes the file's lock
(``fcntl.flock`` on ``<file>.lock``) fetches it into ``<file>.part`` and renames it into place;
the others block on the lock and then find the finished file. A file is never visible
under its final name until it is complete and checked.

A ``<file>.sha256`` note, written after a checksum passed, lets later runs trust the file
without hashing gigabytes again; it is only trusted while the file's size is unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from tokenhive.schemas.errors import ModelLoadFailed

CACHE_ENV = "TOKENHIVE_CACHE"
CHUNK = 1 << 20


def cache_root(cache_dir: str | None = None) -> Path:
    """spec.cache_dir, else $TOKENHIVE_CACHE, else ~/.cache/tokenhive/models (created)."""
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache/tokenhive/models")
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadFailed(f"cannot create model cache folder {root}: {e}") from e
    return root


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _note_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


@contextlib.contextmanager
def file_lock(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock for ``dest`` (blocks while another process holds it).

    The lock file stays behind on purpose: deleting it would let two processes lock two
    different inodes under the same name.
    """
    lock = dest.with_name(dest.name + ".lock")
    try:
        f = lock.open("a")
    except OSError as e:
        raise ModelLoadFailed(f"cannot lock {lock} in the model cache: {e}") from e
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def sha256_file(path: Path, digest: hashlib._Hash | None = None) -> str:
    h = digest or hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def is_verified(dest: Path, sha256: str | None) -> bool:
    """Is the cached ``dest`` complete (and, with ``sha256``, the right bytes)?"""
    if not dest.is_file():
        return False
    if sha256 is None:
        return True
    note = _note_path(dest)
    size = str(dest.stat().st_size)
    if note.is_file() and note.read_text().split() == [sha256.lower(), size]:
        return True
    if sha256_file(dest) == sha256.lower():
        mark_verified(dest, sha256)
        return True
    return False


def mark_verified(dest: Path, sha256: str) -> None:
    note = _note_path(dest)
    tmp = note.with_name(note.name + ".tmp")
    tmp.write_text(f"{sha256.lower()} {dest.stat().st_size}\n")
    os.replace(tmp, note)


def publish(part: Path, dest: Path) -> None:
    """Make ``part`` durable, then rename it to ``dest`` in one step."""
    with part.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    with contextlib.suppress(OSError):  # fsync the folder so the rename survives a crash
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
