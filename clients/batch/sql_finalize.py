"""Ending a batch, in one transaction: its output and error files written, its status final.

A batch ends when nothing is left to run: ``in_progress`` with every line done
(``completed``), ``cancelling`` with no line under a live lease (``cancelled``), or past its
completion window (``expired``: lines not done by then get a ``batch_expired`` error line, as
OpenAI's do). Output lines are in input order. Several servers may try to end the same batch:
the batch row is locked and the condition checked again, so one does.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tokenhive.clients.batch.objects import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    IN_PROGRESS,
    OUTPUT_PURPOSE,
    VALIDATING,
    FileObject,
)
from tokenhive.clients.batch.sql_schema import Dialect

#: batches with nothing left to run (one parameter, now, twice)
READY = f"""SELECT id FROM batches b WHERE (
    (b.status = '{IN_PROGRESS}' AND NOT EXISTS (
        SELECT 1 FROM lines l WHERE l.batch_id = b.id AND l.state = 'pending'))
    OR (b.status = '{CANCELLING}' AND NOT EXISTS (
        SELECT 1 FROM lines l WHERE l.batch_id = b.id AND l.state = 'pending'
        AND l.lease_until >= ?))
    OR (b.status IN ('{VALIDATING}', '{IN_PROGRESS}') AND b.expires_at <= ?))"""

EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def insert_file(conn: Any, dialect: Dialect, file: FileObject, content: bytes) -> None:
    conn.execute(dialect.sql(
        "INSERT INTO files (id, purpose, filename, bytes, created_at, content) "
        "VALUES (?, ?, ?, ?, ?, ?)"),
        (file.id, file.purpose, file.filename, file.bytes, file.created_at, content))


def finalize(conn: Any, dialect: Dialect, batch_id: str) -> bool:
    """End ``batch_id`` if it is ready; whether it was."""
    q = dialect.sql
    with dialect.transaction(conn):
        status = dialect.lock_batch(conn, batch_id)
        now = time.time()
        ready = conn.execute(q(READY + " AND id = ?"), (now, now, batch_id)).fetchone()
        if ready is None or status is None:
            return False
        expires_at = conn.execute(q("SELECT expires_at FROM batches WHERE id = ?"),
                                  (batch_id,)).fetchone()[0]
        if status in (VALIDATING, IN_PROGRESS) and expires_at is not None and expires_at <= now:
            final, stamp = EXPIRED, "expired_at"
            _expire_pending(conn, dialect, batch_id)
        elif status == IN_PROGRESS:
            final, stamp = COMPLETED, "completed_at"
        else:
            final, stamp = CANCELLED, "cancelled_at"
        rows = conn.execute(q("SELECT ok, output FROM lines WHERE batch_id = ? "
                              "AND state = 'done' ORDER BY idx"), (batch_id,)).fetchall()
        out: dict[bool, list[str]] = {True: [], False: []}
        for ok, output in rows:
            out[bool(ok)].append(output + "\n")
        stamped = int(now)
        ids = {}
        for ok, name in ((True, "output"), (False, "error")):
            if out[ok]:
                content = "".join(out[ok]).encode()
                file = FileObject(id=new_id("file-"), bytes=len(content), created_at=stamped,
                                  filename=f"{batch_id}_{name}.jsonl", purpose=OUTPUT_PURPOSE)
                insert_file(conn, dialect, file, content)
                ids[ok] = file.id
        conn.execute(q(f"UPDATE batches SET status = ?, finalizing_at = ?, {stamp} = ?, "
                       "output_file_id = ?, error_file_id = ? WHERE id = ?"),
                     (final, stamped, stamped, ids.get(True), ids.get(False), batch_id))
        return True


def _expire_pending(conn: Any, dialect: Dialect, batch_id: str) -> None:
    """Every line not done gets its ``batch_expired`` error line (and counts as failed)."""
    q = dialect.sql
    pending = conn.execute(q("SELECT idx, custom_id FROM lines WHERE batch_id = ? "
                             "AND state = 'pending'"), (batch_id,)).fetchall()
    if not pending:
        return
    conn.cursor().executemany(
        q("UPDATE lines SET state = 'done', ok = 0, output = ?, lease_owner = NULL, "
          "lease_until = NULL WHERE batch_id = ? AND idx = ?"),
        [(json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": cid,
                      "response": None,
                      "error": {"code": "batch_expired", "message": EXPIRED_MESSAGE}}),
          batch_id, idx) for idx, cid in pending])
    conn.execute(q("UPDATE batches SET failed = failed + ? WHERE id = ?"),
                 (len(pending), batch_id))
