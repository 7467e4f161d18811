"""Bad input on the sidecar's stdin gets the JSON-RPC error the protocol names, and changes
nothing else: ``tokenhive sidecar`` with a local echo pool keeps serving afterwards."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.llmkit_peer import LlmkitPeer, complete_params

MAX_LINE = 1 << 20


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmkitPeer]:
    tmp = tmp_path_factory.mktemp("sidecar-input")
    peer = LlmkitPeer([sys.executable, "-m", "tokenhive.clients.cli.main", "sidecar",
                       "--backend", "echo", "--model", "echo",
                       "--max-line-bytes", str(MAX_LINE)],
                      tmp / "sidecar.stderr", env={"TOKENHIVE_BROKER": ""})
    try:
        reply = peer.call("init", {"backend": "transformers", "model": "echo"}, timeout=60)
        assert reply["result"]["ready"] is True, reply
        yield peer
        # a polite shutdown stops the local pool and removes its runtime directory; the
        # SIGKILL in stop() is only the fallback (a killed sidecar cannot clean up)
        assert "result" in peer.call("shutdown")
        assert peer.wait() == 0
    finally:
        peer.stop()


def error_of(peer: LlmkitPeer, line: bytes) -> dict[str, object]:
    peer.send_raw(line + b"\n")
    message = peer.read()
    assert set(message) == {"jsonrpc", "error", "id"}, message
    return message


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("line", "code", "request_id"), [
    (b"this is not json", -32700, None),
    (b'{"jsonrpc":"2.0","method":"complete","id":1', -32700, None),
    (b"[1,2,3]", -32600, None),
    (b'"just a string"', -32600, None),
    (b'{"jsonrpc":"1.0","method":"complete","id":7}', -32600, 7),
    (b'{"jsonrpc":"2.0","method":"complete","id":true}', -32600, None),
    (b'{"jsonrpc":"2.0","method":"complete","id":1.5}', -32600, None),
    (b'{"jsonrpc":"2.0","id":8}', -32600, 8),
    (b'{"jsonrpc":"2.0","method":"generate","params":{},"id":"abc"}', -32601, "abc"),
    (b'{"jsonrpc":"2.0","method":"complete","params":[1],"id":9}', -32602, 9),
    (b'{"jsonrpc":"2.0","method":"complete","params":{},"id":10}', -32602, 10),
    (b'{"jsonrpc":"2.0","method":"complete","params":{"messages":[{"role":"user"}]},"id":11}',
     -32602, 11),
    (b'{"jsonrpc":"2.0","method":"complete","params":{"messages":[{"role":"user",'
     b'"content":"x"}],"colour":"red"},"id":12}', -32602, 12),
    (b'{"jsonrpc":"2.0","method":"complete","params":{"messages":[{"role":"user",'
     b'"content":"x"}],"options":{"top_q":1}},"id":13}', -32602, 13),
    (b'{"jsonrpc":"2.0","method":"complete","params":{"messages":[{"role":"user",'
     b'"content":"x"}],"temperature":-1},"id":14}', -32602, 14),
    (b'{"jsonrpc":"2.0","method":"complete","params":{"messages":[{"role":"robot",'
     b'"content":"x"}]},"id":15}', -32602, 15),
    (b'{"jsonrpc":"2.0","method":"init","params":{"backend":"ollama"},"id":16}', -32602, 16),
])
def test_bad_messages_get_their_error(sidecar: LlmkitPeer, line: bytes, code: int,
                                      request_id: object) -> None:
    message = error_of(sidecar, line)
    assert message["id"] == request_id and message["error"]["code"] == code, message
    # and the sidecar still serves
    assert sidecar.call("complete", complete_params("still here"))["result"]["content"] \
        == "still here"


@pytest.mark.timeout(60)
def test_notifications_and_blank_lines_get_no_answer(sidecar: LlmkitPeer) -> None:
    sidecar.notify("$/progress", {"x": 1})
    sidecar.send_raw(b'{"jsonrpc":"2.0","method":"complete","params":{}}\n')  # no id
    sidecar.send_raw(b"\n  \n")
    reply = sidecar.call("complete", complete_params("next"))  # the very next line is this
    assert reply["result"]["content"] == "next"


@pytest.mark.timeout(60)
def test_a_bad_stream_start_is_answered_with_stream_error(sidecar: LlmkitPeer) -> None:
    sidecar.notify("stream.start", {"messages": "not a list", "stream": True})
    message = sidecar.read()
    assert message["method"] == "stream.error" and set(message) == {"jsonrpc", "method",
                                                                     "params"}
    assert message["params"]["code"] == -32602


@pytest.mark.timeout(120)
def test_a_100_mb_line_is_discarded_with_bounded_memory(sidecar: LlmkitPeer) -> None:
    before = _peak_rss_kb(sidecar.proc.pid)
    block = b'{"jsonrpc":"2.0","method":"complete","params":{"messages":[{"content":"' \
        + b"x" * (1 << 20)
    sidecar.send_raw(block)
    for _ in range(99):
        sidecar.send_raw(b"y" * (1 << 20))
    sidecar.send_raw(b'"}]},"id":99}\n')
    message = sidecar.read()
    assert message["id"] is None and message["error"]["code"] == -32600
    assert f"longer than {MAX_LINE} bytes" in message["error"]["message"]
    # the tail of the long line was dropped, not read as a message of its own
    assert sidecar.call("complete", complete_params("after"))["result"]["content"] == "after"
    assert _peak_rss_kb(sidecar.proc.pid) - before < 32 * 1024


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")
