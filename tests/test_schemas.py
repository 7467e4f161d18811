"""Property-based round trips for every wire message and config struct, plus the error table."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenhive.schemas import config, frames
from tokenhive.schemas import messages as m
from tokenhive.schemas.errors import RETRYABLE, ErrorCode, TokenHiveError, error_class

pytestmark = pytest.mark.timeout(120)

text = st.text(max_size=40)
ident = st.text(min_size=1, max_size=20)
small = st.integers(min_value=0, max_value=2**31)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
opt = st.none

sampling = st.builds(
    m.Sampling,
    max_tokens=opt() | small, temperature=opt() | floats, top_p=opt() | floats,
    top_k=opt() | small, stop=st.lists(text, max_size=3), seed=opt() | small,
)
message = st.builds(m.Message, role=st.sampled_from(["system", "user", "assistant"]), content=text)
request = st.builds(
    m.Request, id=ident, model=ident, kind=st.sampled_from(list(m.Kind)),
    messages=st.lists(message, max_size=4), prompt=opt() | text, input=st.lists(text, max_size=3),
    sampling=sampling, stream=st.booleans(), priority=st.integers(0, 2),
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


@settings(max_examples=100)
@given(st.builds(config.BrokerConfig, heartbeat_interval=st.floats(0.01, 10), queue_size=small))
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


def test_chunk_is_compact() -> None:
    body = frames.encode(m.Chunk(id="r1", seq=7, text="hi", tokens=1))
    assert len(body) <= 12  # array-like: no field names on the hot path


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
