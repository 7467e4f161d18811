"""The embedded job store: SQLite (stdlib) in WAL mode, one file in the data directory.

One ``tokenhive serve`` owns a data directory at a time (``jobs.sqlite3.lock``, taken without
waiting), so on open every lease in the file belongs to a process that is gone: they are
released at once and a restarted server resumes its batches without waiting for leases to
expire. Write transactions are ``BEGIN IMMEDIATE``: claims cannot interleave.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tokenhive.clients.batch.sql_schema import TABLES
from tokenhive.schemas.config import ConfigError

DB_NAME = "jobs.sqlite3"


class DataDirInUse(ConfigError):
    """Another ``tokenhive serve`` owns this data directory."""


class SqliteDialect:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / DB_NAME
        self.label = f"sqlite:{self.path}"
        self._owner = FileLock(str(self.path) + ".lock", timeout=0, thread_local=False)

    def connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._owner.acquire()
        except Timeout:
            raise DataDirInUse(f"the data directory {self.path.parent} is in use by another "
                               f"tokenhive serve; give this one its own --data-dir, or share "
                               f"jobs through --jobs-db postgresql://...") from None
        except OSError as exc:
            raise ConfigError(f"cannot use the data directory {self.path.parent}: "
                              f"{exc.strerror or exc}") from None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            os.chmod(self.path, 0o600)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses nothing
            conn.execute("PRAGMA busy_timeout=10000")
        except (sqlite3.Error, OSError) as exc:
            self._owner.release()
            raise ConfigError(f"cannot open the job store {self.path}: {exc}") from None
        return conn

    def sql(self, text: str) -> str:
        return text

    @contextmanager
    def transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def claim(self, conn: sqlite3.Connection, owner: str, now: float, until: float,
              limit: int) -> list[tuple[str, int, str, str]]:
        with self.transaction(conn):
            rows = conn.execute(
                """UPDATE lines SET lease_owner = ?, lease_until = ? WHERE rowid IN (
                       SELECT l.rowid FROM lines l JOIN batches b ON b.id = l.batch_id
                       WHERE b.status = 'in_progress' AND l.state = 'pending'
                         AND (l.lease_until IS NULL OR l.lease_until < ?)
                       ORDER BY b.seq, l.idx LIMIT ?)
                   RETURNING batch_id, idx, custom_id, body""",
                (owner, until, now, limit)).fetchall()
        return [(str(r[0]), int(r[1]), str(r[2]), str(r[3])) for r in rows]

    def lock_batch(self, conn: sqlite3.Connection, batch_id: str) -> str | None:
        row = conn.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else str(row[0])  # BEGIN IMMEDIATE already holds the db

    def after_open(self, conn: sqlite3.Connection) -> None:
        for statement in TABLES:
            conn.execute(statement.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT",
                                          blob="BLOB", real="REAL"))
        # we own the data directory: every lease left in it is a dead process's
        conn.execute("UPDATE lines SET lease_owner = NULL, lease_until = NULL "
                     "WHERE state = 'pending' AND lease_owner IS NOT NULL")

    def broken(self, conn: sqlite3.Connection) -> bool:
        return False  # a file: nothing to lose

    def close(self, conn: Any) -> None:
        try:
            conn.close()
        finally:
            self._owner.release()
