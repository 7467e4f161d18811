"""The llmkit sidecar as llmkit drives it: the script by path with ``sys.executable``, onto a
real broker and echo workers (deterministic), over stdio, many requests interleaved.

Echo workers answer with the last user message, one word per token, so every content,
usage count and chunk boundary below is known in advance.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.llmkit_peer import LlmkitPeer, complete_params
from tests.support.procs import Proc, start_broker
from tests.support.worker_peers import WorkerProc
from tests.test_pool_e2e import run, wait_status
from tokenhive.clients import AsyncClient
from tokenhive.clients.sidecar.command import SCRIPT

RESPONSE_KEYS = {"jsonrpc", "result", "id"}
ERROR_KEYS = {"jsonrpc", "error", "id"}
NOTIFICATION_KEYS = {"jsonrpc", "method", "params"}
USAGE_KEYS = {"input_tokens", "output_tokens", "total_tokens"}


class Pool:
    def __init__(self, broker: Proc, workers: list[WorkerProc]) -> None:
        self.broker = broker
        self.workers = workers

    @property
    def host(self) -> str:
        """The broker address as a llmkit user writes ``host``: no scheme."""
        return self.broker.clients.removeprefix("tcp://")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("sidecar-pool")
    broker = start_broker(tmp, heartbeat_interval=0.2)
    specs = {"echo": '{"backend":"echo","model":"echo","slots":64}',
             "slow": '{"backend":"echo","model":"slow","slots":8,"tokens_per_s":20}'}
    workers = [WorkerProc(["--broker", broker.workers, "--spec-json", spec, "--id", name,
                           "--heartbeat-interval", "0.2", "--log-level", "info"],
                          tmp / f"{name}.log") for name, spec in specs.items()]
    try:
        async def ready() -> None:
            async with AsyncClient(broker.clients) as client:
                await wait_status(client, lambda s: {w.model for w in s.workers
                                                     if w.health == "ok"} == set(specs))
        run(ready())
        yield Pool(broker, workers)
    finally:
        for worker in workers:
            worker.stop()
        broker.terminate()


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[LlmkitPeer]:
    """The script by path, started the way llmkit starts it: ``PYTHON SIDECAR_PATH``."""
    peer = LlmkitPeer([sys.executable, str(SCRIPT)], tmp_path / "sidecar.stderr", cwd=tmp_path,
                      env={"TOKENHIVE_BROKER": "", "TOKENHIVE_LOG_LEVEL": "info"})
    try:
        yield peer
    finally:
        peer.stop()


def init(peer: LlmkitPeer, pool: Pool, model: str = "echo") -> dict[str, Any]:
    reply = peer.call("init", {"backend": "ollama", "model": model, "host": pool.host})
    assert set(reply) == RESPONSE_KEYS, reply
    return reply


@pytest.mark.timeout(60)
def test_an_llmkit_session_init_complete_stream_shutdown(
    pool: Pool, sidecar: LlmkitPeer
) -> None:
    reply = init(sidecar, pool)
    assert reply["id"] == 1 and reply["result"]["ready"] is True
    assert reply["result"]["version"] and pool.broker.clients in reply["result"]["message"]

    # Complete: one response, llmkit's CompleteResult; Go escapes <, >, & on the way in
    answer = sidecar.call("complete", complete_params("fish <&> chips", model="echo"))
    assert set(answer) == RESPONSE_KEYS and answer["id"] == 2
    assert answer["result"] == {"content": "fish <&> chips", "model": "echo",
                                "finish_reason": "stop",
                                "usage": {"input_tokens": 3, "output_tokens": 3,
                                          "total_tokens": 6}}

    # Stream: llmkit sends stream.start as a notification and reads notifications only
    sidecar.notify("stream.start", complete_params("one two three", model="echo",
                                                   max_tokens=2, stream=True))
    messages = sidecar.read_until(lambda m: m["method"] == "stream.done")
    assert all(set(m) == NOTIFICATION_KEYS for m in messages)  # no id: notifications
    chunks = [m["params"] for m in messages[:-1]]
    assert [m["method"] for m in messages[:-1]] == ["stream.chunk"] * len(chunks)
    assert all(set(c) == {"content", "done"} and c["done"] is False for c in chunks)
    assert "".join(c["content"] for c in chunks) == "one two"
    done = messages[-1]["params"]
    assert done == {"usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
                    "finish_reason": "length", "model": "echo"}

    # Shutdown: Go sends it without params; its response is the last line, then EOF
    bye = sidecar.call("shutdown")
    assert bye == {"jsonrpc": "2.0", "result": {"success": True,
                                                "message": "tokenhive sidecar stopped"},
                   "id": 3}
    assert sidecar.at_eof() and sidecar.wait() == 0
    assert all(line.startswith(b'{"jsonrpc":"2.0",') for line in sidecar.raw)


@pytest.mark.timeout(90)
def test_many_requests_interleaved_on_one_pipe(pool: Pool, sidecar: LlmkitPeer) -> None:
    """40 plain and 10 streamed completes at once: every id answered exactly once, each
    streamed one's chunks tagged with its id and in order, answers in any order."""
    init(sidecar, pool)
    expected: dict[int, str] = {}
    streamed: set[int] = set()
    for i in range(50):
        text = f"request {i} " + " ".join(f"w{i}x{j}" for j in range(i % 7 + 1))
        request_id = sidecar.request("complete", complete_params(
            text, model="echo", stream=i % 5 == 0))
        expected[request_id] = text
        if i % 5 == 0:
            streamed.add(request_id)
    responses: dict[int, dict[str, Any]] = {}
    pieces: dict[int, list[str]] = {i: [] for i in streamed}
    while len(responses) < len(expected):
        message = sidecar.read()
        if "method" in message:
            assert message["method"] == "stream.chunk" and set(message) == NOTIFICATION_KEYS
            assert message["params"]["id"] not in responses  # no chunk after its response
            pieces[message["params"]["id"]].append(message["params"]["content"])
        else:
            assert set(message) == RESPONSE_KEYS and message["id"] not in responses
            responses[message["id"]] = message
    for request_id, text in expected.items():
        assert responses[request_id]["result"]["content"] == text
    for request_id in streamed:
        assert "".join(pieces[request_id]) == expected[request_id]
    sidecar.call("shutdown")
    assert sidecar.at_eof() and sidecar.wait() == 0


@pytest.mark.timeout(60)
def test_id_less_streams_take_turns(pool: Pool, sidecar: LlmkitPeer) -> None:
    """stream.start has no id, so its notifications are told apart by order alone: three
    started at once come back as three whole runs, in the order they were started."""
    init(sidecar, pool)
    prompts = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    for prompt in prompts:
        sidecar.notify("stream.start", complete_params(prompt, model="slow", stream=True))
    for prompt in prompts:
        run_ = sidecar.read_until(lambda m: m["method"] in ("stream.done", "stream.error"))
        assert run_[-1]["method"] == "stream.done", run_[-1]
        assert "".join(m["params"]["content"] for m in run_[:-1]) == prompt


@pytest.mark.timeout(60)
def test_shutdown_answers_what_is_in_flight_first(pool: Pool, sidecar: LlmkitPeer) -> None:
    init(sidecar, pool)
    long_text = " ".join(["word"] * 200)  # 10 s at 20 tokens/s: still running at shutdown
    pending = sidecar.request("complete", complete_params(long_text, model="slow"))
    sidecar.notify("stream.start", complete_params(long_text, model="slow", stream=True))
    first = sidecar.read()  # the stream has begun: both requests are in flight
    assert first["method"] == "stream.chunk"
    started = time.monotonic()
    shutdown = sidecar.request("shutdown")
    messages = sidecar.read_until(lambda m: m.get("id") == shutdown)
    assert time.monotonic() - started < 10
    assert messages[-1]["result"]["success"] is True
    finals = [m for m in messages[:-1] if m.get("method") != "stream.chunk"]
    by_kind = {m.get("method", "response"): m for m in finals}
    assert len(finals) == 2 and set(by_kind) == {"response", "stream.error"}
    error = by_kind["response"]
    assert set(error) == ERROR_KEYS and error["id"] == pending
    assert error["error"]["code"] == -32000
    assert error["error"]["data"] == {"tokenhive_code": "cancelled", "retryable": False}
    assert by_kind["stream.error"]["params"] == {"code": -32002,
                                                 "message": "sidecar shutting down"}
    assert sidecar.at_eof() and sidecar.wait() == 0


@pytest.mark.timeout(60)
def test_init_errors_name_the_problem(pool: Pool, sidecar: LlmkitPeer) -> None:
    unknown = sidecar.call("init", {"backend": "vllm", "model": "nope", "host": pool.host})
    assert unknown["error"]["code"] == -32001 and "echo, slow" in unknown["error"]["message"]
    backend = sidecar.call("init", {"backend": "openai", "model": "echo"})
    assert backend["error"]["code"] == -32602 and "ollama" in backend["error"]["message"]
    early = sidecar.call("complete", complete_params("hi"))
    assert early["error"]["code"] == -32600 and "init" in early["error"]["message"]
    sidecar.notify("stream.start", complete_params("hi", stream=True))
    assert sidecar.read() == {"jsonrpc": "2.0", "method": "stream.error",
                              "params": {"code": -32600, "message":
                                         "call init first (no init has succeeded)"}}
    assert init(sidecar, pool)["result"]["ready"] is True  # the failures changed nothing
    unknown_model = sidecar.call("complete", complete_params("hi", model="missing"))
    assert unknown_model["error"]["code"] == -32001
    assert unknown_model["error"]["data"]["tokenhive_code"] == "unknown_model"


@pytest.mark.timeout(30)
def test_no_broker_at_host_is_a_connection_error_at_once(tmp_path: Path,
                                                          sidecar: LlmkitPeer) -> None:
    """llmkit's default host for ollama when none is configured: nobody answers there."""
    started = time.monotonic()
    reply = sidecar.call("init", {"backend": "ollama", "model": "m",
                                  "host": "127.0.0.1:9"}, timeout=15)
    assert time.monotonic() - started < 8
    assert reply["error"]["code"] == -32003  # the code llmkit retries
    assert "no tokenhive broker answers at tcp://127.0.0.1:9" in reply["error"]["message"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("line", "answered"), [
    (b'{"jsonrpc":"2.0","method":"shutdown","id":null}', True),
    (b'{"jsonrpc":"2.0","method":"shutdown"}', False),  # a notification: no answer
])
def test_shutdown_with_a_null_id_or_as_a_notification(sidecar: LlmkitPeer, line: bytes,
                                                      answered: bool) -> None:
    sidecar.send_raw(line + b"\n")
    if answered:
        assert sidecar.read()["result"]["success"] is True and sidecar.raw[-1].endswith(
            b'"id":null}\n')
    assert sidecar.at_eof() and sidecar.wait() == 0
