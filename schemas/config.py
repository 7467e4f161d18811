"""Configuration as msgspec Structs: the broker, each worker, and a whole pool (TOML).

Unknown keys are errors that name the key (``forbid_unknown_fields``). Worker specs are a
tagged union on ``backend``, so each backend declares exactly the keys it accepts.

A pool file for ``tokenhive up``::

    [broker]
    clients = "tcp://127.0.0.1:5555"
    workers = "ipc:///run/user/1000/tokenhive/workers.sock"   # default: per user, private

    [[workers]]
    backend = "gguf"
    model = "gemma3-270m"          # the name clients ask for
    path = "/models/gemma.gguf"
    count = 2                      # replicas
    gpus = [0, 1]                  # replica i gets CUDA_VISIBLE_DEVICES=gpus[i]

API keys never appear in config values: config names an environment variable
(``api_key_env``) or a file (``api_key_file``) that holds the key.
"""

from __future__ import annotations

import os
from typing import Literal

import msgspec

from tokenhive.schemas.gateway_config import ModelGroup, ModelRoute, Price, Profile

DEFAULT_CLIENTS = "tcp://127.0.0.1:5555"


def _private_run_dir() -> str:
    # Per user, never a fixed shared /tmp name another user could squat or a second pool
    # could silently take over (libzmq unlinks an existing ipc path on bind). The broker
    # creates it 0700 and refuses a path someone else owns or a live socket (tokenhive.transport).
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return f"{runtime}/tokenhive"
    return f"/tmp/tokenhive-{os.getuid()}" if hasattr(os, "getuid") else "/tmp/tokenhive"


DEFAULT_WORKERS = f"ipc://{_private_run_dir()}/workers.sock"
MiB = 2**20


class Limits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Size caps on what clients send, checked by the broker when a request arrives: over a
    cap is ``invalid_request`` naming the field and the cap (``[broker.limits]`` in TOML).
    Value ranges that never change (sampling, priority) are on the message types instead."""

    max_stop: int = 16  # stop sequences per request
    max_stop_chars: int = 256  # characters in one stop sequence
    max_messages: int = 2048  # chat messages per request
    max_prompt_chars: int = 4_000_000  # a completion's prompt, or all of a chat's contents
    # Embedding inputs per request. The reply carries one vector per input as msgpack
    # float64 (9 bytes a value) and must fit in max_message_bytes: 256 x 4096 dims ~ 9.4 MB.
    max_inputs: int = 256
    max_input_chars: int = 4_000_000  # all of a request's embedding inputs together
    max_tools: int = 128  # tools offered per request
    # JSON bytes of all tool definitions plus the response_format schema of one request:
    # each is compiled into a grammar (gguf) or sent upstream with every call
    max_tool_schema_bytes: int = 256 * 1024
    # Bytes of one ZeroMQ message, on every socket (ZMQ_MAXMSGSIZE): libzmq drops a larger
    # one before buffering it. Applies to client and worker traffic alike.
    max_message_bytes: int = 16 * MiB
    # A worker's self-reported slots (Ready.slots): more is refused (Rejected, naming it).
    max_worker_slots: int = 1024


class BrokerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    clients: str = DEFAULT_CLIENTS
    workers: str = DEFAULT_WORKERS
    heartbeat_interval: float = 1.0  # seconds between pings, both ways
    heartbeat_liveness: int = 3  # missed heartbeats before a worker is dead
    client_liveness: float = 10.0  # seconds of client silence before its work is cancelled
    queue_size: int = 10_000  # per model; beyond it requests get `overloaded`
    max_attempts: int = 3  # dispatch attempts when workers die before streaming
    retry_after: float = 1.0  # hint sent with `overloaded`
    balancer: str = "least_loaded"  # least_loaded | round_robin | fastest
    hwm: int = 100_000  # ZeroMQ high-water marks on both sockets
    client_buffer: int = 10_000  # messages buffered per slow client before it is cut off
    # queued requests of a model with no worker alive and healthy (or loading) fail after
    # waiting this long (retryable); their own deadline may end them sooner
    no_worker_timeout: float = 30.0
    limits: Limits = Limits()  # frozen, so one shared default is safe
    # The gateway (schemas/gateway_config.py): groups, fallbacks, profiles, prices.
    groups: dict[str, ModelGroup] = msgspec.field(default_factory=dict)
    models: dict[str, ModelRoute] = msgspec.field(default_factory=dict)
    profiles: dict[str, Profile] = msgspec.field(default_factory=dict)
    prices: dict[str, Price] = msgspec.field(default_factory=dict)
    # a queued request with fallbacks left moves on after waiting this long while its
    # model has no healthy worker
    fallback_wait: float = 5.0
    # a model whose workers fail cooldown_failures times within cooldown_window seconds is
    # skipped (while an alternative exists) for cooldown_s seconds
    cooldown_failures: int = 3
    cooldown_window: float = 60.0
    cooldown_s: float = 30.0
    # CurveZMQ on both sockets (tokenhive.transport): FILES, never key material. The broker's
    # key pair (a *.key_secret file), and the directories of allowed public *.key files:
    # curve_allow for both sides, or one per side (which then wins for that side).
    # Prometheus text on http://HOST:PORT/metrics (``--metrics``); "" = off. Loopback unless
    # told otherwise, like every bind.
    metrics: str = ""
    curve_secret_key: str = ""
    curve_allow: str = ""
    curve_allow_workers: str = ""
    curve_allow_clients: str = ""
    # With keyed clients: public keys (a DIR of *.key) that may also send operator messages
    # (drain a node, mark a model failed). The broker's own key always may; "" = only it.
    curve_allow_admins: str = ""
    # bind a non-loopback tcp address without CURVE (anyone on the network may connect)
    insecure: bool = False


class WorkerSpec(msgspec.Struct, tag_field="backend", forbid_unknown_fields=True, kw_only=True):
    """Fields every backend shares."""

    model: str  # the name clients ask for
    slots: int = 1
    count: int = 1  # replicas started by `tokenhive up`
    id: str | None = None  # worker id; default "<model>-<index>-<pid>"
    gpus: list[int] = msgspec.field(default_factory=list)  # CUDA_VISIBLE_DEVICES per replica
    env: dict[str, str] = msgspec.field(default_factory=dict)
    coalesce_ms: float = 0.0  # merge tokens produced within this window into one chunk
    degraded_after_errors: int = 3  # consecutive backend errors that turn health degraded
    # One decode step's chunks for the same client in one message (``Pack``): many fewer
    # broker messages for batch clients with many streams; a lone chunk goes out as is.
    pack_chunks: bool = False


class EchoSpec(WorkerSpec, tag="echo"):
    """Deterministic test backend: streams ``text`` (or the prompt back) at a set rate."""

    text: str = ""  # scripted reply; empty -> echo the prompt / last user message
    tokens_per_s: float = 0.0  # 0 -> as fast as possible
    tokens: int | None = None  # emit exactly this many tokens (cycling the script)
    context_length: int = 8192
    embedding_dim: int = 8
    load_seconds: float = 0.0  # simulated load time (health is `loading` meanwhile)
    # Every request fails with this error code, as the ``echo_fail`` request metadata would
    # (a worker standing for a failing upstream: tests of fallbacks and cooldowns). "": off.
    fail: str = ""


class GGUFSpec(WorkerSpec, tag="gguf"):
    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    hf_repo: str | None = None
    hf_file: str | None = None
    cache_dir: str | None = None
    n_ctx: int = 4096  # context per slot
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = 0
    # llama-2 | llama-3 | chatml | gemma | plain; None -> the GGUF's own template
    chat_format: str | None = None
    embedding: bool = False
    pooling: str | None = None  # mean | cls | last | none; None -> mean for embeddings
    seed: int = 0
    prefix_cache: bool = True


class OpenAISpec(WorkerSpec, tag="openai"):
    base_url: str = "https://api.openai.com/v1"
    upstream_model: str | None = None  # model name sent upstream; default = model
    chat_path: str = "/chat/completions"
    completions_path: str = "/completions"
    embeddings_path: str = "/embeddings"
    api_key_env: str | None = None
    api_key_file: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    timeout: float = 120.0
    connect_timeout: float = 10.0
    http2: bool = True
    include_usage: bool = True  # stream_options.include_usage
    context_length: int = 0
    # What the upstream serves (a chat server may have no /embeddings, and vice versa).
    kinds: list[Literal["chat", "completion", "embedding"]] = msgspec.field(
        default_factory=lambda: ["chat", "completion", "embedding"]
    )
    # Non-standard sampling fields (top_k, min_p, repeat penalty) go only to servers that
    # accept them, under that server's names: "llama.cpp" (llama-server, llama-cpp-python,
    # Ollama: repeat_penalty) or "vllm" (repetition_penalty). "none": OpenAI proper.
    sampling_extras: Literal["none", "llama.cpp", "vllm"] = "none"
    max_tokens_field: str = "max_tokens"  # o-series OpenAI models want max_completion_tokens


class AnthropicSpec(WorkerSpec, tag="anthropic"):
    base_url: str = "https://api.anthropic.com"
    upstream_model: str | None = None
    api_key_env: str | None = "ANTHROPIC_API_KEY"
    api_key_file: str | None = None
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = 1024
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    timeout: float = 120.0
    connect_timeout: float = 10.0
    context_length: int = 0
    http2: bool = True  # used only for https base URLs


class AzureSpec(WorkerSpec, tag="azure"):
    endpoint: str  # https://<resource>.openai.azure.com
    deployment: str
    api_version: str = "2024-10-21"
    api_key_env: str | None = "AZURE_OPENAI_API_KEY"
    api_key_file: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    timeout: float = 120.0
    connect_timeout: float = 10.0
    include_usage: bool = True
    context_length: int = 0
    http2: bool = True  # used only for https endpoints
    kinds: list[Literal["chat", "completion", "embedding"]] = msgspec.field(
        default_factory=lambda: ["chat", "completion", "embedding"]
    )
    max_tokens_field: str = "max_tokens"


class BinarySpec(WorkerSpec, tag="binary"):
    """A local one-shot binary (llama-completion convention): the prompt in a 0600 file
    (``-f {prompt_file}``: never on argv, where ``ps`` shows it and ~128 KiB fails), text on
    stdout."""

    binary: str = "llama-completion"
    model_path: str | None = None
    # {binary} {model} {prompt_file} {max_tokens} {temperature} {seed} are substituted per
    # argument; {prompt} (the text on argv) still works but is discouraged.
    args: list[str] = msgspec.field(
        default_factory=lambda: ["-m", "{model}", "-f", "{prompt_file}", "-n", "{max_tokens}",
                                 "-no-cnv"]
    )
    timeout: float = 300.0
    default_max_tokens: int = 256
    context_length: int = 0
    strip_echo: bool = True  # drop the prompt when the binary prints it before the answer
    # What the binary prints on stdout at end-of-generation (llama.cpp: " [end of text]");
    # stripped, and it tells "stop" from "length". Empty: the binary prints none.
    end_marker: str = " [end of text]"


AnyWorkerSpec = EchoSpec | GGUFSpec | OpenAISpec | AnthropicSpec | AzureSpec | BinarySpec


class WorkerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What one worker process needs: where the broker is, and what it serves."""

    broker: str = DEFAULT_WORKERS
    spec: AnyWorkerSpec
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3  # missed broker pings before reconnecting
    reconnect_max: float = 5.0  # backoff ceiling, seconds
    drain_timeout: float = 30.0  # SIGTERM: wait this long for in-flight work
    # CurveZMQ to a keyed broker: our *.key_secret file and the broker's public *.key file
    curve_secret_key: str = ""
    curve_server_key: str = ""
    # The node agent this worker runs under (``tokenhive node`` sets TOKENHIVE_NODE); the
    # broker groups workers by it and judges node health. "" with no env: none.
    node: str = ""
    # Pack the chunks of one event-loop turn (one decode step) that go to the same client
    # into one message (``Pack``): far fewer broker messages for batch clients with many
    # streams per worker. Off by default: one message per chunk has the lowest latency.
    pack_chunks: bool = False


class PoolConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A whole pool, as `tokenhive up` reads it from TOML."""

    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    workers: list[AnyWorkerSpec] = msgspec.field(default_factory=list)
    log_level: str = "info"
    restart_backoff_max: float = 30.0  # seconds, for restarting dead workers
    # Gateway tables may sit at the top level of the pool file ([groups.X], [models.X],
    # [profiles.X], [prices.X]); they are the broker's, so they move into ``broker``.
    groups: dict[str, ModelGroup] = msgspec.field(default_factory=dict)
    models: dict[str, ModelRoute] = msgspec.field(default_factory=dict)
    profiles: dict[str, Profile] = msgspec.field(default_factory=dict)
    prices: dict[str, Price] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        for table in ("groups", "models", "profiles", "prices"):
            top: dict[str, object] = getattr(self, table)
            inner: dict[str, object] = getattr(self.broker, table)
            for name in top:
                if name in inner:
                    raise ValueError(f"{table}.{name} is given both at the top level and "
                                     f"under [broker]")
            inner.update(top)
            top.clear()


def load_pool_config(text: str | bytes) -> PoolConfig:
    """Parse a TOML pool file; unknown keys raise msgspec.ValidationError naming the key."""
    return msgspec.toml.decode(text, type=PoolConfig)


class ConfigError(ValueError):
    """A command line or config that does not describe something runnable."""
