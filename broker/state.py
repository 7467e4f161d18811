"""Everything the broker core knows, in one object its parts share.

``BrokerCore`` owns one ``BrokerState`` and hands it to its collaborators (``flow``,
``worker_events``, ``timers``); none of them keeps state of its own. Besides the data, it
holds the few operations that touch nothing else: reading the clock and sending through the
sink, where a failed send is recorded here as a follow-up for ``JobFlow.settle``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from tokenhive.broker.balancer import Balancer, make_balancer
from tokenhive.broker.cooldown import Cooldowns
from tokenhive.broker.cost import PriceBook
from tokenhive.broker.deadlines import DeadlineHeap
from tokenhive.broker.inflight import InFlight, KeyMaker
from tokenhive.broker.job import ClientState
from tokenhive.broker.metrics import BrokerMetrics
from tokenhive.broker.nodes import NodeBook
from tokenhive.broker.queue import ModelQueue
from tokenhive.broker.registry import Worker, WorkerRegistry
from tokenhive.broker.sink import GONE, Sink
from tokenhive.broker.spend import SpendBook
from tokenhive.broker.status import COUNTERS
from tokenhive.broker.wire import REREGISTER
from tokenhive.schemas.config import BrokerConfig


class BrokerState:
    def __init__(
        self,
        config: BrokerConfig,
        sink: Sink,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        balancer: Balancer | None = None,
    ) -> None:
        self.cfg = config
        self.sink = sink
        self.clock = clock
        self.wall = wall
        self.now = clock()  # read once per event (``touch``); the hot path uses it as is
        self.started = self.now
        self.worker_timeout = config.heartbeat_interval * config.heartbeat_liveness
        self.balancer = balancer or make_balancer(config.balancer)
        # the work and the peers
        self.registry = WorkerRegistry()
        self.nodes = NodeBook()
        self.nodes_dirty = False  # a node's facts changed: ranks are recomputed at settle
        self.queues: dict[str, ModelQueue] = {}
        self.inflight = InFlight()
        self.deadlines = DeadlineHeap()
        self.clients: dict[bytes, ClientState] = {}  # only clients with pending requests
        self.new_key = KeyMaker()
        self.seq = itertools.count(1)
        # counters (StatusReply); chunks is a plain attribute because the hot path bumps it
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.chunks = 0
        self.metrics = BrokerMetrics()  # per-event observations for /metrics (metrics.py)
        # follow-ups, handled by JobFlow.settle
        self.dirty: set[str] = set()  # models whose queue may now be dispatchable
        self.gone_clients: set[bytes] = set()
        self.full_clients: set[bytes] = set()
        self.troubled_workers: dict[bytes, int] = {}  # ident -> GONE / FULL
        # timer bookkeeping
        self.rereg_sent: dict[bytes, float] = {}  # unknown worker -> last Reregister sent
        self.stalled_since: dict[str, float] = {}  # model -> since when nobody can serve it
        # model -> why its workers failed for good (from the supervisor; cleared on a Ready)
        self.failed_models: dict[str, str] = {}
        # the gateway: failing models, prices, what finished requests used
        self.cooldowns = Cooldowns(config.cooldown_failures, config.cooldown_window,
                                   config.cooldown_s)
        self.prices = PriceBook(config.prices)
        self.spend = SpendBook()
        self.last_ping = float("-inf")
        self.last_housekeeping = float("-inf")

    def touch(self) -> None:
        """Read the clock once; everything until the next touch uses ``now``."""
        self.now = self.clock()

    def queue(self, model: str) -> ModelQueue:
        """The model's queue, created on first use."""
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = ModelQueue(self.cfg.queue_size)
        return queue

    # -- sends -----------------------------------------------------------------------------

    def send_client(self, ident: bytes, body: bytes) -> None:
        rc = self.sink.to_client(ident, body)
        if rc:
            self.client_trouble(ident, rc)

    def client_trouble(self, ident: bytes, rc: int) -> None:
        """A send to a client failed: it is dropped (gone) or cut off (full) at settle."""
        self.counts["send_failures"] += 1
        (self.gone_clients if rc == GONE else self.full_clients).add(ident)

    def send_worker(self, worker: Worker, body: bytes) -> None:
        rc = self.sink.to_worker(worker.ident, body)
        if rc:
            self.counts["send_failures"] += 1
            self.troubled_workers[worker.ident] = rc

    def ask_reregister(self, ident: bytes) -> None:
        """Tell an unknown worker to send Ready, at most once per heartbeat interval."""
        sent = self.rereg_sent.get(ident)
        if sent is not None and self.now - sent < self.cfg.heartbeat_interval:
            return
        self.rereg_sent[ident] = self.now
        self.counts["reregister_sent"] += 1
        self.send_worker_ident(ident, REREGISTER)

    def send_worker_ident(self, ident: bytes, body: bytes) -> None:
        """A reply by identity (the peer may not be a registered worker): a failure is
        counted, nothing more, since there is no registration to follow up on."""
        if self.sink.to_worker(ident, body):
            self.counts["send_failures"] += 1
