"""llama.cpp's own log lines go through our logging: a GGUF worker at warning level writes
none of them to stderr, and at debug level each one is a record of ``tokenhive.llama_cpp``.

The tiny model is loaded with a per-sequence context beyond its training context, which
makes llama.cpp warn (``n_ctx_seq (8192) > n_ctx_train (4096)``): a line llama-cpp-python's
own log callback used to print straight to stderr at every level.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.procs import start_broker
from tests.support.worker_peers import WorkerProc
from tests.test_pool_e2e import run, wait_status
from tokenhive.clients import AsyncClient

LLAMA_WARNING = "n_ctx_train (4096)"


@pytest.mark.timeout(120)
def test_llama_cpp_lines_are_our_debug_records(tmp_path: Path, tiny_gguf: Path) -> None:
    broker = start_broker(tmp_path, heartbeat_interval=0.2)
    spec = json.dumps({"backend": "gguf", "model": "tiny", "path": str(tiny_gguf),
                       "n_ctx": 8192, "n_threads": 1, "slots": 1})
    workers = {level: WorkerProc(["--broker", broker.workers, "--spec-json", spec,
                                  "--id", level, "--log-level", level],
                                 tmp_path / f"{level}.log")
               for level in ("warning", "debug")}
    try:
        async def both_ready() -> None:
            async with AsyncClient(broker.clients) as client:
                await wait_status(client, lambda s: sorted(
                    w.id for w in s.workers if w.health == "ok") == ["debug", "warning"],
                    within=90)
        run(both_ready())
    finally:
        for worker in workers.values():
            worker.stop()
        broker.terminate()

    quiet = workers["warning"].log_text()
    assert LLAMA_WARNING not in quiet and "llama_model_loader" not in quiet
    assert all(line.startswith("{") for line in quiet.splitlines()), quiet[:2000]

    loud = workers["debug"].log_text()
    assert all(line.startswith("{") for line in loud.splitlines() if line.strip())
    records = [r for r in workers["debug"].log_records() if r["logger"] == "tokenhive.llama_cpp"]
    warned = [r for r in records if LLAMA_WARNING in r["msg"]]
    assert len(warned) == 1 and warned[0]["level"] == "debug"
    assert warned[0]["llama_level"] == "warn" and not warned[0]["msg"].endswith("\n")
    assert any(r["msg"].startswith("llama_model_loader:") for r in records)


@pytest.mark.timeout(120)
def test_an_embedding_worker_keeps_llama_cpp_off_stderr(tmp_path: Path, tiny_gguf: Path) -> None:
    """Embedding models load through llama-cpp-python's ``Llama``: the same routing holds."""
    broker = start_broker(tmp_path, heartbeat_interval=0.2)
    spec = json.dumps({"backend": "gguf", "model": "emb", "path": str(tiny_gguf),
                       "embedding": True, "n_threads": 1, "slots": 1})
    worker = WorkerProc(["--broker", broker.workers, "--spec-json", spec, "--id", "emb",
                         "--log-level", "warning"], tmp_path / "emb.log")
    try:
        async def ready() -> None:
            async with AsyncClient(broker.clients) as client:
                await wait_status(client, lambda s: [w.health for w in s.workers] == ["ok"],
                                  within=90)
                result = await client.embed(["a b"], model="emb")
                assert result.embeddings and len(result.embeddings) == 1
        run(ready())
    finally:
        worker.stop()
        broker.terminate()
    quiet = worker.log_text()
    assert "llama_model_loader" not in quiet and "llama_context" not in quiet, quiet[:2000]
    assert all(line.startswith("{") for line in quiet.splitlines() if line.strip())
