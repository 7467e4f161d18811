"""The gateway in the broker core, without sockets: groups, fallback before the first chunk
and never after, cooldowns, profiles with budgets, and cost.

Driven like tests/test_broker_core.py (its Harness: the frame lists the socket loop hands
the core, a recording sink, a clock the test advances), so waits are exact, not slept for.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from tests.test_broker_core import C1, Harness
from tokenhive.broker.validate import config_problems
from tokenhive.schemas.config import BrokerConfig, load_pool_config
from tokenhive.schemas.errors import ErrorCode
from tokenhive.schemas.frames import ROUTE_END, encode
from tokenhive.schemas.gateway_config import ModelGroup, ModelRoute, Price, Profile
from tokenhive.schemas.messages import (
    Chunk,
    Dispatch,
    Error,
    Final,
    Health,
    Kind,
    MarkModelFailed,
    Message,
    Sampling,
    Usage,
)

GROUP = {"chat": ModelGroup(models=["a", "b"])}


def gateway(**config: Any) -> Harness:
    h = Harness(**config)
    h.ready(b"wa", model="a")
    h.ready(b"wb", model="b")
    return h


def error(h: Harness, ident: bytes, key: bytes, rid: str, code: ErrorCode,
          **fields: Any) -> None:
    h.worker_frames(ident, ROUTE_END + key, encode(Error.make(rid, code, "upstream says no",
                                                              **fields)))


def final(h: Harness, ident: bytes, key: bytes, rid: str, usage: Usage | None = None,
          model: str = "") -> None:
    body = Final(id=rid, chunks=0, usage=usage or Usage(), model=model)
    h.worker_frames(ident, ROUTE_END + key, encode(body))


def only_answer(h: Harness, rid: str) -> Any:
    """The one terminal the client got for ``rid`` (exactly one, nothing after it)."""
    msgs = h.answers(C1)[rid]
    terminals = [m for m in msgs if isinstance(m, (Final, Error))]
    assert len(terminals) == 1 and msgs[-1] is terminals[0], msgs
    return terminals[0]


@pytest.mark.timeout(30)
def test_group_order_serves_from_the_first_model() -> None:
    h = gateway(groups=GROUP)
    h.submit("r1", model="chat")
    (d,) = h.dispatches(b"wa")
    assert d.request.model == "a" and h.dispatches(b"wb") == []
    final(h, b"wa", d.key, "r1", model="a")
    answer = only_answer(h, "r1")
    assert isinstance(answer, Final) and answer.model == "a" and answer.tried == []
    assert h.status().groups == {"chat": ["a", "b"]}


@pytest.mark.timeout(30)
def test_retryable_error_before_the_first_chunk_falls_back_with_one_answer() -> None:
    h = gateway(groups=GROUP)
    h.submit("r1", model="chat")
    (da,) = h.dispatches(b"wa")
    error(h, b"wa", da.key, "r1", ErrorCode.BACKEND_UNAVAILABLE)
    assert "r1" not in h.answers(C1)  # nothing sent yet: the request moved on
    (db,) = h.dispatches(b"wb")
    assert db.request.model == "b" and db.attempt == 1
    final(h, b"wb", db.key, "r1", model="b")
    answer = only_answer(h, "r1")
    assert isinstance(answer, Final) and answer.model == "b" and answer.tried == ["a"]
    counts = h.status().counters
    assert counts["fallbacks"] == 1 and counts["completed"] == 1 and counts["failed"] == 0


@pytest.mark.timeout(30)
def test_no_fallback_once_a_chunk_reached_the_client() -> None:
    h = gateway(groups=GROUP)
    h.submit("r1", model="chat")
    (da,) = h.dispatches(b"wa")
    h.chunk(b"wa", da.key, "r1", 0)
    error(h, b"wa", da.key, "r1", ErrorCode.BACKEND_ERROR, chunks_sent=1)
    assert h.dispatches(b"wb") == []
    msgs = h.answers(C1)["r1"]
    assert isinstance(msgs[0], Chunk) and len(msgs) == 2
    answer = only_answer(h, "r1")
    assert isinstance(answer, Error) and answer.code is ErrorCode.BACKEND_ERROR


@pytest.mark.timeout(30)
def test_not_retryable_errors_do_not_fall_back_and_exhausted_plans_say_what_was_tried() -> None:
    h = gateway(groups=GROUP)
    h.submit("bad", model="chat")
    (da,) = h.dispatches(b"wa")
    error(h, b"wa", da.key, "bad", ErrorCode.INVALID_REQUEST)
    assert only_answer(h, "bad").code is ErrorCode.INVALID_REQUEST
    assert h.dispatches(b"wb") == []

    h.submit("r2", model="chat")
    da = h.dispatches(b"wa")[-1]
    error(h, b"wa", da.key, "r2", ErrorCode.BACKEND_ERROR)
    (db,) = h.dispatches(b"wb")
    error(h, b"wb", db.key, "r2", ErrorCode.BACKEND_ERROR)
    answer = only_answer(h, "r2")
    assert isinstance(answer, Error) and answer.code is ErrorCode.BACKEND_ERROR
    assert answer.tried == ["a"]  # then b, whose Error this is


@pytest.mark.timeout(30)
def test_model_fallbacks_and_context_fallbacks() -> None:
    h = Harness(models={"small": ModelRoute(fallbacks=["backup"], context_fallbacks=["big"])})
    for ident, model in ((b"ws", "small"), (b"wk", "backup"), (b"wg", "big")):
        h.ready(ident, model=model)
    h.submit("long", model="small")
    (ds,) = h.dispatches(b"ws")
    error(h, b"ws", ds.key, "long", ErrorCode.CONTEXT_TOO_LONG)
    assert h.dispatches(b"wk") == []  # context_too_long skips the plain fallbacks
    (dg,) = h.dispatches(b"wg")
    final(h, b"wg", dg.key, "long", model="big")
    assert only_answer(h, "long").tried == ["small"]

    h.submit("down", model="small")
    ds = h.dispatches(b"ws")[-1]
    error(h, b"ws", ds.key, "down", ErrorCode.RATE_LIMITED, retry_after=1.0)
    (dk,) = h.dispatches(b"wk")
    assert dk.request.id == "down"


@pytest.mark.timeout(30)
def test_queued_work_moves_on_when_its_model_has_no_healthy_worker_for_fallback_wait() -> None:
    h = gateway(groups=GROUP, fallback_wait=2.0)
    h.heartbeat(b"wa", Health.UNHEALTHY)
    h.submit("r1", model="chat")
    assert h.status().queues.get("a") == 1 and h.dispatches(b"wb") == []
    h.advance(1.0)
    assert h.dispatches(b"wb") == []  # still within fallback_wait
    h.advance(1.5)
    (db,) = h.dispatches(b"wb")
    assert db.request.id == "r1" and h.status().queues.get("a", 0) == 0


@pytest.mark.timeout(30)
def test_a_failing_model_cools_down_and_is_skipped_while_an_alternative_is_left() -> None:
    h = gateway(groups=GROUP, cooldown_failures=2, cooldown_window=10.0, cooldown_s=30.0,
                heartbeat_interval=30.0)
    for rid in ("f1", "f2"):
        h.submit(rid, model="chat")
        da = h.dispatches(b"wa")[-1]
        error(h, b"wa", da.key, rid, ErrorCode.BACKEND_ERROR)
        db = h.dispatches(b"wb")[-1]
        final(h, b"wb", db.key, rid)
    status = h.status()
    assert set(status.cooldowns) == {"a"} and status.cooldowns["a"] == pytest.approx(30.0)
    assert status.counters["cooldowns"] == 1
    served_by_a = len(h.dispatches(b"wa"))
    h.submit("r3", model="chat")
    assert len(h.dispatches(b"wa")) == served_by_a  # a is cooling: b first
    assert h.dispatches(b"wb")[-1].request.id == "r3"
    h.submit("plain", model="a")  # asked by name, a still serves: cooldown only reorders
    assert h.dispatches(b"wa")[-1].request.id == "plain"
    h.advance(31.0)
    assert h.status().cooldowns == {}
    final(h, b"wa", h.dispatches(b"wa")[-1].key, "plain")
    h.submit("r4", model="chat")
    assert h.dispatches(b"wa")[-1].request.id == "r4"


@pytest.mark.timeout(30)
def test_weighted_group_orders_by_weight() -> None:
    groups = {"w": ModelGroup(models=["a", "b"], strategy="weighted", weights=[0.0, 1.0])}
    h = gateway(groups=groups)
    h.core.flow.gateway.rng = random.Random(7)
    for i in range(5):
        h.submit(f"r{i}", model="w")
        final(h, b"wb", h.dispatches(b"wb")[-1].key, f"r{i}")
    assert h.dispatches(b"wa") == []
    plans = [h.core.flow.gateway.plan("w") for _ in range(20)]
    assert all(p == ["b", "a"] for p in plans)  # a zero weight goes last, never first


@pytest.mark.timeout(30)
def test_profile_fills_model_sampling_system_and_priority_the_request_overrides() -> None:
    planner = Profile(model="chat", system="You plan.", priority=2,
                      sampling=Sampling(temperature=0.2, max_tokens=64))
    h = gateway(groups=GROUP, profiles={"planner": planner})
    h.submit("p1", model="", kind=Kind.CHAT, profile="planner",
             messages=[Message(role="user", content="go")],
             sampling=Sampling(temperature=0.9))
    (d,) = h.dispatches(b"wa")
    request = d.request
    assert request.model == "a" and request.priority == 2
    assert request.sampling.temperature == 0.9 and request.sampling.max_tokens == 64
    assert [m.role for m in request.messages] == ["system", "user"]
    assert request.messages[0].content == "You plan."

    h.submit("nope", model="a", profile="writer")
    err = only_answer(h, "nope")
    assert err.code is ErrorCode.INVALID_REQUEST and "writer" in err.message
    assert "planner" in err.message  # the known ones are named


@pytest.mark.timeout(30)
def test_profile_over_budget_is_refused_before_dispatch_until_the_window_frees() -> None:
    h = gateway(profiles={"bot": Profile(model="a", tokens_per_minute=100)},
                heartbeat_interval=30.0)
    h.submit("r1", model="", profile="bot")
    final(h, b"wa", h.dispatches(b"wa")[-1].key, "r1", usage=Usage(60, 50, 110))
    dispatched = len(h.dispatches(b"wa"))
    h.submit("r2", model="", profile="bot")
    err = only_answer(h, "r2")
    assert err.code is ErrorCode.BUDGET_EXCEEDED and not err.retryable
    assert "tokens_per_minute=100" in err.message and 0 < err.retry_after <= 60
    assert len(h.dispatches(b"wa")) == dispatched
    assert h.status().counters["budget_exceeded"] == 1
    h.submit("other", model="a")  # no profile: no budget
    assert h.dispatches(b"wa")[-1].request.id == "other"
    final(h, b"wa", h.dispatches(b"wa")[-1].key, "other")
    h.advance(61.0)
    h.submit("r3", model="", profile="bot")
    assert h.dispatches(b"wa")[-1].request.id == "r3"


@pytest.mark.timeout(30)
def test_cost_from_the_price_table_in_the_final_and_in_status_totals() -> None:
    h = gateway(prices={"a": Price(input=1.0, output=2.0, cached_input=0.5)},
                profiles={"bot": Profile(usd_per_minute=0.004)})
    h.submit("r1", model="a", profile="bot")
    usage = Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500,
                  cached_tokens=400)
    final(h, b"wa", h.dispatches(b"wa")[-1].key, "r1", usage=usage, model="a")
    answer = only_answer(h, "r1")
    # (600 x $1 + 400 x $0.5 + 500 x $2) per million
    assert answer.usage.cost_usd == pytest.approx(0.0018)
    h.submit("r2", model="b", profile="bot")  # local and unpriced: free
    final(h, b"wb", h.dispatches(b"wb")[-1].key, "r2", usage=Usage(10, 5, 15, estimated=True))
    assert only_answer(h, "r2").usage.cost_usd == 0.0
    status = h.status()
    assert status.spend_by_model["a"].cost_usd == pytest.approx(0.0018)
    assert status.spend_by_model["b"].estimated == 1
    bot = status.spend_by_profile["bot"]
    assert bot.requests == 2 and bot.prompt_tokens == 1010 and bot.completion_tokens == 505
    h.submit("r3", model="a", profile="bot")
    final(h, b"wa", h.dispatches(b"wa")[-1].key, "r3", usage=usage)
    h.submit("r4", model="a", profile="bot")  # 2 x $0.0018 >= $0.004? not yet
    final(h, b"wa", h.dispatches(b"wa")[-1].key, "r4", usage=usage)
    h.submit("r5", model="a", profile="bot")  # $0.0054 spent: over usd_per_minute
    assert only_answer(h, "r5").code is ErrorCode.BUDGET_EXCEEDED


@pytest.mark.timeout(30)
def test_unknown_group_members_are_allowed_and_skipped_until_they_register() -> None:
    h = Harness(groups={"chat": ModelGroup(models=["later", "a"])})
    h.submit("r0", model="chat")
    assert only_answer(h, "r0").code is ErrorCode.UNKNOWN_MODEL
    h.ready(b"wa", model="a")
    h.submit("r1", model="chat")
    assert h.dispatches(b"wa")[-1].request.id == "r1"
    h.ready(b"wl", model="later")
    h.submit("r2", model="chat")
    assert [d.request.id for d in h.dispatches(b"wl")] == ["r2"]


@pytest.mark.timeout(30)
def test_worker_dying_before_streaming_with_attempts_spent_falls_back() -> None:
    h = gateway(groups=GROUP, max_attempts=1)
    h.submit("r1", model="chat")
    h.dispatches(b"wa")
    h.core.flow.lose_worker(h.core.registry.get(b"wa"), "test")  # type: ignore[arg-type]
    h.core.settle()
    (db,) = h.dispatches(b"wb")
    final(h, b"wb", db.key, "r1")
    assert only_answer(h, "r1").tried == ["a"]


@pytest.mark.timeout(30)
def test_gateway_config_checks() -> None:
    def problems(**config: Any) -> list[str]:
        return config_problems(msgspec.convert(config, BrokerConfig))

    assert problems(groups={"g": {"models": ["x", "y"]}},
                    models={"x": {"fallbacks": ["nowhere"]}}) == []
    cycle = problems(models={"x": {"fallbacks": ["y"]}, "y": {"context_fallbacks": ["x"]}})
    assert any("cycle: x -> y -> x" in p for p in cycle)
    via_group = problems(groups={"g": {"models": ["x"]}}, models={"x": {"fallbacks": ["g"]}})
    assert any("cycle" in p for p in via_group)
    assert any("weights" in p for p in problems(
        groups={"g": {"models": ["x", "y"], "strategy": "weighted", "weights": [1]}}))
    assert any("both a group" in p for p in problems(groups={"x": {"models": ["y"]}},
                                                     models={"x": {"fallbacks": []}}))
    assert any("tokens_per_day" in p for p in problems(profiles={"p": {"tokens_per_day": 0}}))
    with pytest.raises(msgspec.ValidationError, match="stratgy"):
        load_pool_config('[groups.g]\nmodels = ["x"]\nstratgy = "order"\n')
    with pytest.raises(msgspec.ValidationError, match="both at the top level"):
        load_pool_config('[profiles.p]\nmodel = "x"\n[broker.profiles.p]\nmodel = "y"\n')
    pool = load_pool_config('[profiles.p]\nmodel = "x"\n[models.x]\nfallbacks = ["y"]\n')
    assert pool.broker.profiles["p"].model == "x" and pool.broker.models["x"].fallbacks == ["y"]


@pytest.mark.timeout(30)
def test_dispatch_carries_the_backing_model_not_the_group() -> None:
    h = gateway(groups=GROUP)
    h.submit("r1", model="chat")
    (d,) = h.sink.worker_msgs(b"wa", Dispatch)
    assert d.request.model == "a"


@pytest.mark.timeout(30)
def test_a_group_skips_a_model_that_failed_for_good_and_says_so_when_all_did() -> None:
    h = Harness(groups=GROUP)
    h.ready(b"wa", model="a", health=Health.LOADING)
    h.ready(b"wb", model="b")
    h.client(b"pool", MarkModelFailed(model="a", reason="SIGILL at load"))
    h.submit("r1", model="chat")
    assert h.dispatches(b"wb")[-1].request.id == "r1"  # a is skipped, not waited for
    h.heartbeat(b"wb", Health.LOADING)
    h.client(b"pool", MarkModelFailed(model="b", reason="out of memory"))
    h.submit("r2", model="chat")
    err = only_answer(h, "r2")
    assert err.code is ErrorCode.MODEL_FAILED and "SIGILL" in err.message
