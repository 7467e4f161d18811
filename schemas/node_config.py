"""What a node agent (``tokenhive node``) runs on one machine, as a msgspec Struct from TOML.

Unknown keys are errors that name the key (``forbid_unknown_fields``). A node file::

    node = "gpu1"                        # default: the host name
    join = "tcp://head:5556"             # the broker's *worker* endpoint
    gpus_per_worker = 1                  # GPUs one worker gets (a model too big for one)
    curve_secret_key = "/etc/tokenhive/keys/gpu1.key_secret"
    curve_server_key = "/etc/tokenhive/keys/broker.key"

    [[workers]]                          # one worker per GPU (per group) of this spec
    backend = "gguf"
    model = "gemma3-270m"
    n_gpu_layers = -1

Key material never appears here: the curve_* keys name FILES.
"""

from __future__ import annotations

import re

import msgspec

from tokenhive.schemas.config import AnyWorkerSpec

#: a node id: what the broker groups workers by, and the start of their ids (host names fit)
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class NodeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    node: str = ""  # node id; "" -> the host name
    join: str = ""  # the broker's worker endpoint, tcp://HEAD:PORT (``--join`` wins)
    # seconds between node reports (and the workers' heartbeats: the broker's liveness
    # judges both with its own heartbeat_interval, so keep them equal)
    heartbeat_interval: float = 1.0
    drain_timeout: float = 30.0  # on stop, seconds each worker gets to finish its work
    restart_backoff_max: float = 30.0  # ceiling of the restart backoff of crashed workers
    gpus_per_worker: int = 1  # GPUs pinned to one worker (CUDA_VISIBLE_DEVICES="0,1")
    pack_chunks: bool = False  # workers pack one step's chunks per client (``--pack-chunks``)
    # CurveZMQ to a keyed broker: our key pair (*.key_secret) and the broker's public *.key,
    # used by the node's own link and by every worker it starts
    curve_secret_key: str = ""
    curve_server_key: str = ""
    # join a non-loopback tcp endpoint without CURVE keys (traffic in the clear)
    insecure: bool = False
    log_level: str = "info"
    # Prometheus text on http://HOST:PORT/metrics (GPUs, worker states, restarts); "" = off
    metrics: str = ""
    # As in a pool file. On a GPU host every spec gets one worker per GPU (or per group of
    # gpus_per_worker), over its own ``gpus`` list when it has one; ``count`` is the number
    # of replicas on a host with no GPU.
    workers: list[AnyWorkerSpec] = msgspec.field(default_factory=list)


def load_node_config(text: str | bytes) -> NodeConfig:
    """Parse a TOML node file; unknown keys raise msgspec.ValidationError naming the key."""
    return msgspec.toml.decode(text, type=NodeConfig)


def node_config_problems(config: NodeConfig) -> list[str]:
    """Values the types allow but a node cannot run with (empty: fine)."""
    problems = [
        f"{name} {why}" for name, why, bad in (
            ("heartbeat_interval", "must be > 0", config.heartbeat_interval <= 0),
            ("drain_timeout", "must be >= 0", config.drain_timeout < 0),
            ("restart_backoff_max", "must be > 0", config.restart_backoff_max <= 0),
            ("gpus_per_worker", "must be >= 1", config.gpus_per_worker < 1),
            ("log_level", "must be debug, info, warning or error",
             config.log_level not in ("debug", "info", "warning", "error")),
        ) if bad
    ]
    if config.node and not NODE_ID.fullmatch(config.node):
        problems.append(f"node {config.node!r}: letters, digits, '.', '_' and '-' only "
                        "(at most 128, starting with a letter or digit)")
    if bool(config.curve_secret_key) != bool(config.curve_server_key):
        problems.append("curve_secret_key and curve_server_key go together")
    for i, spec in enumerate(config.workers):
        where = f"workers[{i}] ({spec.model})"
        if spec.count < 1 or spec.slots < 1:
            problems.append(f"{where}: count and slots must be >= 1")
        if any(g < 0 for g in spec.gpus):
            problems.append(f"{where}: gpus must be >= 0")
    return problems
