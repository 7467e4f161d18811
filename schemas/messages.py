"""Every message on the wire, as msgspec Structs in one tagged union per direction.

Framing (see ``schemas/frames.py``): every ZeroMQ message carries a protocol-version frame
first, so a peer speaking another version is told so instead of being misread.

Stream messages (Chunk, Final, Error) are produced by workers, forwarded by the broker to the
client byte for byte, and decoded only by the client. They are ``array_like`` and
``omit_defaults`` because they are the high-volume traffic.

Validation lives on the types: ``msgspec.Meta`` constraints (sampling ranges, priority
levels) are checked by every decode, so the broker refuses a bad request once, on arrival,
with an ``invalid_request`` naming the field (msgspec's ``- at `$.request.sampling.top_p```),
and a worker decoding the same types can rely on them. msgspec does not check constraints
when a Struct is built in Python; ``validated`` applies them to such a value. Size caps that
an operator tunes are not here: they are ``BrokerConfig.limits``, checked by the broker's
admission.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

import msgspec

from tokenhive.schemas.errors import (
    RETRYABLE,
    ErrorCode,
    TokenHiveError,
    error_class,
)
from tokenhive.schemas.tools import ResponseFormat, Tool, ToolCall, ToolCallDelta, ToolChoice

# ---------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------


class Kind(enum.StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"


class Priority(enum.IntEnum):
    """Higher leaves the queue first."""

    BATCH = 0
    NORMAL = 1
    INTERACTIVE = 2


# Range-checked field types. NaN fails every bound and an upper bound excludes infinity, so
# each float field below is finite where it has both bounds.
PriorityLevel = Annotated[int, msgspec.Meta(ge=int(min(Priority)), le=int(max(Priority)))]
MAX_SEED = 2**32 - 1  # llama.cpp and most servers take an unsigned 32-bit seed
MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, msgspec.Meta(ge=0)]  # 0 disables
MinP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
RepeatPenalty = Annotated[float, msgspec.Meta(gt=0.0, le=10.0)]  # 1 is off
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]  # presence / frequency
Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]


class Message(msgspec.Struct, omit_defaults=True):
    """One chat turn: role is system, user, assistant or tool."""

    role: str
    content: str
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (schemas/tools.py)
    tool_call_id: str | None = None  # a tool result: the call it answers


class Sampling(msgspec.Struct, omit_defaults=True):
    """None means the backend's default. Ranges are checked on decode (see the types above);
    the count and length of ``stop`` are capped by the broker's configured limits."""

    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None  # 0: greedy
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repeat_penalty: RepeatPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    seed: Seed | None = None


class Request(msgspec.Struct, omit_defaults=True):
    """A generation request, as a client submits it.

    ``deadline`` is an absolute wall-clock time (``time.time()`` seconds); ``timeout`` is a
    relative alternative the broker turns into a deadline on arrival.
    """

    id: str
    model: str
    kind: Kind = Kind.CHAT
    messages: list[Message] = msgspec.field(default_factory=list)
    prompt: str | None = None
    input: list[str] = msgspec.field(default_factory=list)  # embedding inputs
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    stream: bool = True
    priority: PriorityLevel = Priority.NORMAL  # one of the Priority levels
    deadline: float | None = None
    timeout: float | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    # A ``[profiles.NAME]`` of the broker config: its model, sampling, system prompt and
    # priority fill what this request leaves unset, and its budgets apply.
    profile: str | None = None
    tools: list[Tool] = msgspec.field(default_factory=list)  # functions the model may call
    tool_choice: ToolChoice | None = None  # None: "auto" when tools are offered
    response_format: ResponseFormat | None = None  # json_object / json_schema output


# ---------------------------------------------------------------------------------------------
# Stream messages: worker -> broker -> client, forwarded without re-encoding
# ---------------------------------------------------------------------------------------------


class Usage(msgspec.Struct, omit_defaults=True, array_like=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated: bool = False  # True when the backend could not count exactly
    cost_usd: float = 0.0  # set by the broker from its price table (0: unpriced or local)
    cached_tokens: int = 0  # of prompt_tokens, those the upstream served from its cache


class Timings(msgspec.Struct, omit_defaults=True, array_like=True):
    """Milliseconds."""

    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0


class Chunk(msgspec.Struct, tag="c", array_like=True, omit_defaults=True):
    id: str
    seq: int
    text: str = ""
    tokens: int = 0
    tool_calls: list[ToolCallDelta] | None = None  # streamed pieces of the answer's calls
    cumulative_tokens: int = 0  # completion tokens so far, this chunk's included


class Final(msgspec.Struct, tag="f", array_like=True, omit_defaults=True):
    id: str
    chunks: int  # number of Chunk messages sent before this one
    finish_reason: str = "stop"  # stop | length | cancelled
    usage: Usage = msgspec.field(default_factory=Usage)
    timings: Timings = msgspec.field(default_factory=Timings)
    worker: str = ""
    embeddings: list[list[float]] | None = None
    model: str = ""  # the backing model that served (a group's member, or a fallback)
    tried: list[str] = msgspec.field(default_factory=list)  # models that failed first, in order


class Error(msgspec.Struct, tag="e", array_like=True, omit_defaults=True):
    id: str
    code: ErrorCode
    message: str
    retryable: bool = False
    chunks_sent: int = 0
    retry_after: float | None = None
    worker: str = ""
    tried: list[str] = msgspec.field(default_factory=list)  # models tried, in order (fallbacks)

    @classmethod
    def of(
        cls, request_id: str, exc: TokenHiveError, chunks_sent: int = 0, worker: str = ""
    ) -> Error:
        return cls(
            id=request_id, code=exc.code, message=exc.message, retryable=exc.retryable,
            chunks_sent=chunks_sent or exc.chunks_sent, retry_after=exc.retry_after, worker=worker,
        )

    @classmethod
    def make(cls, request_id: str, code: ErrorCode, message: str, **kw: Any) -> Error:
        kw.setdefault("retryable", RETRYABLE[code])
        return cls(id=request_id, code=code, message=message, **kw)

    def to_exception(self) -> TokenHiveError:
        return error_class(self.code)(
            self.message, retry_after=self.retry_after, chunks_sent=self.chunks_sent,
            request_id=self.id, retryable=self.retryable,
        )


StreamMsg = Chunk | Final | Error

# ---------------------------------------------------------------------------------------------
# Client <-> broker
# ---------------------------------------------------------------------------------------------


class Submit(msgspec.Struct, tag="submit"):
    request: Request


class Cancel(msgspec.Struct, tag="cancel"):
    id: str


class Ping(msgspec.Struct, tag="ping"):
    """Client heartbeat; the broker answers with Pong. Silence means the client is gone."""

    at: float = 0.0


class Pong(msgspec.Struct, tag="pong", array_like=True):
    at: float = 0.0


class Pack(msgspec.Struct, tag="p", array_like=True):
    """Several requests' chunks of one decode step, for the same client, in one message.

    A worker that packs (``WorkerConfig.pack_chunks``) groups the chunks it produces in one
    event-loop turn by ``Dispatch.client`` and sends them as one ``ROUTE_PACK`` message; the
    broker forwards the body unchanged (see ``schemas/frames.py``), so a batch client with
    dozens of streams on one worker costs the broker one message per step, not one per token.
    """

    chunks: list[Chunk]


class DrainNode(msgspec.Struct, tag="drain"):
    """An operator's request: stop (``drain=True``) or resume dispatching to a node's
    workers. Work already running there finishes; queued work goes to other nodes. Not
    answered by itself: the client asks for status next, on the same socket, which shows it."""

    node: str
    drain: bool = True


class StatusQuery(msgspec.Struct, tag="status?"):
    pass


class MarkModelFailed(msgspec.Struct, tag="model-failed"):
    """From the pool supervisor: every worker of ``model`` failed for good (crashed before it
    was ready K times in a row, or could not load). Until a worker of the model registers,
    its queued and new requests fail at once with ``model_failed`` and this reason instead of
    waiting for a worker that is not coming."""

    model: str
    reason: str


class WorkerStatus(msgspec.Struct, omit_defaults=True):
    id: str
    model: str
    backend: str
    health: str
    slots: int
    free_slots: int
    in_flight: int
    device: str = ""
    detail: str = ""
    served: int = 0
    failed: int = 0
    latency_ms: float = 0.0
    last_seen_s: float = 0.0
    node: str = ""  # the node agent (or host) it runs under; "" when it reported none
    # From its heartbeats (generation backends that know them): decode tokens/s over the
    # last interval, KV-cache cells in use (0..1), prompt-prefix cache hits since start.
    decode_tps: float = 0.0
    kv_used: float = 0.0
    prefix_hits: int = 0


class GpuInfo(msgspec.Struct, omit_defaults=True):
    """One GPU as a node agent sees it (NVML where available; else only index and name)."""

    index: int
    name: str = ""
    uuid: str = ""
    memory_used_mb: float = 0.0
    memory_total_mb: float = 0.0
    utilization_pct: float | None = None
    workers: list[str] = msgspec.field(default_factory=list)  # worker ids pinned to it


class NodeHealth(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"  # some of its workers are not serving, or it reports trouble
    DOWN = "down"  # silent past liveness, or none of its workers is alive


class NodeStatus(msgspec.Struct, omit_defaults=True):
    id: str
    health: NodeHealth
    draining: bool = False  # takes no new work: drained by an operator, or stopping
    stopping: bool = False  # its agent is stopping (drains its workers, then leaves)
    host: str = ""
    gpus: list[GpuInfo] = msgspec.field(default_factory=list)
    workers: list[str] = msgspec.field(default_factory=list)  # registered worker ids
    detail: str = ""
    last_seen_s: float = 0.0
    agent: bool = False  # True when a node agent reports it (else known from workers only)


class Spend(msgspec.Struct, omit_defaults=True):
    """Completed requests and what they used, per model or per profile, since broker start."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    estimated: int = 0  # requests whose usage the backend could only estimate


class StatusReply(msgspec.Struct, tag="status", array_like=True):
    workers: list[WorkerStatus]
    queues: dict[str, int]  # model -> queued requests
    in_flight: int
    counters: dict[str, int]  # accepted, completed, failed, bad_frames, wrong_version, ...
    uptime_s: float = 0.0
    groups: dict[str, list[str]] = msgspec.field(default_factory=dict)  # group -> its models
    cooldowns: dict[str, float] = msgspec.field(default_factory=dict)  # model -> seconds left
    spend_by_model: dict[str, Spend] = msgspec.field(default_factory=dict)
    spend_by_profile: dict[str, Spend] = msgspec.field(default_factory=dict)
    nodes: list[NodeStatus] = msgspec.field(default_factory=list)


ClientMsg = Submit | Cancel | Ping | StatusQuery | MarkModelFailed | DrainNode
BrokerToClientMsg = Chunk | Final | Error | Pong | StatusReply | Pack

# ---------------------------------------------------------------------------------------------
# Broker <-> worker
# ---------------------------------------------------------------------------------------------


class Health(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    LOADING = "loading"


class Ready(msgspec.Struct, tag="ready", omit_defaults=True):
    worker: str
    model: str
    backend: str
    slots: int
    context_length: int = 0
    device: str = "cpu"
    kinds: list[Kind] = msgspec.field(default_factory=lambda: [Kind.CHAT, Kind.COMPLETION])
    pid: int = 0
    memory_mb: float = 0.0
    health: Health = Health.OK
    detail: str = ""
    upstream_model: str = ""  # remote backends: the model name sent upstream (for pricing)
    node: str = ""  # the node it runs under (TOKENHIVE_NODE, set by ``tokenhive node``)


class Heartbeat(msgspec.Struct, tag="hb", omit_defaults=True):
    worker: str
    free_slots: int
    in_flight: int
    health: Health = Health.OK
    detail: str = ""
    memory_mb: float = 0.0
    retry_after: float | None = None  # set while rate limited upstream
    # What the broker cannot see (0 where the backend does not know): decode tokens/s over
    # the last interval, KV-cache cells in use (0..1), prompt-prefix cache hits since start.
    decode_tps: float = 0.0
    kv_used: float = 0.0
    prefix_hits: int = 0


class Goodbye(msgspec.Struct, tag="bye", omit_defaults=True):
    """A worker leaving on purpose (drain finished, model failed to load)."""

    worker: str
    reason: str = ""
    code: ErrorCode | None = None


class Dispatch(msgspec.Struct, tag="dispatch", omit_defaults=True):
    """Work for a worker. ``key`` is the broker's routing key: the worker echoes it in the
    route frame of every stream message so the broker routes without decoding."""

    key: bytes
    request: Request
    queued_ms: float = 0.0
    attempt: int = 1
    # Opaque to the worker: which client asked. A worker that packs chunks (``Pack``) puts
    # only requests of the same client in one message.
    client: bytes = b""


class CancelWork(msgspec.Struct, tag="cancel"):
    key: bytes
    reason: ErrorCode = ErrorCode.CANCELLED


class BrokerPing(msgspec.Struct, tag="ping"):
    at: float = 0.0


class Reregister(msgspec.Struct, tag="rereg"):
    """Sent to a worker the broker does not know (e.g. after a broker restart)."""


class Rejected(msgspec.Struct, tag="rejected"):
    """The broker refused a worker message (bad version, garbage, unknown worker)."""

    code: ErrorCode
    message: str


class NodeReport(msgspec.Struct, tag="node", omit_defaults=True):
    """From a node agent (``tokenhive node``), every heartbeat interval, on the worker socket.

    The broker judges the node's health from these and from its workers' liveness; a node
    whose reports stop for ``heartbeat_liveness`` intervals is down, and its workers are
    lost at once (their unstarted work re-queued, their streams ended with worker_lost)."""

    node: str
    host: str = ""
    gpus: list[GpuInfo] = msgspec.field(default_factory=list)
    workers: list[str] = msgspec.field(default_factory=list)  # worker ids it runs
    failed: list[str] = msgspec.field(default_factory=list)  # replicas it gave up on
    restarting: list[str] = msgspec.field(default_factory=list)  # in backoff after a crash
    stopping: bool = False  # the node is draining its workers and will leave


WorkerMsg = Ready | Heartbeat | Goodbye | NodeReport
BrokerToWorkerMsg = Dispatch | CancelWork | BrokerPing | Reregister | Rejected

__all__ = [
    "BrokerPing", "BrokerToClientMsg", "BrokerToWorkerMsg", "Cancel", "CancelWork", "Chunk",
    "ClientMsg", "Dispatch", "DrainNode", "Error", "Final", "Goodbye", "GpuInfo", "Health",
    "Heartbeat", "Kind", "MarkModelFailed", "Message", "NodeHealth",
    "NodeReport", "NodeStatus", "Pack", "Ping", "Pong", "Priority", "PriorityLevel", "Ready",
    "Rejected",
    "Request", "Reregister", "Sampling", "Spend", "StatusQuery", "StatusReply", "StreamMsg",
    "Submit", "Timings", "Usage", "WorkerMsg", "WorkerStatus",
]
