"""The echo backend, in-process: tokens, limits, stops, pacing, embeddings, test hooks."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenhive.schemas.config import EchoSpec
from tokenhive.schemas.errors import (
    BackendError,
    ContextTooLong,
    InternalError,
    ModelLoadFailed,
    RateLimited,
)
from tokenhive.schemas.messages import Health, Kind, Message, Request, Sampling
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends import make_backend
from tokenhive.workers.backends.echo import FILLER, EchoBackend, cut_at_stop, split_tokens

pytestmark = pytest.mark.timeout(30)


def echo(**spec: Any) -> EchoBackend:
    backend = EchoBackend(EchoSpec(model="echo", **spec))
    asyncio.run(backend.start())
    return backend


def request(prompt: str | None = "hi there", **kw: Any) -> Request:
    return Request(id="r", model="echo", kind=Kind.COMPLETION, prompt=prompt, **kw)


async def _drain(backend: EchoBackend, req: Request) -> tuple[list[Delta], Done]:
    deltas: list[Delta] = []
    done: Done | None = None
    async for item in backend.stream(req):
        assert done is None, "nothing may follow Done"
        if isinstance(item, Done):
            done = item
        else:
            deltas.append(item)
    assert done is not None, "the stream must end with Done"
    return deltas, done


def run(backend: EchoBackend, req: Request) -> tuple[str, list[Delta], Done]:
    deltas, done = asyncio.run(_drain(backend, req))
    return "".join(d.text for d in deltas), deltas, done


# Every kind of character split_tokens has to tell apart: ASCII and Unicode whitespace (what
# str.split and re's \s both count: NEL, NBSP, ogham, em, line separator, ideographic, the
# \x1c-\x1f separators), characters that look blank but are not whitespace (zero-width
# space, BOM, NUL), letters, a combining accent, CJK, an astral emoji. A small explicit
# alphabet keeps Hypothesis from building its Unicode tables (seconds on a cold machine, far
# more under load) and still reaches every case split_tokens distinguishes.
ALPHABET = "ab Z\t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2003\u2028\u3000\u200b\ufeff\x00e\u0301日👍"
TRICKY = ["", " ", "a", "  lead", "trail  ", "one two  three", "\n", "\t\n \r", "a\xa0b",
          "x\u2028y\u3000z", "zero\u200bwidth", "\ufeffbom", "nul\x00", "e\u0301 é",
          "日本語 テキスト", "emoji 👍🏽 ok", "\x1c\x1d\x1e\x1f", "sep\x85nel", "a" * 1000 + " "]


def check_split(text: str) -> None:
    pieces = split_tokens(text)
    assert "".join(pieces) == text
    assert all(piece for piece in pieces)
    # one piece per word (with the whitespace before it), plus one for trailing whitespace
    trailing = bool(text) and text[-1].isspace()
    assert len(pieces) == len(text.split()) + trailing
    assert all(len(piece.split()) == 1 for piece in pieces[: len(pieces) - trailing])


@pytest.mark.parametrize("text", TRICKY)
def test_tokens_join_back_to_the_source_tricky(text: str) -> None:
    check_split(text)


@settings(derandomize=True, max_examples=200, deadline=None, database=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_tokens_join_back_to_the_source(text: str) -> None:
    check_split(text)


def test_streams_the_script_with_exact_usage() -> None:
    text, deltas, done = run(echo(text="The quick  brown fox.\n"), request("one two three"))
    assert text == "The quick  brown fox.\n"
    assert [d.text for d in deltas] == ["The", " quick", "  brown", " fox.", "\n"]
    assert all(d.tokens == 1 for d in deltas)
    assert done.finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 5)
    assert done.usage.total_tokens == 8


def test_echoes_the_prompt_or_the_last_user_message() -> None:
    backend = echo()
    assert run(backend, request("say this back"))[0] == "say this back"
    chat = Request(id="c", model="echo", messages=[
        Message("system", "be brief"), Message("user", "first question"),
        Message("assistant", "answer"), Message("user", "second question"),
    ])
    text, _, done = run(backend, chat)
    assert text == "second question"
    assert done.usage.prompt_tokens == 2 + 2 + 1 + 2  # every message's words


def test_exact_token_count_cycles_the_script() -> None:
    text, deltas, done = run(echo(text="a b c", tokens=7), request())
    assert len(deltas) == 7 == done.usage.completion_tokens
    assert text == "a b ca b ca"
    text, deltas, _ = run(echo(tokens=3), request(""))
    assert text == FILLER * 3


def test_max_tokens_cuts_with_finish_length() -> None:
    backend = echo(text="one two three four five")
    text, deltas, done = run(backend, request(sampling=Sampling(max_tokens=2)))
    assert (text, done.finish_reason, done.usage.completion_tokens) == ("one two", "length", 2)
    _, _, done = run(backend, request(sampling=Sampling(max_tokens=5)))
    assert done.finish_reason == "stop"  # the script ended by itself
    text, deltas, done = run(backend, request(sampling=Sampling(max_tokens=0)))
    assert (text, deltas, done.finish_reason) == ("", [], "length")


def test_stop_sequences_cut_before_the_stop() -> None:
    backend = echo(text="hello world. and more text")
    text, _, done = run(backend, request(sampling=Sampling(stop=["."])))
    assert (text, done.finish_reason) == ("hello world", "stop")
    # A stop sequence spanning two tokens, and the earliest of several wins.
    text, deltas, done = run(backend, request(sampling=Sampling(stop=["more", "o w"])))
    assert (text, done.finish_reason) == ("hell", "stop")
    assert done.usage.completion_tokens == len(deltas) == 1
    text, _, done = run(backend, request(sampling=Sampling(stop=["absent"], max_tokens=2)))
    assert (text, done.finish_reason) == ("hello world.", "length")


def test_cut_at_stop_keeps_everything_without_a_match() -> None:
    assert cut_at_stop(["a", " b"], ["", "zz"]) == (["a", " b"], False)
    assert cut_at_stop(["a", " b"], ["a"]) == ([], True)


def test_rate_paces_tokens_on_an_absolute_schedule() -> None:
    backend = echo(text=" x" * 20, tokens_per_s=100)
    started = time.monotonic()
    _, deltas, _ = run(backend, request())
    elapsed = time.monotonic() - started
    assert len(deltas) == 20
    assert 0.18 <= elapsed < 1.5  # token i is due at i/100 s; the last at 0.19 s


def test_flat_out_stream_yields_to_the_loop() -> None:
    backend = echo(tokens=2000)

    async def main() -> int:
        ticks = 0
        stop = asyncio.Event()

        async def other_task() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(other_task())
        await _drain(backend, request())
        stop.set()
        await other
        return ticks

    assert asyncio.run(main()) >= 2000 // 8 // 2  # another task ran while it streamed


def test_closing_the_stream_midway_stops_it() -> None:
    backend = echo(tokens=1_000_000, tokens_per_s=1000)

    async def main() -> int:
        stream = backend.stream(request())
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        return got

    assert asyncio.run(main()) == 3


def test_embeddings_are_deterministic_unit_vectors() -> None:
    backend = echo(embedding_dim=16)
    req = Request(id="e", model="echo", kind=Kind.EMBEDDING, input=["alpha", "beta gamma", "alpha"])
    result = asyncio.run(backend.embed(req))
    assert len(result.vectors) == 3 and all(len(v) == 16 for v in result.vectors)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-9) for v in result.vectors)
    assert result.vectors[0] == result.vectors[2] != result.vectors[1]
    assert result.usage.prompt_tokens == 4
    again = asyncio.run(echo(embedding_dim=16).embed(req))
    assert again.vectors == result.vectors


def test_info_and_registry() -> None:
    backend = make_backend(EchoSpec(model="m", context_length=77))
    assert isinstance(backend, EchoBackend)
    info = backend.info()
    assert (info.backend, info.context_length, info.device) == ("echo", 77, "cpu")
    assert set(info.kinds) == {Kind.CHAT, Kind.COMPLETION, Kind.EMBEDDING}


@pytest.mark.parametrize(("field", "value"), [
    ("tokens_per_s", -1.0), ("tokens", -2), ("load_seconds", -0.5), ("embedding_dim", 0),
])
def test_start_rejects_impossible_settings(field: str, value: float) -> None:
    backend = EchoBackend(EchoSpec(model="echo", **{field: value}))
    with pytest.raises(ModelLoadFailed, match=field):
        asyncio.run(backend.start())


def test_load_seconds_simulates_a_slow_load() -> None:
    backend = EchoBackend(EchoSpec(model="echo", load_seconds=0.2))
    started = time.monotonic()
    asyncio.run(backend.start())
    assert time.monotonic() - started >= 0.2


def test_prompt_longer_than_context_is_refused() -> None:
    with pytest.raises(ContextTooLong, match="4 tokens"):
        run(echo(context_length=3), request("one two three four"))
    assert run(echo(context_length=4), request("one two three four"))[0] == "one two three four"


def test_fail_hook_raises_the_named_error_after_n_tokens() -> None:
    backend = echo(text="a b c d")

    async def until_error(req: Request) -> tuple[int, BaseException]:
        got = 0
        try:
            async for item in backend.stream(req):
                got += isinstance(item, Delta)
        except BaseException as exc:
            return got, exc
        raise AssertionError("no error raised")

    got, exc = asyncio.run(until_error(request(metadata={"echo_fail": "backend_error"})))
    assert got == 0 and isinstance(exc, BackendError)
    meta = {"echo_fail": "crash", "echo_fail_after": "2"}
    got, exc = asyncio.run(until_error(request(metadata=meta)))
    assert got == 2 and type(exc) is RuntimeError
    got, exc = asyncio.run(until_error(request(metadata={"echo_fail": "no_such_code"})))
    assert isinstance(exc, InternalError)
    meta = {"echo_fail": "backend_error", "echo_fail_after": "4"}  # after the last token
    got, exc = asyncio.run(until_error(request(metadata=meta)))
    assert got == 4 and isinstance(exc, BackendError)


def test_rate_limit_hook_reports_retry_after_in_health() -> None:
    backend = echo(text="a b")
    assert backend.health().health == Health.OK
    meta = {"echo_fail": "rate_limited", "echo_retry_after": "0.3"}
    with pytest.raises(RateLimited) as caught:
        run(backend, request(metadata=meta))
    assert caught.value.retry_after == 0.3 and caught.value.retryable
    report = backend.health()
    assert report.health == Health.DEGRADED
    assert report.retry_after is not None and 0 < report.retry_after <= 0.3
    deadline = time.monotonic() + 5
    while backend.health().health != Health.OK:  # polls with a deadline until it passes
        assert time.monotonic() < deadline, "rate limit never lifted"
        time.sleep(0.02)
    assert backend.health().retry_after is None


def test_embed_honours_the_fail_hook() -> None:
    req = Request(id="e", model="echo", kind=Kind.EMBEDDING, input=["x"],
                  metadata={"echo_fail": "backend_unavailable"})
    with pytest.raises(Exception, match="simulated backend_unavailable"):
        asyncio.run(echo().embed(req))
