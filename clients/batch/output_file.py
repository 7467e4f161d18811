"""``tokenhive batch``'s output: an append-only JSONL file, locked while a run writes it.

- One run at a time per output: ``OUT.lock`` beside it is taken without waiting, so a second
  ``tokenhive batch`` on the same OUT is refused instead of running every line again.
- Lines are written whole (one ``write`` + flush each, from the event loop thread), so an
  interrupted run leaves only complete lines; a run killed mid-write (SIGKILL, power) may
  leave a cut-off last line, which the next run closes off and runs again.
- Resumable: ``done_ids`` are the custom_ids that already have a success line.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from filelock import FileLock, Timeout

from tokenhive.clients.batch.openai_format import custom_id_of


class OutputLocked(Exception):
    """Another process holds the output's lock."""


class OutputWriteError(Exception):
    """The output could not be written (disk full, permissions)."""


class OutputFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._lock = FileLock(str(self.lock_path), timeout=0)
        self._out: IO[str] | None = None
        self.progress: Any = None  # a tqdm bar, updated per line when set

    def lock(self) -> None:
        """Take the output's lock, or raise OutputLocked at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise OutputLocked(
                f"{self.path} is being written by another tokenhive batch "
                f"(lock {self.lock_path}); wait for it to finish or choose another -o"
            ) from None

    def unlock(self) -> None:
        self._lock.release()

    def done_ids(self) -> set[str]:
        """custom_ids that already have a success line."""
        done: set[str] = set()
        if not self.path.exists():
            return done
        with self.path.open(encoding="utf-8") as f:
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

    def __enter__(self) -> OutputFile:
        self._end_with_newline()
        self._out = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    async def record(self, key: Hashable, line: dict[str, Any], ok: bool) -> None:
        """The ResultSink: one whole line, flushed."""
        if self._out is None:
            raise RuntimeError(f"{self.path} is not open")
        try:
            self._out.write(json.dumps(line, ensure_ascii=False) + "\n")
            self._out.flush()
        except OSError as exc:
            raise OutputWriteError(f"cannot write {self.path}: {exc}") from exc
        if self.progress is not None:
            self.progress.update(1)

    def _end_with_newline(self) -> None:
        """A previous run killed mid-write may have left a partial last line: close it off,
        so the next line appended starts on a line of its own."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
