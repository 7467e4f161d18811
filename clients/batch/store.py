"""The job store: where files, batches and each batch line's state live, behind one interface.

A line is ``pending`` until its result is recorded (``done``, with its output line). A runner
``claim``s pending lines with a lease (owner + time limit), renews the lease while they run,
and ``record``s each result only while it still holds the line, so a line is never recorded
twice; a runner that dies stops renewing and its lines are claimed again once the lease
expires. A restart therefore runs only the lines that were not done.

Two implementations share one SQL body (``sql_store.SqlJobStore``):

- SQLite (the embedded default): one file under the data directory, WAL mode, owned by one
  ``tokenhive serve`` at a time (a lock file), which releases the leases a crash left behind.
- PostgreSQL (``--jobs-db postgresql://...``): many ``tokenhive serve`` processes on many
  hosts share the jobs; claims use ``FOR UPDATE SKIP LOCKED`` and leases expire.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import msgspec

from tokenhive.clients.batch.input_file import InputLine
from tokenhive.clients.batch.objects import WINDOW_SECONDS, BatchErrors, BatchObject, FileObject


class ClaimedLine(msgspec.Struct, frozen=True):
    batch_id: str
    idx: int
    custom_id: str
    text: str  # the request line as uploaded

    @property
    def key(self) -> tuple[str, int]:
        return (self.batch_id, self.idx)


class StoreUsage(msgspec.Struct, frozen=True):
    stored_bytes: int  # all files, inputs and outputs
    active_batches: int  # validating, in progress or cancelling


class JobStore(Protocol):
    # -- files ----------------------------------------------------------------------------
    async def create_file(self, *, purpose: str, filename: str, content: bytes) -> FileObject: ...

    async def get_file(self, file_id: str) -> FileObject | None: ...

    async def file_content(self, file_id: str) -> bytes | None: ...

    async def list_files(self, *, purpose: str | None, limit: int, after: str | None
                         ) -> tuple[list[FileObject], bool]: ...

    async def delete_file(self, file_id: str) -> bool: ...

    # -- batches --------------------------------------------------------------------------
    async def create_batch(self, *, input_file_id: str, endpoint: str, completion_window: str,
                           metadata: dict[str, str] | None, lines: list[InputLine],
                           errors: BatchErrors | None, window_s: int = WINDOW_SECONDS
                           ) -> BatchObject:
        """``validating`` with its lines, or ``failed`` with ``errors``; it expires after
        ``window_s`` seconds."""
        ...

    async def get_batch(self, batch_id: str) -> BatchObject | None: ...

    async def list_batches(self, *, limit: int, after: str | None
                           ) -> tuple[list[BatchObject], bool]: ...

    async def cancel_batch(self, batch_id: str) -> BatchObject | None:
        """``cancelling`` (lines not yet run never will be). Raises InvalidRequest for a batch
        that already ended otherwise."""
        ...

    # -- running lines --------------------------------------------------------------------
    async def start_validated(self) -> int:
        """``validating`` batches become ``in_progress``; how many."""
        ...

    async def claim(self, owner: str, limit: int, lease_s: float) -> list[ClaimedLine]: ...

    async def renew(self, owner: str, lease_s: float) -> None:
        """Extend every lease ``owner`` holds."""
        ...

    async def release(self, owner: str, keys: list[tuple[str, int]] | None = None) -> None:
        """Give back leases (all of ``owner``'s with None): those lines are pending again."""
        ...

    async def record(self, owner: str, key: tuple[str, int], output: str, ok: bool) -> bool:
        """The line's result, if ``owner`` still holds it; False (nothing changed) if not."""
        ...

    async def stopped_batches(self, batch_ids: set[str]) -> set[str]:
        """Those of ``batch_ids`` no longer in progress (cancelling, expired, ...): their
        lines in flight should stop."""
        ...

    async def finalize_ready(self) -> list[str]:
        """Finish every batch that has nothing left to run (all lines done, cancelling with
        no live lease, or past its window): write its output and error files, mark it
        completed, cancelled or expired. The ids finished."""
        ...

    async def usage(self) -> StoreUsage:
        """What the server-wide caps are checked against."""
        ...

    async def aclose(self) -> None: ...


async def open_store(*, data_dir: Path, url: str | None) -> JobStore:
    """PostgreSQL when ``url`` is given, else SQLite in ``data_dir``."""
    from tokenhive.clients.batch.sql_store import SqlJobStore

    if url:
        from tokenhive.clients.batch.postgres import PostgresDialect

        store = SqlJobStore(PostgresDialect(url))
    else:
        from tokenhive.clients.batch.sqlite import SqliteDialect

        store = SqlJobStore(SqliteDialect(data_dir))
    try:
        await store.open()
    except BaseException:
        await store.aclose()
        raise
    return store
