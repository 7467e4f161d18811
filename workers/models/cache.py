"""The one folder where downloaded and assembled models live, shared by all workers.

Several workers may start at once and want the same file. Whoever takes the file's lock
(``filelock`` on ``<file>.lock``: flock on POSIX, msvcrt on Windows, a soft lock where the
filesystem has neither) fetches it into ``<file>.part`` and renames it into place; the others
wait on the lock and then find the finished file. A file is never visible under its final
name until it is complete and checked.

A waiter gives up with ``CacheLocked`` (a ``ModelLoadFailed``) once the holder has shown no
progress for ``$TOKENHIVE_LOCK_TIMEOUT`` seconds (default 600): "progress" is the holder's
``<file>.part`` growing, so a slow multi-gigabyte download is waited for however long it
takes, while a holder that hangs (a stopped process, a dead network mount) is reported:
which file, which process holds it (from ``/proc/locks`` where there is one), what to do.

A ``<file>.sha256`` note, written after a checksum passed, lets later runs trust the file
without hashing gigabytes again; it is only trusted while the file's size is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from tokenhive.schemas.errors import ModelLoadFailed

CACHE_ENV = "TOKENHIVE_CACHE"
LOCK_TIMEOUT_ENV = "TOKENHIVE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 600.0  # seconds a lock holder may go without progress
CHUNK = 1 << 20


class CacheLocked(ModelLoadFailed):
    """Another process held a model-cache file's lock past the timeout without progress."""

    def __init__(self, dest: Path, lock: Path, waited: float, timeout: float,
                 holder: str | None) -> None:
        self.dest, self.lock, self.waited, self.timeout, self.holder = (
            dest, lock, waited, timeout, holder)
        by = holder or "another process"
        super().__init__(
            f"model cache file {dest} is locked by {by} (lock file {lock}): waited "
            f"{waited:.1f}s, the last {timeout:g}s with no progress on {dest.name}.part. "
            f"The holder may be stuck (a stopped process, a hung network mount): stop it "
            f"(`fuser {lock}` or `lsof {lock}` names it) and start again. If it is busy with "
            f"a long step that writes nothing (hashing a very large file), raise "
            f"{LOCK_TIMEOUT_ENV} (seconds; inf waits forever). Do not delete the lock file "
            f"while its holder runs."
        )


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


def lock_timeout() -> float:
    """$TOKENHIVE_LOCK_TIMEOUT (seconds; inf waits forever), else DEFAULT_LOCK_TIMEOUT."""
    value = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_LOCK_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:  # also NaN
        raise ModelLoadFailed(
            f"{LOCK_TIMEOUT_ENV}={value!r} is not a number of seconds > 0 (inf: no limit)")
    return seconds


@contextlib.contextmanager
def file_lock(dest: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock for ``dest``, waiting while another process holds it.

    ``timeout`` (default ``lock_timeout()``) bounds how long the holder may go without
    progress (its ``<dest>.part`` unchanged); past it, CacheLocked. Not reentrant: a
    second ``file_lock`` on the same ``dest`` in one process waits for the first.
    """
    limit = lock_timeout() if timeout is None else timeout
    lock_path = dest.with_name(dest.name + ".lock")
    lock = FileLock(lock_path)
    part = part_path(dest)
    poll = min(1.0, limit / 4)
    started = quiet_since = time.monotonic()
    seen = _progress(part)
    while True:
        try:
            lock.acquire(timeout=poll)
            break
        except Timeout:
            now = time.monotonic()
            if (now_seen := _progress(part)) != seen:
                seen, quiet_since = now_seen, now
            elif now - quiet_since >= limit:
                raise CacheLocked(dest, lock_path, now - started, limit,
                                  lock_holder(lock_path)) from None
        except OSError as e:
            raise ModelLoadFailed(f"cannot lock {lock_path} in the model cache: {e}") from e
    try:
        yield
    finally:
        lock.release()


def _progress(part: Path) -> tuple[int, int] | None:
    """What changes while a holder downloads into ``part``: its size and mtime."""
    try:
        st = part.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def lock_holder(lock: Path) -> str | None:
    """"pid N (command line)" of the process holding ``lock``, from Linux's /proc/locks;
    None where that cannot be told (another OS, another PID namespace, no holder now)."""
    try:
        st = lock.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in table.splitlines():
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:56789 0 EOF"
        if len(fields) >= 6 and fields[1] != "->" and fields[1] in ("FLOCK", "POSIX", "OFDLCK"):
            if fields[5] == want or fields[5].rsplit(":", 1)[-1] == str(st.st_ino):
                pids.append((fields[5] == want, fields[4]))
    if not pids:
        return None
    pid = max(pids)[1]  # an exact device match first
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid}"
    command = " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())
    if len(command) > 200:
        command = command[:197] + "..."
    return f"pid {pid} ({command})" if command else f"pid {pid}"


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
