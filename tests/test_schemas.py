"""Property-based round trips for every wire message and config struct, plus the error table."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenhive.schemas import config, frames
from tokenhive.schemas import messages as m
from tokenhive.schemas.errors import RETRYABLE, ErrorCode, TokenHiveError, error_class
from tokenhive.schemas.validation import validated

pytestmark = pytest.mark.timeout(120)

# An explicit alphabet (ASCII, controls, multi-byte, astral, a lone surrogate's neighbours):
# hypothesis builds no Unicode tables for it, so the first run on a cold machine is fast too.
ALPHABET = "".join(map(chr, range(0x20, 0x7F))) + "\x00\t\n\r\x7f é日本語€\u2028\ufeff😀𝄞"
text = st.text(alphabet=ALPHABET, max_size=40)
ident = st.text(alphabet=ALPHABET, min_size=1, max_size=20)
small = st.integers(min_value=0, max_value=2**31)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
opt = st.none


def between(lo: float, hi: float, *, exclude_min: bool = False) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, exclude_min=exclude_min, allow_nan=False)


# Only values inside the ranges the types declare (msgspec.Meta): others do not decode.
sampling = st.builds(
    m.Sampling,
    max_tokens=opt() | st.integers(1, 2**31), temperature=opt() | between(0, 2),
    top_p=opt() | between(0, 1, exclude_min=True), top_k=opt() | small,
    min_p=opt() | between(0, 1), repeat_penalty=opt() | between(0, 10, exclude_min=True),
    presence_penalty=opt() | between(-2, 2), frequency_penalty=opt() | between(-2, 2),
    stop=st.lists(text, max_size=3), seed=opt() | st.integers(0, m.MAX_SEED),
)
message = st.builds(m.Message, role=st.sampled_from(["system", "user", "assistant"]), content=text)
request = st.builds(
    m.Request, id=ident, model=ident, kind=st.sampled_from(list(m.Kind)),
    messages=st.lists(message, max_size=4), prompt=opt() | text, input=st.lists(text, max_size=3),
    sampling=sampling, stream=st.booleans(), priority=st.sampled_from(list(m.Priority)),
    deadline=opt() | floats, timeout=opt() | floats,
    metadata=st.dictionaries(ident, text, max_size=3),
)
usage = st.builds(m.Usage, prompt_tokens=small, completion_tokens=small, total_tokens=small,
                  estimated=st.booleans())
timings = st.builds(m.Timings, queue_ms=floats, ttft_ms=floats, total_ms=floats)
chunk = st.builds(m.Chunk, id=ident, seq=small, text=text, tokens=small)
final = st.builds(
    m.Final, id=ident, chunks=small, finish_reason=st.sampled_from(["stop", "length"]),
    usage=usage, timings=timings, worker=text,
    embeddings=opt() | st.lists(st.lists(floats, max_size=4), max_size=3),
)
error = st.builds(
    m.Error, id=text, code=st.sampled_from(list(ErrorCode)), message=text,
    retryable=st.booleans(), chunks_sent=small, retry_after=opt() | floats, worker=text,
)
health = st.sampled_from(list(m.Health))
worker_status = st.builds(
    m.WorkerStatus, id=ident, model=ident, backend=ident, health=text, slots=small,
    free_slots=small, in_flight=small, served=small, failed=small, latency_ms=floats,
)

client_msgs = st.one_of(
    st.builds(m.Submit, request=request), st.builds(m.Cancel, id=ident),
    st.builds(m.Ping, at=floats), st.just(m.StatusQuery()),
)
to_client_msgs = st.one_of(
    chunk, final, error, st.builds(m.Pong, at=floats),
    st.builds(m.StatusReply, workers=st.lists(worker_status, max_size=3),
              queues=st.dictionaries(ident, small, max_size=3), in_flight=small,
              counters=st.dictionaries(ident, small, max_size=3), uptime_s=floats),
)
worker_msgs = st.one_of(
    st.builds(m.Ready, worker=ident, model=ident, backend=ident, slots=small,
              context_length=small, device=text, kinds=st.lists(st.sampled_from(list(m.Kind))),
              pid=small, memory_mb=floats, health=health, detail=text),
    st.builds(m.Heartbeat, worker=ident, free_slots=small, in_flight=small, health=health,
              detail=text, memory_mb=floats, retry_after=opt() | floats),
    st.builds(m.Goodbye, worker=ident, reason=text, code=opt() | st.sampled_from(list(ErrorCode))),
)
to_worker_msgs = st.one_of(
    st.builds(m.Dispatch, key=st.binary(min_size=1, max_size=8), request=request,
              queued_ms=floats, attempt=st.integers(1, 5)),
    st.builds(m.CancelWork, key=st.binary(min_size=1, max_size=8),
              reason=st.sampled_from(list(ErrorCode))),
    st.builds(m.BrokerPing, at=floats), st.just(m.Reregister()),
    st.builds(m.Rejected, code=st.sampled_from(list(ErrorCode)), message=text),
)


@settings(max_examples=200)
@given(client_msgs)
def test_client_messages_round_trip(msg: object) -> None:
    assert frames.client_msg_decoder.decode(frames.encode(msg)) == msg


@settings(max_examples=200)
@given(to_client_msgs)
def test_broker_to_client_messages_round_trip(msg: object) -> None:
    assert frames.broker_to_client_decoder.decode(frames.encode(msg)) == msg


@settings(max_examples=200)
@given(st.one_of(chunk, final, error))
def test_stream_messages_decode_with_both_decoders(msg: object) -> None:
    """A worker's stream body is forwarded unchanged, so the client decoder must read it."""
    body = frames.encode(msg)
    assert frames.stream_decoder.decode(body) == msg
    assert frames.broker_to_client_decoder.decode(body) == msg


@settings(max_examples=200)
@given(worker_msgs)
def test_worker_messages_round_trip(msg: object) -> None:
    assert frames.worker_msg_decoder.decode(frames.encode(msg)) == msg


@settings(max_examples=200)
@given(to_worker_msgs)
def test_broker_to_worker_messages_round_trip(msg: object) -> None:
    assert frames.broker_to_worker_decoder.decode(frames.encode(msg)) == msg


limits = st.builds(config.Limits, max_stop=small, max_prompt_chars=small,
                   max_message_bytes=st.integers(4096, 2**40))


@settings(max_examples=100)
@given(st.builds(config.BrokerConfig, heartbeat_interval=st.floats(0.01, 10), queue_size=small,
                 limits=limits))
def test_broker_config_round_trips_through_toml(cfg: config.BrokerConfig) -> None:
    pool = config.PoolConfig(broker=cfg, workers=[config.EchoSpec(model="e", slots=2)])
    text = msgspec.toml.encode(_drop_none(msgspec.to_builtins(pool)))
    assert config.load_pool_config(text) == pool


def _drop_none(value: object) -> object:
    """TOML has no null: an absent key means the default (None)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


OUT_OF_RANGE = [
    ("max_tokens", 0), ("temperature", -0.1), ("temperature", 2.5), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", -0.1), ("min_p", 1.1),
    ("repeat_penalty", 0.0), ("repeat_penalty", 11.0), ("presence_penalty", -2.1),
    ("frequency_penalty", float("nan")), ("seed", -1), ("seed", m.MAX_SEED + 1),
]


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
def test_out_of_range_sampling_does_not_decode_and_names_the_field(
    field: str, value: float
) -> None:
    body = frames.encode(m.Submit(request=m.Request(
        id="r", model="m", sampling=m.Sampling(**{field: value}))))  # type: ignore[arg-type]
    with pytest.raises(msgspec.ValidationError, match=rf"`\$\.request\.sampling\.{field}`"):
        frames.client_msg_decoder.decode(body)
    with pytest.raises(TokenHiveError, match=rf"sampling\.{field}"):  # built in Python
        validated(m.Sampling(**{field: value}), "sampling")  # type: ignore[arg-type]


@settings(max_examples=200)
@given(st.integers(-(2**63), 2**63 - 1).filter(lambda p: p not in set(m.Priority)))
def test_priority_outside_the_levels_does_not_decode(priority: int) -> None:
    body = frames.encode(m.Submit(request=m.Request(id="r", model="m", priority=priority)))
    with pytest.raises(msgspec.ValidationError, match=r"`\$\.request\.priority`"):
        frames.client_msg_decoder.decode(body)


def test_chunk_is_compact() -> None:
    body = frames.encode(m.Chunk(id="r1", seq=7, text="hi", tokens=1, cumulative_tokens=1))
    # array-like: no field names on the hot path; each field appended since (msgspec writes
    # trailing defaults of array-like structs too) costs one byte
    assert len(body) <= 12 + len(m.Chunk.__struct_fields__) - 4
    assert b"text" not in body and b"tokens" not in body


def test_unknown_config_key_names_the_key() -> None:
    with pytest.raises(msgspec.ValidationError, match="bogus"):
        config.load_pool_config('[[workers]]\nbackend = "echo"\nmodel = "e"\nbogus = 1\n')
    with pytest.raises(msgspec.ValidationError, match="nope"):
        config.load_pool_config("[broker]\nnope = 1\n")


def test_version_frame() -> None:
    assert frames.version_of(frames.VERSION_FRAME) == frames.PROTOCOL_VERSION
    assert frames.version_of(b"TH\x09") == 9
    assert frames.version_of(b"garbage") is None


def test_every_code_has_a_retry_flag_and_an_exception() -> None:
    for code in ErrorCode:
        assert code in RETRYABLE
        cls = error_class(code)
        assert issubclass(cls, TokenHiveError) and cls.code is code


def test_error_round_trips_to_the_same_exception() -> None:
    exc = error_class(ErrorCode.RATE_LIMITED)("slow down", retry_after=2.5)
    wire = frames.stream_decoder.decode(frames.encode(m.Error.of("r9", exc, chunks_sent=3)))
    assert isinstance(wire, m.Error)
    back = wire.to_exception()
    assert type(back) is type(exc)
    got = (back.retry_after, back.chunks_sent, back.request_id, back.retryable)
    assert got == (2.5, 3, "r9", True)
