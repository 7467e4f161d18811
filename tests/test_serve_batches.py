"""The Files and Batches API through a real ``tokenhive serve`` subprocess and the official
``openai`` client, on a real broker with echo workers: upload, create, poll to completion,
output and error files, listing and paging, errors, cancel, and a server killed mid-batch
(SIGKILL) that resumes on restart with every line exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import Batch

from tests.support.procs import Proc, start_broker
from tests.support.serve import ServeProcess
from tests.support.worker_peers import WorkerProc, start_worker
from tests.test_batch import wait_models

MAX_FILE_BYTES = 64 * 1024


class Pool:
    def __init__(self, broker: Proc, workers: list[WorkerProc]) -> None:
        self.broker, self.workers = broker, workers


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Model ``m``: fast, 8 slots. Model ``pace``: 2 slots at 40 tokens/s, so a 4-token line
    takes ~0.1 s and a batch of 30 runs for over a second: "mid-batch" without sleeps."""
    logs = tmp_path_factory.mktemp("pool")
    broker = start_broker(logs, heartbeat_interval=0.2)
    workers = [start_worker(broker.workers, logs, model="m", worker_id="m0", slots=8),
               start_worker(broker.workers, logs, "--option", "tokens_per_s=40", model="pace",
                            worker_id="pace0", slots=2)]
    try:
        wait_models(broker.clients, {"m", "pace"})
        yield broker.clients
    finally:
        for w in workers:
            w.stop()
        broker.terminate()


def start_serve(pool: str, data_dir: Path, workdir: Path, name: str = "serve") -> ServeProcess:
    return ServeProcess(["--broker", pool, "--port", "0", "--data-dir", str(data_dir),
                         "--max-file-bytes", str(MAX_FILE_BYTES)], workdir, name=name)


@pytest.fixture(scope="module")
def serve(pool: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    workdir = tmp_path_factory.mktemp("serve")
    with start_serve(pool, workdir / "data", workdir) as server:
        yield server


def client_of(serve: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0)


def chat_line(cid: str, model: str = "m", **body: object) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "max_tokens": 4, "messages": [
                           {"role": "user", "content": f"{cid} one two three"}], **body}})


def upload(oai: openai.OpenAI, lines: list[str]) -> str:
    content = ("\n".join(lines) + "\n").encode()
    file = oai.files.create(file=("requests.jsonl", content), purpose="batch")
    assert file.bytes == len(content) and file.purpose == "batch"
    return file.id


def wait_status(oai: openai.OpenAI, batch_id: str, status: str, within: float = 60,
                completed_at_least: int = 0) -> Batch:
    deadline = time.monotonic() + within
    while True:
        batch = oai.batches.retrieve(batch_id)
        counts = batch.request_counts
        if batch.status == status and (counts is None or counts.completed >= completed_at_least):
            return batch
        assert time.monotonic() < deadline, f"batch {batch.status}, wanted {status}: {batch}"
        time.sleep(0.05)  # polling interval


def lines_of(oai: openai.OpenAI, file_id: str | None) -> list[dict[str, object]]:
    assert file_id is not None
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


@pytest.mark.timeout(120)
def test_a_batch_from_upload_to_output_with_the_openai_client(serve: ServeProcess) -> None:
    oai = client_of(serve)
    good = [chat_line(f"c{i}") for i in range(12)]
    file_id = upload(oai, [*good, chat_line("bad", n=2)])
    assert oai.files.retrieve(file_id).filename == "requests.jsonl"
    assert file_id in [f.id for f in oai.files.list(purpose="batch")]

    created = oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"run": "first"})
    assert created.status == "validating" and created.metadata == {"run": "first"}
    batch = wait_status(oai, created.id, "completed")
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (13, 12, 1)
    assert batch.in_progress_at and batch.completed_at and batch.expires_at
    output = lines_of(oai, batch.output_file_id)
    assert sorted(str(line["custom_id"]) for line in output) == sorted(f"c{i}" for i in range(12))
    for line in output:
        response = line["response"]
        assert isinstance(response, dict) and response["status_code"] == 200
        choice = response["body"]["choices"][0]
        assert choice["message"]["content"] == f"{line['custom_id']} one two three"
    (bad,) = lines_of(oai, batch.error_file_id)
    assert bad["custom_id"] == "bad" and bad["response"] is None
    assert isinstance(bad["error"], dict) and bad["error"]["code"] == "invalid_request"

    # listing pages newest first
    second = oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                completion_window="24h")
    page = oai.batches.list(limit=1)
    assert [b.id for b in page.data] == [second.id] and page.has_more
    assert [b.id for b in oai.batches.list(limit=1, after=second.id).data] == [created.id]
    wait_status(oai, second.id, "completed")


@pytest.mark.timeout(60)
def test_bad_requests_get_openai_errors_and_change_nothing(serve: ServeProcess) -> None:
    oai = client_of(serve)
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_missing")
    with pytest.raises(openai.NotFoundError):
        oai.files.content("file-missing")
    file_id = upload(oai, [chat_line("x")])
    with pytest.raises(openai.BadRequestError) as bad:
        oai.batches.create(input_file_id=file_id, endpoint="/v1/images",  # type: ignore[arg-type]
                           completion_window="24h")
    assert bad.value.param == "endpoint"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as bad:
        oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                           completion_window="1h")  # type: ignore[arg-type]
    assert bad.value.param == "completion_window"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        oai.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                           completion_window="24h")
    with pytest.raises(openai.BadRequestError) as bad:
        oai.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert bad.value.param == "purpose"  # type: ignore[attr-defined]
    with pytest.raises(openai.APIStatusError) as big:
        oai.files.create(file=("big.jsonl", b"x" * (MAX_FILE_BYTES + 1)), purpose="batch")
    assert big.value.status_code == 413
    with httpx.Client(base_url=serve.url) as http:
        raw = http.post("/v1/files", content=b"not a form",
                        headers={"content-type": "text/plain"})
        assert raw.status_code == 400 and raw.json()["error"]["message"]

    # a file whose lines do not match the endpoint fails validation, with line numbers
    mixed = upload(oai, [chat_line("ok"), json.dumps({
        "custom_id": "y", "method": "POST", "url": "/v1/embeddings", "body": {}})])
    failed = oai.batches.create(input_file_id=mixed, endpoint="/v1/chat/completions",
                                completion_window="24h")
    assert failed.status == "failed" and failed.errors is not None
    assert [(e.code, e.line) for e in failed.errors.data or []] == [("mismatched_endpoint", 2)]

    deleted = oai.files.delete(file_id)
    assert deleted.deleted and deleted.id == file_id
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(file_id)


@pytest.mark.timeout(120)
def test_cancel_stops_a_running_batch(serve: ServeProcess) -> None:
    oai = client_of(serve)
    file_id = upload(oai, [chat_line(f"p{i}", model="pace") for i in range(60)])
    batch = oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    wait_status(oai, batch.id, "in_progress", completed_at_least=2)
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    cancelled = wait_status(oai, batch.id, "cancelled", within=30)
    assert cancelled.request_counts is not None and cancelled.cancelled_at
    done = cancelled.request_counts.completed
    assert 2 <= done < 60
    output = lines_of(oai, cancelled.output_file_id)
    ids = [str(line["custom_id"]) for line in output]
    assert len(ids) == len(set(ids)) == done
    with pytest.raises(openai.BadRequestError):
        oai.batches.cancel(wait_status(oai, oai.batches.create(
            input_file_id=upload(oai, [chat_line("z")]), endpoint="/v1/chat/completions",
            completion_window="24h").id, "completed").id)


@pytest.mark.timeout(120)
def test_interactive_requests_overtake_a_running_batch(serve: ServeProcess) -> None:
    """Batch lines wait at batch priority: with the batch filling the model's 2 slots and 14
    more of its lines queued at the broker (--batch-concurrency 16), a chat request is served
    at the next free slot. In arrival order it would wait for those 14 lines (~2 s)."""
    oai = client_of(serve)
    words = " ".join(["w"] * 11)  # 12 tokens at 40/s: 0.3 s a line
    lines = [json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "pace", "max_tokens": 12, "messages": [
                             {"role": "user", "content": f"q{i} {words}"}]}})
             for i in range(60)]
    batch = oai.batches.create(input_file_id=upload(oai, lines),
                               endpoint="/v1/chat/completions", completion_window="24h")
    before = wait_status(oai, batch.id, "in_progress", completed_at_least=2).request_counts
    reply = oai.chat.completions.create(
        model="pace", max_tokens=4, messages=[{"role": "user", "content": "me first please"}])
    assert reply.choices[0].message.content == "me first please"
    after = oai.batches.retrieve(batch.id).request_counts
    assert before is not None and after is not None
    assert after.completed - before.completed <= 8, (before, after)
    oai.batches.cancel(batch.id)
    wait_status(oai, batch.id, "cancelled", within=30)


@pytest.mark.timeout(120)
def test_storage_and_active_batches_are_capped(pool: str, tmp_path: Path) -> None:
    args = ["--broker", pool, "--port", "0", "--data-dir", str(tmp_path / "data"),
            "--max-stored-bytes", "4500", "--max-active-batches", "1"]
    with ServeProcess(args, tmp_path) as serve:
        oai = client_of(serve)
        lines = [chat_line(f"k{i}", model="pace") for i in range(20)]  # ~3 KB, 1 s of work
        file_id = upload(oai, lines)
        with pytest.raises(openai.BadRequestError) as full:
            upload(oai, lines)
        assert full.value.code == "storage_limit_exceeded"  # type: ignore[attr-defined]
        first = oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        with pytest.raises(openai.RateLimitError) as busy:
            oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                               completion_window="24h")
        assert busy.value.code == "too_many_active_batches"  # type: ignore[attr-defined]
        assert [b.id for b in oai.batches.list().data] == [first.id]  # nothing was created
        oai.batches.cancel(first.id)
        wait_status(oai, first.id, "cancelled", within=30)
        oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                           completion_window="24h")  # room again


@pytest.mark.timeout(180)
def test_a_server_killed_mid_batch_resumes_it_on_restart(pool: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    lines = [chat_line(f"r{i}", model="pace") for i in range(30)]
    first = start_serve(pool, data, tmp_path, name="first")
    try:
        oai = client_of(first)
        batch = oai.batches.create(input_file_id=upload(oai, lines),
                                   endpoint="/v1/chat/completions", completion_window="24h")
        wait_status(oai, batch.id, "in_progress", completed_at_least=3)
    finally:
        first.kill()  # SIGKILL: no chance to give its leases back
    with start_serve(pool, data, tmp_path, name="second") as second:
        oai = client_of(second)
        before = oai.batches.retrieve(batch.id)
        assert before.request_counts is not None and before.request_counts.completed < 30
        done = wait_status(oai, batch.id, "completed")
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed,
                done.request_counts.failed) == (30, 30, 0)
        ids = sorted(str(line["custom_id"]) for line in lines_of(oai, done.output_file_id))
        assert ids == sorted(f"r{i}" for i in range(30))  # each exactly once


@pytest.mark.timeout(120)
def test_servers_sharing_a_data_dir_or_a_postgres_database(
    pool: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # the default data dir ($XDG_DATA_HOME/tokenhive) already in use: a second server still
    # serves the pool, without the Files/Batches API, and says so
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg")}
    args = ["--broker", pool, "--port", "0"]
    with ServeProcess(args, tmp_path, env=env, name="owner") as owner, \
            ServeProcess(args, tmp_path, env=env, name="guest") as guest:
        assert (tmp_path / "xdg" / "tokenhive" / "jobs.sqlite3").exists()
        assert client_of(owner).batches.list().data == []
        assert "Files and Batches API off" in guest.stderr_text()
        with pytest.raises(openai.NotFoundError):
            client_of(guest).batches.list()
        # an explicit --data-dir in use is an error: exit 2, saying why
        taken = subprocess.run(
            [sys.executable, "-m", "tokenhive.clients.cli.main", "serve", *args,
             "--data-dir", str(tmp_path / "xdg" / "tokenhive")],
            capture_output=True, text=True, timeout=60, check=False)
        assert taken.returncode == 2 and "in use by another tokenhive serve" in taken.stderr

    # two servers on one PostgreSQL database share the jobs
    url = request.getfixturevalue("postgres").new_database()
    shared = [*args, "--jobs-db", url]
    with ServeProcess(shared, tmp_path, name="pg-a") as a, \
            ServeProcess(shared, tmp_path, name="pg-b") as b:
        oai_a, oai_b = client_of(a), client_of(b)
        batch = oai_a.batches.create(
            input_file_id=upload(oai_a, [chat_line(f"s{i}", model="pace") for i in range(20)]),
            endpoint="/v1/chat/completions", completion_window="24h")
        done = wait_status(oai_b, batch.id, "completed")
        ids = sorted(str(line["custom_id"]) for line in lines_of(oai_b, done.output_file_id))
        assert ids == sorted(f"s{i}" for i in range(20))
    secret = subprocess.run(
        [sys.executable, "-m", "tokenhive.clients.cli.main", "serve", *args,
         "--jobs-db", "postgresql://u:hunter2@127.0.0.1/db"],
        capture_output=True, text=True, timeout=60, check=False)
    assert secret.returncode == 2 and "must not hold a password" in secret.stderr
    assert "hunter2" not in secret.stderr

