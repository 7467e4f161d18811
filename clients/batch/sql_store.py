"""The job store on SQL, one body for SQLite and PostgreSQL (see ``store.py`` for the rules).

Database calls are blocking; they run one at a time on the store's own thread (one
connection), so the event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tokenhive.clients.batch.input_file import InputLine
from tokenhive.clients.batch.objects import (
    CANCELLABLE,
    CANCELLED,
    CANCELLING,
    FAILED,
    IN_PROGRESS,
    VALIDATING,
    WINDOW_SECONDS,
    BatchErrors,
    BatchObject,
    FileObject,
    RequestCounts,
)
from tokenhive.clients.batch.sql_finalize import READY, finalize, insert_file, new_id
from tokenhive.clients.batch.sql_schema import (
    BATCH_COLUMNS,
    FILE_COLUMNS,
    Dialect,
    batch_of,
    file_of,
    to_json,
)
from tokenhive.clients.batch.store import ClaimedLine, StoreUsage
from tokenhive.schemas.errors import InvalidRequest

T = TypeVar("T")
_BATCH_SELECT = "SELECT " + ", ".join(BATCH_COLUMNS) + " FROM batches"
_FILE_SELECT = "SELECT " + ", ".join(FILE_COLUMNS) + " FROM files"


class SqlJobStore:
    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokenhive-jobs")
        self._conn: Any = None

    async def open(self) -> None:
        await self._run(self._open)

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._run(self.dialect.close, conn)
        self._thread.shutdown(wait=False)

    # -- files ----------------------------------------------------------------------------

    async def create_file(self, *, purpose: str, filename: str, content: bytes) -> FileObject:
        file = FileObject(id=new_id("file-"), bytes=len(content), created_at=int(time.time()),
                          filename=filename, purpose=purpose)
        await self._run(self._insert_file, file, content)
        return file

    async def get_file(self, file_id: str) -> FileObject | None:
        rows = await self._run(self._query, _FILE_SELECT + " WHERE id = ?", (file_id,))
        return file_of(rows[0]) if rows else None

    async def file_content(self, file_id: str) -> bytes | None:
        rows = await self._run(self._query, "SELECT content FROM files WHERE id = ?", (file_id,))
        return bytes(rows[0][0]) if rows else None

    async def list_files(self, *, purpose: str | None, limit: int, after: str | None
                         ) -> tuple[list[FileObject], bool]:
        where, params = _page_filter("files", after)
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        rows = await self._run(self._query, _FILE_SELECT + _where(where)
                               + " ORDER BY seq DESC LIMIT ?", (*params, limit + 1))
        return [file_of(r) for r in rows[:limit]], len(rows) > limit

    async def delete_file(self, file_id: str) -> bool:
        return await self._run(self._change, "DELETE FROM files WHERE id = ?", (file_id,)) > 0

    # -- batches --------------------------------------------------------------------------

    async def create_batch(self, *, input_file_id: str, endpoint: str, completion_window: str,
                           metadata: dict[str, str] | None, lines: list[InputLine],
                           errors: BatchErrors | None, window_s: int = WINDOW_SECONDS
                           ) -> BatchObject:
        now = int(time.time())
        batch = BatchObject(
            id=new_id("batch_"), endpoint=endpoint, input_file_id=input_file_id,
            completion_window=completion_window, status=FAILED if errors else VALIDATING,
            created_at=now, expires_at=now + window_s, metadata=metadata, errors=errors,
            failed_at=now if errors else None,
            request_counts=RequestCounts(total=0 if errors else len(lines)),
        )
        await self._run(self._insert_batch, batch, [] if errors else lines)
        return batch

    async def get_batch(self, batch_id: str) -> BatchObject | None:
        rows = await self._run(self._query, _BATCH_SELECT + " WHERE id = ?", (batch_id,))
        return batch_of(rows[0]) if rows else None

    async def list_batches(self, *, limit: int, after: str | None
                           ) -> tuple[list[BatchObject], bool]:
        where, params = _page_filter("batches", after)
        rows = await self._run(self._query, _BATCH_SELECT + _where(where)
                               + " ORDER BY seq DESC LIMIT ?", (*params, limit + 1))
        return [batch_of(r) for r in rows[:limit]], len(rows) > limit

    async def cancel_batch(self, batch_id: str) -> BatchObject | None:
        status = await self._run(self._cancel, batch_id, int(time.time()))
        if status is None:
            return None
        if status not in CANCELLABLE and status not in (CANCELLING, CANCELLED):
            raise InvalidRequest(f"cannot cancel a batch with status {status!r}")
        return await self.get_batch(batch_id)

    # -- running lines --------------------------------------------------------------------

    async def start_validated(self) -> int:
        return await self._run(
            self._change, "UPDATE batches SET status = ?, in_progress_at = ? WHERE status = ?",
            (IN_PROGRESS, int(time.time()), VALIDATING))

    async def claim(self, owner: str, limit: int, lease_s: float) -> list[ClaimedLine]:
        now = time.time()
        rows = await self._run(self._claim, owner, now, now + lease_s, limit)
        return [ClaimedLine(batch_id=b, idx=i, custom_id=c, text=t) for b, i, c, t in sorted(rows)]

    async def renew(self, owner: str, lease_s: float) -> None:
        await self._run(self._change, "UPDATE lines SET lease_until = ? WHERE lease_owner = ? "
                        "AND state = 'pending'", (time.time() + lease_s, owner))

    async def release(self, owner: str, keys: list[tuple[str, int]] | None = None) -> None:
        await self._run(self._release, owner, keys)

    async def record(self, owner: str, key: tuple[str, int], output: str, ok: bool) -> bool:
        return await self._run(self._record, owner, key, output, ok)

    async def stopped_batches(self, batch_ids: set[str]) -> set[str]:
        if not batch_ids:
            return set()
        ids = sorted(batch_ids)
        marks = ", ".join("?" for _ in ids)
        rows = await self._run(self._query, f"SELECT id FROM batches WHERE id IN ({marks}) "
                               "AND status <> ?", (*ids, IN_PROGRESS))
        return {str(r[0]) for r in rows}

    async def finalize_ready(self) -> list[str]:
        now = time.time()
        rows = await self._run(self._query, READY, (now, now))
        done = []
        for (batch_id,) in rows:
            if await self._run(self._finalize, str(batch_id)):
                done.append(str(batch_id))
        return done

    async def usage(self) -> StoreUsage:
        rows = await self._run(self._query, "SELECT (SELECT COALESCE(SUM(bytes), 0) FROM files), "
                               "(SELECT COUNT(*) FROM batches WHERE status IN (?, ?, ?))",
                               (VALIDATING, IN_PROGRESS, CANCELLING))
        return StoreUsage(stored_bytes=int(rows[0][0]), active_batches=int(rows[0][1]))

    # -- on the store's thread ------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, functools.partial(self._call, fn, *args))

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """On the store's thread: a connection the database dropped (a server restart, a
        network cut) is replaced before the next call; the call that met the break fails,
        and its caller tries again later."""
        if self._conn is not None and self.dialect.broken(self._conn):
            with contextlib.suppress(Exception):
                self.dialect.close(self._conn)
            self._conn = self.dialect.connect()
        return fn(*args)

    def _open(self) -> None:
        self._conn = self.dialect.connect()
        self.dialect.after_open(self._conn)

    def _claim(self, owner: str, now: float, until: float, limit: int
               ) -> list[tuple[str, int, str, str]]:
        return self.dialect.claim(self._conn, owner, now, until, limit)

    def _finalize(self, batch_id: str) -> bool:
        return finalize(self._conn, self.dialect, batch_id)

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return list(self._conn.execute(self.dialect.sql(sql), params).fetchall())

    def _change(self, sql: str, params: tuple[Any, ...]) -> int:
        return int(self._conn.execute(self.dialect.sql(sql), params).rowcount)

    def _insert_file(self, file: FileObject, content: bytes) -> None:
        insert_file(self._conn, self.dialect, file, content)

    def _insert_batch(self, batch: BatchObject, lines: list[InputLine]) -> None:
        q = self.dialect.sql
        with self.dialect.transaction(self._conn):
            self._conn.execute(q(
                "INSERT INTO batches (id, status, endpoint, input_file_id, completion_window, "
                "metadata, errors, created_at, expires_at, failed_at, total) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                (batch.id, batch.status, batch.endpoint, batch.input_file_id,
                 batch.completion_window, to_json(batch.metadata), to_json(batch.errors),
                 batch.created_at, batch.expires_at, batch.failed_at,
                 batch.request_counts.total))
            cursor = self._conn.cursor()
            cursor.executemany(q("INSERT INTO lines (batch_id, idx, custom_id, body) "
                                 "VALUES (?, ?, ?, ?)"),
                               [(batch.id, line.idx, line.custom_id, line.text)
                                for line in lines])

    def _cancel(self, batch_id: str, now: int) -> str | None:
        with self.dialect.transaction(self._conn):
            status = self.dialect.lock_batch(self._conn, batch_id)
            if status in CANCELLABLE:
                self._conn.execute(self.dialect.sql(
                    "UPDATE batches SET status = ?, cancelling_at = ? WHERE id = ?"),
                    (CANCELLING, now, batch_id))
            return status

    def _release(self, owner: str, keys: list[tuple[str, int]] | None) -> None:
        sql = self.dialect.sql("UPDATE lines SET lease_owner = NULL, lease_until = NULL "
                               "WHERE lease_owner = ? AND state = 'pending'")
        if keys is None:
            self._conn.execute(sql, (owner,))
            return
        with self.dialect.transaction(self._conn):
            cursor = self._conn.cursor()
            cursor.executemany(sql + self.dialect.sql(" AND batch_id = ? AND idx = ?"),
                               [(owner, b, i) for b, i in keys])

    def _record(self, owner: str, key: tuple[str, int], output: str, ok: bool) -> bool:
        q = self.dialect.sql
        with self.dialect.transaction(self._conn):
            changed = self._conn.execute(q(
                "UPDATE lines SET state = 'done', ok = ?, output = ?, lease_owner = NULL, "
                "lease_until = NULL WHERE batch_id = ? AND idx = ? AND state = 'pending' "
                "AND lease_owner = ? AND EXISTS (SELECT 1 FROM batches WHERE id = ? "
                "AND status IN (?, ?))"),
                (int(ok), output, key[0], key[1], owner, key[0], IN_PROGRESS, CANCELLING),
            ).rowcount
            if changed != 1:
                return False
            column = "completed" if ok else "failed"
            self._conn.execute(q(f"UPDATE batches SET {column} = {column} + 1 WHERE id = ?"),
                               (key[0],))
            return True


def _page_filter(table: str, after: str | None) -> tuple[list[str], list[Any]]:
    if after is None:
        return [], []
    return [f"seq < (SELECT seq FROM {table} WHERE id = ?)"], [after]


def _where(conditions: list[str]) -> str:
    return " WHERE " + " AND ".join(conditions) if conditions else ""
