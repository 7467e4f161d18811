"""The job store on both databases (SQLite in a temp dir, a real PostgreSQL server): files,
batch validation, leases, recording only under a held lease, finishing and cancelling."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.postgres import Postgres
from tokenhive.clients.batch.input_file import split_input
from tokenhive.clients.batch.sqlite import SqliteDialect
from tokenhive.clients.batch.store import JobStore, open_store
from tokenhive.schemas.config import ConfigError
from tokenhive.schemas.errors import InvalidRequest

ENDPOINT = "/v1/completions"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def request_line(cid: str, url: str = ENDPOINT, **extra: object) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url,
                       "body": {"model": "m", "prompt": f"say {cid}", "max_tokens": 2},
                       **extra})


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    url = None
    if request.param == "postgres":
        url = request.getfixturevalue("postgres").new_database()
    opened = await open_store(data_dir=tmp_path / "data", url=url)
    try:
        yield opened
    finally:
        await opened.aclose()


async def make_batch(store: JobStore, n: int) -> str:
    content = "\n".join(request_line(f"r{i}") for i in range(n)).encode()
    file = await store.create_file(purpose="batch", filename="in.jsonl", content=content)
    lines, errors = split_input(content, ENDPOINT, max_lines=100)
    assert errors is None
    batch = await store.create_batch(input_file_id=file.id, endpoint=ENDPOINT,
                                     completion_window="24h", metadata={"k": "v"},
                                     lines=lines, errors=None)
    assert batch.status == "validating" and batch.request_counts.total == n
    assert await store.start_validated() >= 1
    return batch.id


@pytest.mark.timeout(60)
async def test_files_are_kept_listed_paged_and_deleted(store: JobStore) -> None:
    made = [await store.create_file(purpose="batch", filename=f"f{i}.jsonl",
                                    content=f"content {i}".encode()) for i in range(3)]
    assert await store.file_content(made[1].id) == b"content 1"
    got = await store.get_file(made[0].id)
    assert got is not None and got.bytes == 9 and got.filename == "f0.jsonl"
    page, more = await store.list_files(purpose="batch", limit=2, after=None)
    assert [f.id for f in page] == [made[2].id, made[1].id] and more  # newest first
    page, more = await store.list_files(purpose="batch", limit=2, after=made[1].id)
    assert [f.id for f in page] == [made[0].id] and not more
    assert await store.delete_file(made[0].id)
    assert await store.get_file(made[0].id) is None
    assert not await store.delete_file(made[0].id)


@pytest.mark.timeout(60)
async def test_a_line_is_recorded_once_and_only_by_its_lease_holder(store: JobStore) -> None:
    batch_id = await make_batch(store, 5)
    a = await store.claim("a", 3, lease_s=60)
    b = await store.claim("b", 10, lease_s=60)
    assert [c.idx for c in a] == [1, 2, 3] and [c.idx for c in b] == [4, 5]  # disjoint
    assert await store.claim("c", 10, lease_s=60) == []
    assert not await store.record("b", a[0].key, "{}", ok=True)  # not b's line
    assert await store.record("a", a[0].key, '{"x": 1}', ok=True)
    assert not await store.record("a", a[0].key, '{"x": 2}', ok=True)  # done already
    await store.release("a", [a[1].key])  # given back: pending and free again
    again = await store.claim("c", 10, lease_s=60)
    assert [c.key for c in again] == [a[1].key]
    for owner, line in (("a", a[2]), ("b", b[0]), ("b", b[1]), ("c", again[0])):
        assert await store.record(owner, line.key, json.dumps({"id": line.custom_id}),
                                  ok=owner != "c")
    assert await store.finalize_ready() == [batch_id]
    batch = await store.get_batch(batch_id)
    assert batch is not None and batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (5, 4, 1)
    assert batch.metadata == {"k": "v"} and batch.completed_at is not None
    assert batch.output_file_id and batch.error_file_id
    output = await store.file_content(batch.output_file_id)
    assert output is not None
    assert output.decode().splitlines() == ['{"x": 1}', '{"id": "r2"}', '{"id": "r3"}',
                                            '{"id": "r4"}']
    assert await store.file_content(batch.error_file_id) == b'{"id": "r1"}\n'
    assert await store.finalize_ready() == []  # once


@pytest.mark.timeout(60)
async def test_an_expired_lease_is_claimed_again_and_its_old_holder_cannot_record(
    store: JobStore
) -> None:
    await make_batch(store, 2)
    first = await store.claim("dead", 2, lease_s=0.2)
    deadline = time.monotonic() + 10
    taken = await store.claim("alive", 2, lease_s=60)
    while not taken:  # the dead holder never renews: its lease runs out
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)  # polling interval
        taken = await store.claim("alive", 2, lease_s=60)
    assert [c.key for c in taken] == [c.key for c in first]
    assert not await store.record("dead", first[0].key, "{}", ok=True)
    assert await store.record("alive", first[0].key, "{}", ok=True)


@pytest.mark.timeout(60)
async def test_cancel_stops_unrun_lines_and_ends_the_batch(store: JobStore) -> None:
    batch_id = await make_batch(store, 4)
    running = await store.claim("a", 1, lease_s=60)
    assert await store.record("a", running[0].key, '{"done": 1}', ok=True)
    held = await store.claim("a", 1, lease_s=60)
    cancelling = await store.cancel_batch(batch_id)
    assert cancelling is not None and cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    assert await store.stopped_batches({batch_id, "batch_other"}) == {batch_id}
    assert await store.claim("b", 10, lease_s=60) == []  # nothing more starts
    assert await store.finalize_ready() == []  # a line is still held
    await store.release("a", [held[0].key])
    assert await store.finalize_ready() == [batch_id]
    batch = await store.get_batch(batch_id)
    assert batch is not None and batch.status == "cancelled" and batch.error_file_id is None
    assert batch.request_counts.completed == 1 and batch.output_file_id
    done_id = await make_batch(store, 1)
    line = (await store.claim("a", 1, lease_s=60))[0]
    assert await store.record("a", line.key, "{}", ok=True)
    assert await store.finalize_ready() == [done_id]
    with pytest.raises(InvalidRequest, match="cannot cancel a batch with status 'completed'"):
        await store.cancel_batch(done_id)
    again = await store.cancel_batch(batch_id)  # cancelling a cancelled batch: as it is
    assert again is not None and again.status == "cancelled"
    assert await store.cancel_batch("batch_nope") is None


@pytest.mark.timeout(60)
async def test_a_batch_past_its_window_expires_with_what_it_finished(store: JobStore) -> None:
    content = "\n".join(request_line(f"r{i}") for i in range(3)).encode()
    lines, _ = split_input(content, ENDPOINT, max_lines=10)
    batch = await store.create_batch(input_file_id="file-x", endpoint=ENDPOINT,
                                     completion_window="24h", metadata=None, lines=lines,
                                     errors=None, window_s=0)  # its window is already over
    await store.start_validated()
    assert await store.stopped_batches({batch.id}) == set()  # still in progress until ended
    running = await store.claim("a", 2, lease_s=60)
    assert await store.record("a", running[0].key, '{"done": 1}', ok=True)
    assert await store.finalize_ready() == [batch.id]
    ended = await store.get_batch(batch.id)
    assert ended is not None and ended.status == "expired" and ended.expired_at is not None
    counts = ended.request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 1, 2)
    assert await store.file_content(str(ended.output_file_id)) == b'{"done": 1}\n'
    errors = (await store.file_content(str(ended.error_file_id)) or b"").decode().splitlines()
    assert [(json.loads(e)["custom_id"], json.loads(e)["error"]["code"]) for e in errors] == [
        ("r1", "batch_expired"), ("r2", "batch_expired")]
    assert not await store.record("a", running[1].key, "{}", ok=True)  # too late
    assert await store.stopped_batches({batch.id}) == {batch.id}


@pytest.mark.timeout(60)
async def test_a_bad_file_fails_its_batch_with_every_problem_listed(store: JobStore) -> None:
    content = "\n".join([
        request_line("ok"), "{not json", request_line("ok"), request_line("x", url="/v1/other"),
        json.dumps({"method": "POST", "url": ENDPOINT, "body": {}}),
    ]).encode()
    lines, errors = split_input(content, ENDPOINT, max_lines=100)
    assert errors is not None
    assert [(e.line, e.code) for e in errors.data] == [
        (2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "mismatched_endpoint"),
        (5, "missing_required_parameter")]
    batch = await store.create_batch(input_file_id="file-x", endpoint=ENDPOINT,
                                     completion_window="24h", metadata=None, lines=lines,
                                     errors=errors)
    got = await store.get_batch(batch.id)
    assert got is not None and got.status == "failed" and got.failed_at is not None
    assert got.errors == errors and got.request_counts.total == 0
    assert await store.claim("a", 10, lease_s=60) == []
    assert split_input(b"\xff\xfe", ENDPOINT, max_lines=10)[1] is not None
    assert split_input(b"\n\n", ENDPOINT, max_lines=10)[1] is not None
    many = "\n".join(request_line(f"r{i}") for i in range(3)).encode()
    too_many = split_input(many, ENDPOINT, max_lines=2)[1]
    assert too_many is not None and too_many.data[0].code == "too_many_requests"


@pytest.mark.timeout(60)
async def test_one_server_per_sqlite_data_dir_and_a_restart_frees_dead_leases(
    tmp_path: Path
) -> None:
    first = await open_store(data_dir=tmp_path, url=None)
    try:
        with pytest.raises(ConfigError, match="in use by another tokenhive serve"):
            await open_store(data_dir=tmp_path, url=None)
        await make_batch(first, 2)
        assert len(await first.claim("crashed", 2, lease_s=3600)) == 2
    finally:
        await first.aclose()  # as a crash would: the leases stay in the file
    assert oct((tmp_path / "jobs.sqlite3").stat().st_mode & 0o777) == "0o600"
    second = await open_store(data_dir=tmp_path, url=None)
    try:
        assert len(await second.claim("restarted", 10, lease_s=60)) == 2
    finally:
        await second.aclose()
    assert SqliteDialect(tmp_path).path.exists()


@pytest.mark.timeout(10)
def test_a_postgres_password_is_never_shown() -> None:
    from tokenhive.clients.batch.postgres import PostgresDialect, redact

    assert redact("postgresql://u:s3cret@db.example:5432/jobs") == (
        "postgresql://u:***@db.example:5432/jobs")
    assert redact("postgresql://u@/jobs?host=/run/pg") == "postgresql://u@/jobs?host=/run/pg"
    with pytest.raises(ConfigError) as bad:
        PostgresDialect("mysql://u:s3cret@db/jobs")
    assert "s3cret" not in str(bad.value)
    dialect = PostgresDialect("postgresql://u:s3cret@127.0.0.1:1/jobs")  # nothing listens
    assert "s3cret" not in dialect.label
    with pytest.raises(ConfigError) as down:
        dialect.connect()
    assert "s3cret" not in str(down.value) and "cannot connect" in str(down.value)


@pytest.mark.timeout(60)
async def test_a_dropped_postgres_connection_is_replaced(postgres: Postgres,
                                                          tmp_path: Path) -> None:
    import psycopg

    url = postgres.new_database()
    store = await open_store(data_dir=tmp_path, url=url)
    try:
        await make_batch(store, 1)
        with psycopg.connect(url, autocommit=True) as admin:  # as a server restart would
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                          "datname = current_database() AND pid <> pg_backend_pid()")
        with pytest.raises(psycopg.OperationalError):
            await store.claim("a", 1, lease_s=60)  # the call that meets the break fails
        assert len(await store.claim("a", 1, lease_s=60)) == 1  # the next one reconnects
    finally:
        await store.aclose()


@pytest.mark.timeout(30)
async def test_an_unusable_data_dir_is_a_config_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"cannot use the data directory .*a-file"):
        await open_store(data_dir=blocker / "tokenhive", url=None)
