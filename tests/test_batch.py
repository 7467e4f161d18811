"""``tokenhive batch``: OpenAI Batch API files through real echo pools, resumable."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import Proc, start_broker
from tests.support.worker_peers import WorkerProc, start_worker
from tokenhive.clients import Client
from tokenhive.clients.batch.openai_format import parse_item
from tokenhive.clients.cli.main import main
from tokenhive.schemas.errors import InvalidRequest


def chat_line(cid: str, text: str, model: str = "m", **body: Any) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "messages": [
                           {"role": "developer", "content": "be brief"},
                           {"role": "user", "content": [{"type": "text", "text": text}]},
                       ], **body}})


def completion_line(cid: str, prompt: str, model: str = "m") -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                       "body": {"model": model, "prompt": prompt, "max_tokens": 2}})


def embedding_line(cid: str, inputs: list[str], fmt: str = "float") -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings",
                       "body": {"model": "m", "input": inputs, "encoding_format": fmt}})


def read_out(path: Path, skip: int = 0) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()[skip:]]


def by_id(lines: list[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    out: dict[str | None, list[dict[str, Any]]] = {}
    for line in lines:
        out.setdefault(line["custom_id"], []).append(line)
    return out


@pytest.mark.timeout(120)
def test_batch_local_pool_end_to_end_with_bad_lines_and_resume(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    out = tmp_path / "out.jsonl"
    source.write_text("\n".join([
        chat_line("chat-1", "hello batch", model="gpt-4o-mini"),  # local pool: served by m
        completion_line("cmpl-1", "one two three"),
        embedding_line("emb-1", ["a", "b c"]),
        embedding_line("emb-b64", ["z"], fmt="base64"),
        "{not json",
        json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/images", "body": {}}),
        chat_line("chat-1", "same id again"),
        chat_line("tools", "x", tools=[{"type": "function"}]),
        "",
    ]) + "\n")
    pool = ["--backend", "echo", "--model", "m", "--no-progress"]
    assert main(["batch", str(source), "-o", str(out), *pool]) == 1  # some lines failed

    lines = by_id(read_out(out))
    # output is in completion order: the duplicate's error line may come first
    chat_ok, duplicate = sorted(lines["chat-1"], key=lambda line: line["response"] is None)
    chat = chat_ok["response"]
    assert chat["status_code"] == 200 and chat_ok["error"] is None
    assert chat["body"]["object"] == "chat.completion"
    assert chat["body"]["choices"][0]["message"] == {"role": "assistant", "content": "hello batch"}
    assert chat["body"]["usage"]["completion_tokens"] == 2 and chat["body"]["model"] == "m"
    cmpl = lines["cmpl-1"][0]["response"]["body"]
    assert cmpl["object"] == "text_completion" and cmpl["choices"][0]["text"] == "one two"
    assert cmpl["choices"][0]["finish_reason"] == "length"
    emb = lines["emb-1"][0]["response"]["body"]
    assert emb["object"] == "list" and [d["index"] for d in emb["data"]] == [0, 1]
    assert len(emb["data"][0]["embedding"]) == 8
    assert isinstance(lines["emb-b64"][0]["response"]["body"]["data"][0]["embedding"], str)
    assert duplicate["response"] is None and "duplicate" in duplicate["error"]["message"]
    for cid in (None, "bad-url", "tools"):
        (line,) = lines[cid]
        assert line["error"]["code"] == "invalid_request" and line["response"] is None
    assert len(read_out(out)) == 8

    # rerun: custom_ids with a success are skipped (the duplicate chat-1 too); the failed
    # lines run, and fail, again
    assert main(["batch", str(source), "-o", str(out), *pool]) == 1
    rerun = read_out(out)[8:]
    assert sorted(str(line["custom_id"]) for line in rerun) == ["None", "bad-url", "tools"]
    assert all(line["response"] is None for line in rerun)


class Broker:
    def __init__(self, proc: Proc, workers: list[WorkerProc]) -> None:
        self.proc, self.workers = proc, workers


@pytest.fixture
def broker_m(tmp_path: Path) -> Iterator[Broker]:
    proc = start_broker(tmp_path, heartbeat_interval=0.2)
    broker = Broker(proc, [start_worker(proc.workers, tmp_path, model="m", worker_id="m0")])
    try:
        wait_models(proc.clients, {"m"})
        yield broker
    finally:
        for w in broker.workers:
            w.stop()
        proc.terminate()


def wait_models(address: str, models: set[str]) -> None:
    with Client(address) as client:
        deadline = time.monotonic() + 30
        while not models <= {w.model for w in client.status().workers if w.health == "ok"}:
            assert time.monotonic() < deadline, f"models {models} not served"
            time.sleep(0.05)  # polling interval


@pytest.mark.timeout(120)
def test_batch_against_a_broker_retries_failed_lines_on_rerun(
    tmp_path: Path, broker_m: Broker
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(
        [completion_line(f"m-{i}", f"prompt {i}") for i in range(20)]
        + [completion_line(f"n-{i}", f"later {i}", model="n") for i in range(5)]
    ))
    out.write_text('{"custom_id": "cut-off-by-a-cra')  # a previous run died mid-line
    address = broker_m.proc.clients
    args = ["batch", str(source), "-o", str(out), "--broker", address, "--no-progress",
            "--concurrency", "4"]
    assert main(args) == 1  # model n has no worker yet
    assert out.read_text().startswith('{"custom_id": "cut-off-by-a-cra\n')  # closed off
    first = by_id(read_out(out, skip=1))
    assert all(first[f"m-{i}"][0]["response"]["body"]["choices"][0]["text"] == f"prompt {i}"
               for i in range(20))
    assert all(first[f"n-{i}"][0]["error"]["code"] == "unknown_model" for i in range(5))

    broker_m.workers.append(start_worker(broker_m.proc.workers, tmp_path, model="n",
                                         worker_id="n0"))
    wait_models(address, {"m", "n"})
    assert main(args) == 0  # only the 5 failed lines ran, and now they succeed
    second = read_out(out, skip=1 + 25)
    assert sorted(line["custom_id"] for line in second) == [f"n-{i}" for i in range(5)]
    assert all(line["response"]["status_code"] == 200 for line in second)
    assert main(args) == 0 and len(read_out(out, skip=1)) == 25 + 5  # nothing left to do


@pytest.mark.timeout(10)
def test_batch_lines_are_read_as_serve_reads_bodies() -> None:
    def model_for(name: str | None) -> str | None:
        return name

    base = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}
    msgs = [{"role": "user", "content": "hi"}]
    for body, problem in [
        ({"model": "m", "messages": msgs, "n": 2}, "n"),
        ({"model": "m", "messages": msgs, "logit_bias": {"1": 5}}, "logit_bias"),
        ({"model": "m", "messages": msgs, "colour": "red"}, "colour"),  # unknown: refused
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "text"),
        ({"messages": msgs}, "model"),
        ({"model": "m", "messages": msgs, "max_tokens": "many"}, "max_tokens"),
    ]:
        with pytest.raises(InvalidRequest, match=problem):
            parse_item({**base, "body": body}, model_for, None)
    item = parse_item({**base, "body": {"model": "m", "messages": msgs, "stop": "END",
                                        "max_completion_tokens": 7, "user": "ignored"}},
                      model_for, 30.0)
    assert item.request.sampling.stop == ["END"] and item.request.sampling.max_tokens == 7
    assert item.request.timeout == 30.0 and item.request.priority == 0
    assert not item.request.stream
    # what serve takes, a batch line takes: tools and structured output reach the pool
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    item = parse_item({**base, "body": {"model": "m", "messages": msgs, "tools": [tool],
                                        "response_format": {"type": "json_object"},
                                        "stream": True}}, model_for, None)
    assert [t.function.name for t in item.request.tools] == ["f"]
    assert item.request.response_format is not None and not item.request.stream


@pytest.mark.timeout(120)
def test_batch_prints_the_runs_cost_from_the_price_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The summary line totals ``usage.cost_usd`` of the lines this run answered, priced by
    the pool's ``[prices]`` table: recomputed here from each line's own usage."""
    source, out, config = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "pool.toml"
    source.write_text("\n".join(completion_line(f"c{i}", "one two three four") for i in range(4))
                      + "\n")
    config.write_text('[[workers]]\nbackend = "echo"\nmodel = "m"\n\n'
                      "[prices.m]\ninput = 3.0\noutput = 15.0\n")
    assert main(["batch", str(source), "-o", str(out), "--config", str(config),
                 "--no-progress"]) == 0
    usages = [line["response"]["body"]["usage"] for line in read_out(out)]
    expected = sum(u["prompt_tokens"] * 3.0 + u["completion_tokens"] * 15.0
                   for u in usages) / 1e6
    assert expected > 0
    assert f"4 succeeded, 0 failed, 0 already done, cost ${expected:.6f} ->" in (
        capsys.readouterr().err)
