"""The shared job store: PostgreSQL (psycopg 3), for several ``tokenhive serve`` processes on
several hosts working through the same batches.

A claim takes pending lines ``FOR UPDATE SKIP LOCKED`` (two servers never pick the same line)
and leases them; a server that dies stops renewing and its lines are claimed again when the
lease expires. The URL comes from ``--jobs-db`` without a password (libpq then reads
``PGPASSWORD`` or ``~/.pgpass``) or whole from the ``TOKENHIVE_JOBS_DB`` environment variable;
the password is never logged or shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tokenhive.clients.batch.sql_schema import TABLES
from tokenhive.schemas.config import ConfigError

#: an advisory lock id so two servers creating the tables at once do not collide
SCHEMA_LOCK = 0x70_6B_68_76


def redact(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


class PostgresDialect:
    def __init__(self, url: str) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"--jobs-db must be a postgresql:// URL, got {redact(url)!r}")
        self.url = url
        self.label = redact(url)

    def connect(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise ConfigError("a PostgreSQL job store needs psycopg: pip install "
                              "'tokenhive[postgres]'") from None
        try:
            return psycopg.connect(self.url, autocommit=True)
        except psycopg.Error as exc:
            raise ConfigError(f"cannot connect to the job store {self.label}: "
                              f"{type(exc).__name__}") from None

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[None]:
        with conn.transaction():
            yield

    def claim(self, conn: Any, owner: str, now: float, until: float,
              limit: int) -> list[tuple[str, int, str, str]]:
        rows = conn.execute(
            """WITH picked AS (
                   SELECT l.batch_id, l.idx FROM lines l JOIN batches b ON b.id = l.batch_id
                   WHERE b.status = 'in_progress' AND l.state = 'pending'
                     AND (l.lease_until IS NULL OR l.lease_until < %s)
                   ORDER BY b.seq, l.idx LIMIT %s
                   FOR UPDATE OF l SKIP LOCKED)
               UPDATE lines SET lease_owner = %s, lease_until = %s FROM picked
               WHERE lines.batch_id = picked.batch_id AND lines.idx = picked.idx
               RETURNING lines.batch_id, lines.idx, lines.custom_id, lines.body""",
            (now, limit, owner, until)).fetchall()
        return [(str(r[0]), int(r[1]), str(r[2]), str(r[3])) for r in rows]

    def lock_batch(self, conn: Any, batch_id: str) -> str | None:
        row = conn.execute("SELECT status FROM batches WHERE id = %s FOR UPDATE",
                           (batch_id,)).fetchone()
        return None if row is None else str(row[0])

    def after_open(self, conn: Any) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in TABLES:
                conn.execute(statement.format(serial="BIGSERIAL PRIMARY KEY", blob="BYTEA",
                                              real="DOUBLE PRECISION"))

    def broken(self, conn: Any) -> bool:
        return bool(conn.closed or conn.broken)

    def close(self, conn: Any) -> None:
        conn.close()
