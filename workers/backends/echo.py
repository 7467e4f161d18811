"""The echo backend: deterministic text at a set rate, for tests and benchmarks.

It streams ``spec.text`` (or, when that is empty, the prompt / last user message) split into
word-ish tokens that keep their leading whitespace, so the joined tokens equal the source
exactly. ``tokens`` fixes the count (cycling the script), ``tokens_per_s`` paces it,
``sampling.max_tokens`` and ``sampling.stop`` behave as they do for a real model, and usage is
exact (a token is a word-ish piece; prompt tokens are the prompt's words).

Test hook (documented, deliberate): request metadata ``echo_fail`` makes ``stream``/``embed``
raise the exception for that error code (``backend_error``, ``rate_limited``,
``context_too_long``, ...; ``crash`` raises a plain RuntimeError) after ``echo_fail_after``
tokens (default 0). ``echo_retry_after`` sets the RateLimited retry_after (default 1.0 s), and
while it lasts ``health()`` reports degraded with that retry_after, as a rate-limited remote
backend would.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import re
import time
from collections.abc import AsyncIterator

from tokenhive.schemas.config import EchoSpec
from tokenhive.schemas.errors import ContextTooLong, ModelLoadFailed, RateLimited, error_class
from tokenhive.schemas.messages import Health, Kind, Request, Usage
from tokenhive.workers.backend import Backend, BackendInfo, Delta, Done, Embeddings, HealthReport

#: A token is a run of whitespace followed by a run of non-whitespace; trailing whitespace
#: is a token of its own. ``"".join(split_tokens(s)) == s`` for every ``s``.
_TOKEN = re.compile(r"\s*\S+|\s+")

#: What ``tokens=N`` cycles when there is no script and no prompt to echo.
FILLER = " echo"

#: With ``tokens_per_s == 0`` the stream yields to the event loop every this many tokens, so
#: heartbeats and other requests keep moving while one request runs flat out.
YIELD_EVERY = 8


def split_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def word_count(text: str) -> int:
    return len(text.split())


def prompt_text(request: Request) -> str:
    """What the request asks about: the prompt, or the last user message of a chat."""
    if request.prompt is not None:
        return request.prompt
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return request.messages[-1].content if request.messages else ""


def prompt_tokens(request: Request) -> int:
    if request.kind == Kind.EMBEDDING:
        return sum(word_count(item) for item in request.input)
    words = word_count(request.prompt or "")
    return words + sum(word_count(m.content) for m in request.messages)


def cut_at_stop(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """The pieces before the earliest stop sequence (the last one cut mid-way), and
    whether a stop sequence was found."""
    stops = [s for s in stops if s]
    if not stops:
        return pieces, False
    text = "".join(pieces)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not hits:
        return pieces, False
    end = min(hits)
    kept: list[str] = []
    pos = 0
    for piece in pieces:
        if pos + len(piece) <= end:
            kept.append(piece)
            pos += len(piece)
            continue
        if end > pos:
            kept.append(piece[: end - pos])
        break
    return kept, True


def vector_for(text: str, dim: int) -> list[float]:
    """A deterministic unit vector derived from a hash of ``text``."""
    raw = hashlib.shake_256(text.encode()).digest(4 * dim)
    values = [int.from_bytes(raw[i : i + 4], "little") / 2**31 - 1.0 for i in range(0, 4 * dim, 4)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


class EchoBackend(Backend):
    def __init__(self, spec: EchoSpec) -> None:
        self.spec = spec
        self._script = split_tokens(spec.text)  # split once: per-token cost stays tiny
        self._limited_until = 0.0

    async def start(self) -> None:
        spec = self.spec
        problems = [
            f"{name} must be >= 0 (got {value})"
            for name, value in (
                ("tokens_per_s", spec.tokens_per_s), ("tokens", spec.tokens or 0),
                ("load_seconds", spec.load_seconds), ("context_length", spec.context_length),
            )
            if value < 0
        ]
        if spec.embedding_dim <= 0:
            problems.append(f"embedding_dim must be > 0 (got {spec.embedding_dim})")
        if problems:
            raise ModelLoadFailed("echo: " + "; ".join(problems))
        if spec.load_seconds:
            await asyncio.sleep(spec.load_seconds)  # simulated load time, not synchronisation

    def info(self) -> BackendInfo:
        return BackendInfo(
            backend="echo", context_length=self.spec.context_length, device="cpu",
            kinds=[Kind.CHAT, Kind.COMPLETION, Kind.EMBEDDING],
        )

    def health(self) -> HealthReport:
        left = self._limited_until - time.monotonic()
        if left > 0:
            return HealthReport(Health.DEGRADED, "rate limited (echo_fail hook)", retry_after=left)
        return HealthReport()

    def _check(self, request: Request, at_token: int) -> None:
        """Raise the error the ``echo_fail`` test hook asks for, once ``at_token`` is reached."""
        fail = request.metadata.get("echo_fail") or self.spec.fail
        if not fail or at_token != int(request.metadata.get("echo_fail_after", "0")):
            return
        if fail == "crash":
            raise RuntimeError("echo: simulated crash")
        cls = error_class(fail)
        if cls is RateLimited:
            retry_after = float(request.metadata.get("echo_retry_after", "1.0"))
            self._limited_until = time.monotonic() + retry_after
            raise RateLimited("echo: simulated rate limit", retry_after=retry_after)
        raise cls(f"echo: simulated {fail}")

    def _pieces(self, request: Request) -> tuple[list[str], str]:
        """The tokens this request gets, and its finish reason."""
        script = self._script or split_tokens(prompt_text(request))
        count = len(script) if self.spec.tokens is None else self.spec.tokens
        finish = "stop"
        max_tokens = request.sampling.max_tokens
        if max_tokens is not None and max_tokens < count:
            count, finish = max(max_tokens, 0), "length"
        pieces = list(itertools.islice(itertools.cycle(script or [FILLER]), count))
        pieces, stopped = cut_at_stop(pieces, request.sampling.stop)
        return pieces, "stop" if stopped else finish

    async def stream(self, request: Request) -> AsyncIterator[Delta | Done]:
        used = prompt_tokens(request)
        if 0 < self.spec.context_length < used:
            raise ContextTooLong(
                f"prompt has {used} tokens; context length is {self.spec.context_length}"
            )
        pieces, finish = self._pieces(request)
        rate = self.spec.tokens_per_s
        start = time.monotonic()
        for i, piece in enumerate(pieces):
            self._check(request, i)
            if rate > 0:
                # An absolute schedule: token i is due at start + i/rate, so pacing never drifts.
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            yield Delta(piece, 1)
        self._check(request, len(pieces))
        yield Done(finish, Usage(used, len(pieces), used + len(pieces)))

    async def embed(self, request: Request) -> Embeddings:
        self._check(request, 0)
        used = prompt_tokens(request)
        vectors = [vector_for(item, self.spec.embedding_dim) for item in request.input]
        return Embeddings(vectors, Usage(used, 0, used))
