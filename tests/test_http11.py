"""The lean HTTP/1.1 transport (workers/backends/http/transport.py + connection.py) on its
own, through httpx.

The peer is a FAKE server: a raw asyncio TCP server in this file that writes scripted
bytes and misbehaves on purpose, because the framing edge cases tested here (a chunked body
split at every byte, chunk extensions and trailers, 1xx responses, a body without a length,
a cut mid-chunk, a silent server, malformed lengths and chunk sizes, an oversize head, a
keep-alive connection closed before the answer, fresh or reused) are exactly what a real
server does not produce on demand. The adapters' normal paths run through this transport
against real servers in test_remote_llama_server.py / test_remote_llamacpp.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from tests.support.real_servers import free_port
from tokenhive.workers.backends.http.connection import MAX_HEAD
from tokenhive.workers.backends.http.transport import LeanHTTPTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

Writer = asyncio.StreamWriter
Responder = Callable[[asyncio.StreamReader, Writer], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


class ScriptedServer:
    """Answers the n-th request (counted over all connections) with ``script[n]``
    (the last entry repeats); records connections opened, open now, and closed."""

    def __init__(self, *script: bytes | Responder) -> None:
        self.script = list(script)
        self.requests = 0
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.closed = asyncio.Event()
        self.bodies: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.bodies.append(await reader.readexactly(length))
                step = self.script[min(self.requests, len(self.script) - 1)]
                self.requests += 1
                if isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                else:
                    await step(reader, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            self.closed.set()
            writer.close()


def head(status: int = 200, **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X\r\n"] + [f"{k.replace('_', '-')}: {v}\r\n"
                                             for k, v in headers.items()]
    return ("".join(lines) + "\r\n").encode()


def sized(body: bytes) -> bytes:
    return head(content_length=str(len(body))) + body


def client(url: str, slots: int = 4, **kw: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, transport=LeanHTTPTransport(slots),
                             **kw)  # type: ignore[arg-type]


async def chunks_of(response: httpx.Response) -> AsyncIterator[bytes]:
    async for part in response.aiter_raw():
        yield part


async def test_content_length_bodies_reuse_one_connection() -> None:
    async with ScriptedServer(sized(b"one"), sized(b"two"), sized(b"")) as server, \
            client(server.url) as http:
        texts = [(await http.post("/p", content=b"x" * n)).content for n in (0, 5, 70_000)]
    assert texts == [b"one", b"two", b""]
    assert server.connections == 1
    assert [len(b) for b in server.bodies] == [0, 5, 70_000]


async def test_chunked_body_split_at_every_byte() -> None:
    body = (b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\ntrailer: x\r\n\r\n")
    reply = head(transfer_encoding="chunked") + body

    async def byte_by_byte(reader: asyncio.StreamReader, writer: Writer) -> None:
        for i in range(len(reply)):
            writer.write(reply[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0)  # let each byte travel on its own

    async with ScriptedServer(byte_by_byte, sized(b"next")) as server, \
            client(server.url) as http:
        assert (await http.get("/")).content == b"hello world"
        assert (await http.get("/")).content == b"next"
    assert server.connections == 1  # the chunked body was read to its end: reused


async def test_everything_received_is_one_piece() -> None:
    # Three chunks arriving in one write are handed over as one piece of the body.
    reply = head(transfer_encoding="chunked") + b"2\r\nab\r\n2\r\ncd\r\n2\r\nef\r\n0\r\n\r\n"
    async with ScriptedServer(reply) as server, client(server.url) as http:
        async with http.stream("GET", "/") as response:
            parts = [p async for p in chunks_of(response)]
    assert parts == [b"abcdef"]


async def test_body_without_length_ends_with_the_connection() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: Writer) -> None:
        writer.write(head() + b"all of it")
        await writer.drain()
        writer.close()

    async with ScriptedServer(until_close) as server, client(server.url) as http:
        assert (await http.get("/")).content == b"all of it"
        assert (await http.get("/")).content == b"all of it"
    assert server.connections == 2


async def test_informational_and_empty_responses() -> None:
    async with ScriptedServer(head(100) + head(103, link="x") + sized(b"ok"),
                              head(204), sized(b"after")) as server, \
            client(server.url) as http:
        assert (await http.get("/")).content == b"ok"
        empty = await http.get("/")
        assert empty.status_code == 204 and empty.content == b""
        assert (await http.get("/")).content == b"after"
    assert server.connections == 1


async def test_connection_close_header_is_honoured() -> None:
    async with ScriptedServer(head(content_length="1", connection="close") + b"a",
                              sized(b"b")) as server, client(server.url) as http:
        assert (await http.get("/")).content == b"a"
        assert (await http.get("/")).content == b"b"
    assert server.connections == 2


async def test_at_most_max_connections_and_the_rest_wait() -> None:
    async with ScriptedServer(sized(b"done")) as server, client(server.url, slots=2) as http:
        replies = await asyncio.gather(*(http.get("/") for _ in range(7)))
    assert [r.content for r in replies] == [b"done"] * 7
    assert server.most_open <= 2 and server.connections == 2


async def test_pool_timeout() -> None:
    hold = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: Writer) -> None:
        writer.write(head(transfer_encoding="chunked") + b"1\r\na\r\n")
        await writer.drain()
        await hold.wait()

    async with ScriptedServer(held) as server, client(server.url, slots=1) as http:
        async with http.stream("GET", "/"):
            with pytest.raises(httpx.PoolTimeout):
                await http.get("/", timeout=httpx.Timeout(5.0, pool=0.1))
        hold.set()


async def test_silent_server_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: Writer) -> None:
        await asyncio.Event().wait()  # never answers

    async with ScriptedServer(silent) as server, client(server.url, timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/")


async def test_cut_mid_chunk_and_closed_before_answer() -> None:
    async def cut(reader: asyncio.StreamReader, writer: Writer) -> None:
        writer.write(head(transfer_encoding="chunked") + b"a\r\nonly")
        await writer.drain()
        writer.close()

    async def drop(reader: asyncio.StreamReader, writer: Writer) -> None:
        writer.close()

    async with ScriptedServer(cut, drop) as server, client(server.url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
            await http.get("/")
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await http.get("/")


async def test_closing_a_response_early_closes_its_connection() -> None:
    async def endless(reader: asyncio.StreamReader, writer: Writer) -> None:
        writer.write(head(transfer_encoding="chunked") + b"1\r\na\r\n")
        await writer.drain()
        assert await reader.read() == b""  # returns when the client hangs up

    async with ScriptedServer(endless) as server, client(server.url) as http:
        async with http.stream("GET", "/") as response:
            async for _ in response.aiter_raw():
                break
        await asyncio.wait_for(server.closed.wait(), 5)


async def test_unreachable_is_a_connect_error() -> None:
    async with client(f"http://127.0.0.1:{free_port()}") as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")


async def test_garbage_instead_of_http() -> None:
    async with ScriptedServer(b"SSH-2.0-OpenSSH\r\n\r\n") as server, \
            client(server.url) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/")


# -- strict parsing: each malformed response is a RemoteProtocolError --------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("length", ["-1", "+5", "1_0", "0x5", "5 5"])
async def test_content_length_must_be_plain_digits(length: str) -> None:
    async with ScriptedServer(head(content_length=length) + b"hello") as server, \
            client(server.url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="Content-Length"):
            await http.get("/")


@pytest.mark.timeout(10)
async def test_duplicate_content_length_is_rejected() -> None:
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab"
    async with ScriptedServer(reply) as server, client(server.url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="Content-Length"):
            await http.get("/")


@pytest.mark.timeout(10)
async def test_chunk_size_must_be_plain_hex() -> None:
    reply = head(transfer_encoding="chunked") + b"0x1f\r\n" + b"a" * 31 + b"\r\n0\r\n\r\n"
    async with ScriptedServer(reply) as server, client(server.url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="chunk size"):
            await http.get("/")


@pytest.mark.timeout(10)
async def test_head_over_the_limit_with_its_end_marker() -> None:
    big = head(x_big="a" * (MAX_HEAD + 10), content_length="2") + b"ok"  # one write, complete
    async with ScriptedServer(big) as server, client(server.url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="head larger"):
            await http.get("/")


@pytest.mark.timeout(10)
async def test_head_over_the_limit_without_its_end_marker() -> None:
    hold = asyncio.Event()

    async def endless_head(reader: asyncio.StreamReader, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (MAX_HEAD + 10))
        await writer.drain()
        await hold.wait()  # never ends the head: the size alone must fail it

    # A read timeout far beyond the test's: failing by the limit, not by silence.
    async with ScriptedServer(endless_head) as server, client(server.url, timeout=60) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="head larger"):
            await http.get("/")
        hold.set()


@pytest.mark.timeout(10)
async def test_bytes_after_the_response_make_the_connection_unusable() -> None:
    async with ScriptedServer(sized(b"a") + b"junk", sized(b"b")) as server, \
            client(server.url) as http:
        assert (await http.get("/")).content == b"a"
        assert (await http.get("/")).content == b"b"
    assert server.connections == 2


@pytest.mark.timeout(10)
async def test_head_request_has_no_body() -> None:
    async with ScriptedServer(head(content_length="5"), sized(b"next")) as server, \
            client(server.url) as http:
        reply = await http.head("/")
        assert reply.status_code == 200 and reply.content == b""
        assert (await http.get("/")).content == b"next"


# -- nothing unsafe goes out -------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\rb", "a\x00b"])
async def test_header_value_with_cr_lf_or_nul_is_never_sent(value: str) -> None:
    async with ScriptedServer(sized(b"ok")) as server, client(server.url) as http:
        with pytest.raises(httpx.LocalProtocolError, match="x-key") as info:
            await http.get("/", headers={"x-key": "secret-" + value})
        assert "secret" not in str(info.value)  # the value may be a credential
        assert (await http.get("/")).content == b"ok"  # the transport still works
    assert server.requests == 1 and server.bodies == [b""]


@pytest.mark.timeout(10)
async def test_header_name_that_is_not_a_token_is_never_sent() -> None:
    async with ScriptedServer(sized(b"ok")) as server, client(server.url) as http:
        with pytest.raises(httpx.LocalProtocolError, match="header name"):
            await http.get("/", headers={"x bad:": "v"})
    assert server.connections == 0


# -- what is re-sent: only a request on a reused connection closed before any answer -----------


async def drop(reader: asyncio.StreamReader, writer: Writer) -> None:
    writer.close()  # read the request, answer nothing: a server timing out a keep-alive


@pytest.mark.timeout(10)
async def test_reused_connection_closed_before_any_answer_is_resent_on_a_fresh_one() -> None:
    async with ScriptedServer(sized(b"one"), drop, sized(b"two")) as server, \
            client(server.url) as http:
        assert (await http.post("/", content=b"a")).content == b"one"
        assert (await http.post("/", content=b"b")).content == b"two"
    assert server.connections == 2 and server.bodies == [b"a", b"b", b"b"]


@pytest.mark.timeout(10)
async def test_fresh_connection_closed_before_any_answer_is_not_resent() -> None:
    async with ScriptedServer(drop, sized(b"unused")) as server, client(server.url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await http.post("/", content=b"bill me once")
    assert server.bodies == [b"bill me once"] and server.connections == 1


@pytest.mark.timeout(10)
async def test_resent_request_failing_again_is_final() -> None:
    async with ScriptedServer(sized(b"one"), drop) as server, client(server.url) as http:
        assert (await http.post("/", content=b"a")).content == b"one"
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await http.post("/", content=b"b")
    assert server.bodies == [b"a", b"b", b"b"]  # once on the reused, once on a fresh one


@pytest.mark.timeout(10)
async def test_reused_connection_cut_after_a_response_byte_is_not_resent() -> None:
    async def cut_head(reader: asyncio.StreamReader, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n")  # the server has started answering
        await writer.drain()
        writer.close()

    async with ScriptedServer(sized(b"one"), cut_head, sized(b"unused")) as server, \
            client(server.url) as http:
        assert (await http.post("/", content=b"a")).content == b"one"
        with pytest.raises(httpx.RemoteProtocolError, match="mid-head"):
            await http.post("/", content=b"b")
    assert server.bodies == [b"a", b"b"]


@pytest.mark.timeout(10)
async def test_reused_connection_silent_is_a_timeout_not_resent() -> None:
    async def silent(reader: asyncio.StreamReader, writer: Writer) -> None:
        await reader.read()  # maybe generating: waits for the client to hang up

    async with ScriptedServer(sized(b"one"), silent, sized(b"unused")) as server, \
            client(server.url, timeout=0.3) as http:
        assert (await http.post("/", content=b"a")).content == b"one"
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/", content=b"b")
    assert server.bodies == [b"a", b"b"]
