"""No API key from config ever shows: not in a log line (captured at DEBUG, the HTTP stack's
loggers included), an exception string, BackendInfo / HealthReport, nor an encoded wire
message — even when the upstream echoes the key back in its error bodies (the fake server,
tests/support/fake_http.py, plays such an upstream)."""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from tests.support.fake_http import FakeHTTPServer, Reply, sse, sse_reply
from tests.support.log_lines import LogLines
from tokenhive.logs import JsonFormatter
from tokenhive.schemas.config import AnthropicSpec, AzureSpec, OpenAISpec
from tokenhive.schemas.errors import ModelLoadFailed, TokenHiveError
from tokenhive.schemas.frames import encode
from tokenhive.schemas.messages import Error, Heartbeat, Message, Ready, Request
from tokenhive.workers.backend import Backend
from tokenhive.workers.backends import make_backend
from tokenhive.workers.backends.http.secrets import (
    REDACTED,
    Secret,
    install_log_guard,
    load_api_key,
    scrub,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Capture(logging.Handler):
    """Every record, formatted both as JSON lines and as classic text with tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._json = JsonFormatter()
        self._text = logging.Formatter("%(name)s %(levelname)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self._json.format(record))
        self.lines.append(self._text.format(record))


@pytest.fixture
def captured() -> Iterator[Capture]:
    handler = Capture()
    names = ["", "tokenhive", "httpx", "httpcore", "hpack", "h2"]
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    root = logging.getLogger()
    root.addHandler(handler)
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    logging.getLogger("tokenhive").propagate = True
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for name, (level, propagate) in saved.items():
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).propagate = propagate


def test_secret_repr_and_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    value = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("TH_SECRET_TEST", value)
    secret = load_api_key("TH_SECRET_TEST", None, required=True)
    assert secret is not None and secret.reveal() == value
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{[secret]}"):
        assert value not in shown and "env:TH_SECRET_TEST" in shown
    with pytest.raises(TypeError):
        msgspec.json.encode(secret)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(secret)
    assert scrub(f"echo {value} back") == f"echo {REDACTED} back"
    keyfile = tmp_path / "k"
    keyfile.write_text(f"  {value}-file\n")
    from_file = load_api_key("TH_SECRET_UNSET", str(keyfile), required=True)
    assert from_file is not None and from_file.reveal() == f"{value}-file"
    assert load_api_key(None, None, required=False) is None
    with pytest.raises(ModelLoadFailed, match="api_key_env or api_key_file"):
        load_api_key(None, None, required=True)


def test_hpack_debug_logs_do_not_carry_header_values(captured: Capture) -> None:
    # hpack logs every header it encodes at DEBUG; only `authorization` is marked sensitive
    # there, so an `x-api-key` / `api-key` header would be printed verbatim.
    import hpack

    from tokenhive.workers.backends.http import secrets

    value = Secret(f"hpack-{uuid.uuid4().hex}", "test").reveal()
    hpack_logger = logging.getLogger("hpack.hpack")
    hpack_logger.removeFilter(secrets._GUARD)  # first show the hazard is real ...
    hpack.Encoder().encode([("x-api-key", value)])
    assert any(value in line for line in captured.lines)
    captured.lines.clear()
    install_log_guard()  # ... then that the guard removes it
    hpack.Encoder().encode([("api-key", value), ("x-api-key", value)])
    assert all(value not in line for line in captured.lines)


def _assert_clean(value: str, *texts: str | bytes) -> None:
    for text in texts:
        blob = text if isinstance(text, bytes) else text.encode()
        assert value.encode() not in blob, text


async def _exercise(backend: Backend, value: str, worker_msgs: list[bytes]) -> list[str]:
    """Run requests that fail in key-echoing ways; return every error text produced."""
    texts: list[str] = []
    for _ in range(3):
        try:
            async for _item in backend.stream(
                    Request(id="q", model="m", messages=[Message("user", "hi")])):
                pass
        except TokenHiveError as exc:
            logging.getLogger("tokenhive.test").exception("request failed")
            texts += [str(exc), repr(exc), exc.message]
            worker_msgs.append(encode(Error.of("q", exc, worker="w")))
    info, health = backend.info(), backend.health()
    worker_msgs.append(encode(Ready(worker="w", model="m", backend=info.backend, slots=1,
                                    detail=health.detail)))
    worker_msgs.append(encode(Heartbeat(worker="w", free_slots=1, in_flight=0,
                                        health=health.health, detail=health.detail)))
    texts += [repr(info), repr(health), msgspec.json.encode(info).decode(),
              msgspec.json.encode(health).decode(), repr(vars(backend))]
    return texts


def _echoing_replies(value: str, stream_path_events: list[bytes]) -> list[Reply]:
    return [
        Reply(401, [f'{{"error":{{"message":"Incorrect API key provided: {value}"}}}}'.encode()]),
        Reply(500, [f"upstream crashed while handling key={value}".encode()]),
        sse_reply(stream_path_events),
    ]


@pytest.mark.parametrize("kind", ["openai", "anthropic", "azure"])
async def test_no_key_in_logs_errors_status_or_wire(
    kind: str, captured: Capture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = f"key-{kind}-{uuid.uuid4().hex}"
    monkeypatch.setenv("TH_KEY_UNDER_TEST", value)
    worker_msgs: list[bytes] = []
    with FakeHTTPServer() as fake:
        if kind == "openai":
            spec: OpenAISpec | AnthropicSpec | AzureSpec = OpenAISpec(
                model="m", base_url=fake.url + "/v1", api_key_env="TH_KEY_UNDER_TEST")
            path = "/v1/chat/completions"
            in_stream = sse({"error": {"message": f"bad key {value}"}})
        elif kind == "anthropic":
            spec = AnthropicSpec(model="m", base_url=fake.url, api_key_env="TH_KEY_UNDER_TEST")
            path = "/v1/messages"
            in_stream = sse(("error", {"type": "error", "error": {
                "type": "authentication_error", "message": f"invalid x-api-key {value}"}}),
                named=True)
        else:
            keyfile = tmp_path / "azure.key"
            keyfile.write_text(value)
            spec = AzureSpec(model="m", endpoint=fake.url, deployment="d",
                             api_key_env=None, api_key_file=str(keyfile))
            path = "/openai/deployments/d/chat/completions"
            in_stream = sse({"error": {"code": "401", "message": f"Access denied: {value}"}})
        fake.script(path, *_echoing_replies(value, in_stream))
        backend = make_backend(spec)
        await backend.start()
        try:
            texts = await _exercise(backend, value, worker_msgs)
        finally:
            await backend.close()
        # The key really was sent (so the test would see a leak if there were one) ...
        sent = [r.headers.get("authorization", "") + r.headers.get("x-api-key", "")
                + r.headers.get("api-key", "") for r in fake.requests]
        assert len(sent) == 3 and all(value in s for s in sent)
    # ... and the upstream's echoes of it were scrubbed everywhere.
    assert any(REDACTED in t for t in texts)
    assert len(worker_msgs) == 5
    assert any("upstream" in line for line in captured.lines)
    _assert_clean(value, *texts, *worker_msgs, *captured.lines)


# -- the JSON formatter scrubs whole records ---------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, LogLines]]:
    """A fresh logger writing JSON lines through JsonFormatter only."""
    logger = logging.getLogger(f"tokenhive.test.json.{uuid.uuid4().hex}")
    handler = LogLines(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


class _Opaque:
    """An object msgspec cannot encode: the formatter writes its repr."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"_Opaque(value={self.value!r})"


class _Detail(msgspec.Struct):
    note: str
    count: int


def test_json_formatter_scrubs_message_and_every_extra_field(
        json_log: tuple[logging.Logger, LogLines]) -> None:
    logger, out = json_log
    value = Secret(f"sk-extra-{uuid.uuid4().hex}", "test").reveal()
    logger.info("calling with %s", value, extra={
        "plain": f"key={value}",
        "nested": {"a": [value, {"b": f"x{value}y", "n": 3}], value: "as a key"},
        "raw": f"header {value}".encode(),
        "struct": _Detail(note=f"echo {value}", count=2),
        "opaque": _Opaque(value),
        "untouched": {"n": 1, "f": 0.5, "none": None, "ok": "fine"},
    })
    [line] = out.lines
    _assert_clean(value, line)
    record = msgspec.json.decode(line)
    assert record["msg"] == f"calling with {REDACTED}"
    assert record["plain"] == f"key={REDACTED}"
    assert record["nested"] == {"a": [REDACTED, {"b": f"x{REDACTED}y", "n": 3}],
                                REDACTED: "as a key"}
    assert base64.b64decode(record["raw"]) == f"header {REDACTED}".encode()  # bytes stay bytes
    assert record["struct"] == {"note": f"echo {REDACTED}", "count": 2}
    assert record["opaque"] == f"_Opaque(value={REDACTED!r})"
    assert record["untouched"] == {"n": 1, "f": 0.5, "none": None, "ok": "fine"}


def test_json_formatter_scrubs_tracebacks_and_stacks(
        json_log: tuple[logging.Logger, LogLines]) -> None:
    logger, out = json_log
    value = Secret(f"sk-exc-{uuid.uuid4().hex}", "test").reveal()
    try:
        try:
            raise ValueError(f"inner {value}")
        except ValueError as inner:
            raise RuntimeError(f"upstream said: invalid key {value}") from inner
    except RuntimeError:
        logger.exception("request failed")
    logger.warning("where %s", value, stack_info=True)
    assert len(out.lines) == 2
    _assert_clean(value, *out.lines)
    failed, where = (msgspec.json.decode(line) for line in out.lines)
    assert f"ValueError: inner {REDACTED}" in failed["exc"]
    assert f"RuntimeError: upstream said: invalid key {REDACTED}" in failed["exc"]
    assert "Traceback" in failed["exc"] and "test_remote_secrets.py" in where["stack"]


def test_log_guard_scrubs_tracebacks_and_cuts_urls_for_any_formatter() -> None:
    """The HTTP stack's records reach whatever handler the application set up: the guard
    cleans the record itself, so even a classic text formatter prints no key or signature."""
    install_log_guard()
    value = Secret(f"sk-guard-{uuid.uuid4().hex}", "test").reveal()
    logger = logging.getLogger("httpx")
    handler = LogLines(logging.Formatter("%(name)s %(message)s"))
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    signed = "https://cdn.example/m.gguf?X-Amz-Signature=abc123sig&token=t0k"
    try:
        logger.info('HTTP Request: GET %s "HTTP/1.1 200 OK"', signed)
        try:
            raise ConnectionError(f"refused for {value} at {signed}")
        except ConnectionError:
            logger.exception("lost")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
    _assert_clean(value, *handler.lines)
    for secret in ("abc123sig", "t0k", "X-Amz-Signature"):
        _assert_clean(secret, *handler.lines)
    assert 'GET https://cdn.example/m.gguf "HTTP/1.1 200 OK"' in handler.lines[0]
    assert f"refused for {REDACTED} at https://cdn.example/m.gguf" in handler.lines[1]
