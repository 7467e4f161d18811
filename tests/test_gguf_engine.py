"""The GGUF engine's parts: incremental detokenizing, stop matching, sampling checks, slot
choice — and the engine itself on a real (tiny) llama.cpp model: a linear token path, and
real llama_decode failures turning into per-request errors and a degraded health."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from pathlib import Path

import llama_cpp
import pytest

from tokenhive.schemas.config import GGUFSpec
from tokenhive.schemas.errors import BackendError, InvalidRequest
from tokenhive.schemas.messages import Health, Kind, Request, Sampling
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends.gguf import GGUFBackend
from tokenhive.workers.gguf.detok import Detokenizer, PieceCache
from tokenhive.workers.gguf.native import LlamaNative, NativeParams
from tokenhive.workers.gguf.sampling import check_sampling
from tokenhive.workers.gguf.slots import Slot, pick_slot
from tokenhive.workers.stops import StopMatcher


@pytest.fixture(scope="module")
def tiny(tiny_gguf: Path) -> Path:
    return tiny_gguf  # the session's tiny model (tests/conftest.py)


@pytest.fixture(scope="module")
def native(tiny: Path) -> LlamaNative:
    return LlamaNative(NativeParams(path=tiny, slots=1, n_ctx=256, n_batch=64, n_threads=1))


# --- detokenizer ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_incremental_detok_equals_whole_decode_and_feeds_each_byte_once(
    native: LlamaNative,
) -> None:
    # Text with multi-byte characters the tiny vocabulary only has as byte tokens, so
    # characters are split across tokens and must wait in the pending buffer.
    text = "héllo wörld — naïve café ☕ 日本語 " * 40
    tokens = native.tokenize(text, add_bos=False)
    pieces = PieceCache(native.piece)
    detok = Detokenizer(pieces)
    out = "".join(detok.push(t) for t in tokens) + detok.flush()
    whole = b"".join(native.piece(t) for t in tokens)
    assert out == whole.decode("utf-8") == " " + text  # SentencePiece's dummy-prefix space
    assert detok.bytes_fed == len(whole)  # every byte decoded once: linear, not quadratic
    assert pieces.lookups == len(set(tokens))  # llama.cpp asked once per distinct token


@pytest.mark.timeout(60)
def test_detok_cost_per_token_does_not_grow_with_output_length(native: LlamaNative) -> None:
    # Counted, not timed: each block of tokens decodes exactly its own bytes, however much
    # output came before it (quadratic re-detokenization would re-feed all earlier bytes).
    tokens = native.tokenize("the cat and the dog went over the river stone " * 2000, False)
    assert len(tokens) > 20_000
    detok = Detokenizer(PieceCache(native.piece))
    block = 2_000
    for start in range(0, len(tokens) - block + 1, block):
        chunk = tokens[start : start + block]
        before = detok.bytes_fed
        for t in chunk:
            detok.push(t)
        assert detok.bytes_fed - before == sum(len(native.piece(t)) for t in chunk)


def test_invalid_utf8_becomes_replacement_not_an_exception(native: LlamaNative) -> None:
    texts = {llama_cpp.llama_vocab_get_text(native.vocab, t): t for t in range(native.n_vocab)}
    byte_ff = texts[b"<0xFF>"]
    assert native.piece(byte_ff) == b"\xff"
    detok = Detokenizer(PieceCache(native.piece))
    assert detok.push(byte_ff) + detok.flush() == "\ufffd"


# --- stop sequences --------------------------------------------------------------------------


def test_stop_spanning_chunks_is_cut_and_never_half_emitted() -> None:
    m = StopMatcher(["END"])
    assert m.feed("hello E") == "hello "  # "E" could start "END": held
    assert m.feed("N") == ""
    assert m.feed("D and more") == ""
    assert m.stopped


def test_stop_prefix_that_turns_out_not_to_be_a_stop_is_released() -> None:
    m = StopMatcher(["END"])
    assert m.feed("abc EN") == "abc "
    assert m.feed("X") == "ENX"
    assert m.feed("E") == ""
    assert m.flush() == "E"
    assert not m.stopped


def test_earliest_of_several_stops_wins() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hello world") == "hel"
    assert m.stopped


def test_no_stops_passes_text_through() -> None:
    m = StopMatcher(["", ""])
    assert m.feed("abc") == "abc"
    assert m.flush() == ""


# --- sampling checks and slot choice -------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        Sampling(max_tokens=0), Sampling(temperature=-0.1), Sampling(top_p=0.0),
        Sampling(top_p=1.5), Sampling(top_k=-1), Sampling(min_p=2.0),
        Sampling(repeat_penalty=0.0), Sampling(presence_penalty=3.0),
        Sampling(frequency_penalty=float("nan")), Sampling(seed=-1), Sampling(seed=2**32),
    ],
)
def test_bad_sampling_is_invalid_request_naming_the_field(bad: Sampling) -> None:
    with pytest.raises(InvalidRequest, match=r"sampling\.\w+"):
        check_sampling(bad)


def test_pick_slot_prefers_longest_prefix_then_least_recent() -> None:
    a, b, c = Slot(0, [1, 2, 3, 4], last_used=5), Slot(1, [1, 2, 9], last_used=1), Slot(2)
    assert pick_slot([a, b, c], [1, 2, 3, 4, 5], reuse=True) == (a, 4)
    # the last prompt token is always re-decoded (its logits give the first output token)
    assert pick_slot([a, b, c], [1, 2, 3, 4], reuse=True) == (a, 3)
    assert pick_slot([a, b, c], [7, 7], reuse=True) == (c, 0)  # no prefix: LRU (c: 0)
    assert pick_slot([a, b], [1, 2, 3, 4, 5], reuse=False) == (b, 0)


# --- the engine on the tiny model -----------------------------------------------------------------


async def _generate(backend: GGUFBackend, prompt: str, n: int) -> tuple[list[float], Done]:
    """Arrival time of every token, and the Done."""
    times: list[float] = []
    async for ev in backend.stream(
        Request(id="r", model="tiny", kind=Kind.COMPLETION, prompt=prompt,
                sampling=Sampling(max_tokens=n))
    ):
        if isinstance(ev, Delta):
            times += [time.perf_counter()] * ev.tokens
        else:
            return times, ev
    raise AssertionError("stream ended without Done")


@pytest.mark.timeout(120)
def test_token_path_is_linear_over_a_long_generation(tiny: Path) -> None:
    spec = GGUFSpec(model="tiny", path=str(tiny), n_threads=1, n_ctx=2048)

    async def main() -> None:
        async with GGUFBackend(spec) as b:
            times, done = await _generate(b, "Once upon a time", 1500)
            assert done.usage.completion_tokens == len(times) == 1500
            gaps = [t1 - t0 for t0, t1 in itertools.pairwise(times)]
            early, late = statistics.median(gaps[50:300]), statistics.median(gaps[-250:])
            # A quadratic token path (re-detokenizing the whole output per token) makes
            # late tokens several times slower than early ones; attention over a longer
            # context costs this tiny model little. Generous bound for a shared machine.
            assert late < 3 * early + 0.002, (early, late)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_real_decode_errors_fail_their_requests_and_degrade_health(tiny: Path) -> None:
    """Make llama_decode really fail: drop most of a running sequence's KV cache behind the
    engine's back (on the engine thread), so its next batch has inconsistent positions."""
    spec = GGUFSpec(model="tiny", path=str(tiny), n_threads=1, n_ctx=512, degraded_after_errors=2)

    async def break_one(b: GGUFBackend) -> None:
        engine = b.engine
        assert engine is not None
        stream = b.stream(Request(id="x", model="tiny", kind=Kind.COMPLETION, prompt="hi",
                                  sampling=Sampling(max_tokens=400)))
        await anext(stream)  # generating now
        wipe = engine.call(lambda e: e.native.seq_rm(e._slots[0].seq_id, 1, -1))
        await asyncio.wrap_future(wipe)
        with pytest.raises(BackendError, match="llama_decode failed"):
            async for _ in stream:
                pass

    async def main() -> None:
        async with GGUFBackend(spec) as b:
            assert b.health().health is Health.OK
            await break_one(b)
            assert b.health().health is Health.OK  # one error: not yet
            await break_one(b)
            report = b.health()
            assert report.health is Health.DEGRADED and "llama_decode" in report.detail
            _, done = await _generate(b, "fine again", 5)  # the engine still serves
            assert done.finish_reason == "length"
            assert b.health().health is Health.OK

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_engine_close_answers_every_outstanding_request(tiny: Path) -> None:
    spec = GGUFSpec(model="tiny", path=str(tiny), n_threads=1, n_ctx=512)  # one slot

    async def main() -> None:
        async with GGUFBackend(spec) as b:
            engine = b.engine
            assert engine is not None
            streams = [
                b.stream(Request(id=str(i), model="t", kind=Kind.COMPLETION, prompt="a b c",
                                 sampling=Sampling(max_tokens=500)))
                for i in range(3)
            ]
            assert isinstance(await anext(streams[0]), Delta)  # running
            queued = [asyncio.ensure_future(anext(s)) for s in streams[1:]]
            deadline = time.monotonic() + 10
            while await asyncio.wrap_future(engine.call(lambda e: len(e._waiting))) < 2:
                assert time.monotonic() < deadline, "the two requests never queued"
            await asyncio.to_thread(engine.close)
            for fut in queued:
                with pytest.raises(BackendError, match="shut down"):
                    await fut
            with pytest.raises(BackendError, match="shut down"):
                async for _ in streams[0]:
                    pass
            # a stopped engine is reported, and refuses work instead of leaving it unanswered
            assert b.health().health is Health.UNHEALTHY
            with pytest.raises(BackendError, match="not running"):
                await anext(b.stream(Request(id="late", model="t", kind=Kind.COMPLETION,
                                             prompt="a")))

    asyncio.run(main())
