"""The sidecar's life with a local pool: it never outlives what drives it (stdin EOF, a
SIGKILLed parent, SIGTERM), and takes its pool (processes, runtime directory) with it.
Also a real model: the tiny GGUF through ``tokenhive sidecar --gguf``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.llmkit_peer import LlmkitPeer, complete_params


def sidecar_argv(*pool: str) -> list[str]:
    return [sys.executable, "-m", "tokenhive.clients.cli.main", "sidecar", *pool]


ECHO_POOL = ("--backend", "echo", "--model", "echo", "--option", "tokens_per_s=20")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc: ppid links)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: set[int], within: float) -> set[int]:
    deadline = time.monotonic() + within
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for other processes' exit
    return left


def start(tmp_path: Path, *pool: str) -> tuple[LlmkitPeer, Path]:
    run_dir = tmp_path / "tmp"
    run_dir.mkdir()
    peer = LlmkitPeer(sidecar_argv(*pool), tmp_path / "sidecar.stderr",
                      env={"TOKENHIVE_BROKER": "", "TMPDIR": str(run_dir)})
    return peer, run_dir


@pytest.mark.timeout(60)
def test_stdin_eof_lets_in_flight_work_finish_then_exits_and_stops_the_pool(
    tmp_path: Path,
) -> None:
    peer, run_dir = start(tmp_path, *ECHO_POOL)
    try:
        assert peer.call("init", {"backend": "transformers", "model": "echo"},
                         timeout=45)["result"]["ready"]
        pool = descendants(peer.proc.pid)
        assert len(pool) >= 2 and len(list(run_dir.iterdir())) == 1  # broker + worker, a dir
        pending = peer.request("complete", complete_params("one two three four five six"))
        peer.close_stdin()
        answer = peer.read()  # 0.3 s of tokens, finished after EOF
        assert answer["id"] == pending and answer["result"]["content"] == \
            "one two three four five six"
        assert peer.at_eof() and peer.wait(20) == 0
        assert not wait_gone(pool, 10)
        assert list(run_dir.iterdir()) == []  # sockets, ready file: all removed
    finally:
        peer.stop()


PARENT = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    child.stdin.write(b'{"jsonrpc":"2.0","method":"init","params":{"backend":"transformers",'
                      b'"model":"echo"},"id":1}\\n')
    child.stdin.flush()
    child.stdout.readline()
    child.stdin.write(b'{"jsonrpc":"2.0","method":"complete","params":{"messages":[{"role":'
                      b'"user","content":"' + b"w " * 2000 + b'"}]},"id":2}\\n')
    child.stdin.flush()
    print(child.pid, flush=True)
    child.wait()
""")


@pytest.mark.timeout(60)
def test_a_killed_parent_takes_the_sidecar_and_its_pool_with_it(tmp_path: Path) -> None:
    """llmkit's process dies (SIGKILL: no shutdown, no goodbye) with a long request in
    flight and nothing written for a while: the sidecar notices its stdout has no reader."""
    run_dir = tmp_path / "tmp"
    run_dir.mkdir()
    with (tmp_path / "sidecar.stderr").open("wb") as err:
        parent = subprocess.Popen([sys.executable, "-c", PARENT, *sidecar_argv(*ECHO_POOL)],
                                  stdout=subprocess.PIPE, stderr=err,
                                  env={**os.environ, "TOKENHIVE_BROKER": "",
                                       "TMPDIR": str(run_dir)})
    try:
        assert parent.stdout is not None
        sidecar = int(parent.stdout.readline())
        tree = descendants(sidecar) | {sidecar}
        assert len(tree) >= 3 and len(list(run_dir.iterdir())) == 1
        parent.kill()
        parent.wait(10)
        assert not wait_gone(tree, 20), (tmp_path / "sidecar.stderr").read_text()[-2000:]
        assert list(run_dir.iterdir()) == []
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.timeout(60)
def test_sigterm_stops_the_sidecar_and_its_pool(tmp_path: Path) -> None:
    peer, run_dir = start(tmp_path, *ECHO_POOL)
    try:
        assert peer.call("init", {"backend": "transformers", "model": "echo"},
                         timeout=45)["result"]["ready"]
        pool = descendants(peer.proc.pid)
        peer.notify("stream.start", complete_params(" ".join(["w"] * 400), stream=True))
        assert peer.read()["method"] == "stream.chunk"
        peer.proc.send_signal(signal.SIGTERM)
        messages = peer.read_until(lambda m: m["method"] != "stream.chunk")
        assert messages[-1]["method"] == "stream.error"  # its one final answer
        assert peer.at_eof() and peer.wait(20) == 128 + signal.SIGTERM
        assert not wait_gone(pool, 10)
        assert list(run_dir.iterdir()) == []
    finally:
        peer.stop()


@pytest.mark.timeout(120)
def test_the_tiny_gguf_model_through_the_sidecar(tmp_path: Path, tiny_gguf: Path) -> None:
    peer, _ = start(tmp_path, "--gguf", str(tiny_gguf), "--model", "tiny",
                    "-O", "n_ctx=256", "-O", "n_threads=1")
    try:
        assert peer.call("init", {"backend": "llama.cpp", "model": "tiny"},
                         timeout=90)["result"]["ready"]
        answer = peer.call("complete", complete_params("hello world", max_tokens=4,
                                                       options={"seed": 1}), timeout=60)
        result = answer["result"]
        assert result["finish_reason"] == "length" and result["content"]
        assert result["usage"]["output_tokens"] == 4 and result["usage"]["input_tokens"] > 0
        peer.notify("stream.start", complete_params("hello world", max_tokens=4, stream=True,
                                                    options={"seed": 1}))
        messages = peer.read_until(lambda m: m["method"] != "stream.chunk", timeout=60)
        assert messages[-1]["method"] == "stream.done"
        assert messages[-1]["params"]["usage"]["output_tokens"] == 4
        # the same prompt and seed: the stream says what complete said
        assert "".join(m["params"]["content"] for m in messages[:-1]) == result["content"]
        assert peer.call("shutdown")["result"]["success"] is True
        assert peer.wait(30) == 0
    finally:
        peer.stop()
