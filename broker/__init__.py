"""The tokenhive broker: a ZeroMQ ROUTER pair between clients and workers.

Layout, one concept per module:

- ``job``, ``queue``, ``deadlines``, ``inflight``, ``registry``, ``balancer``: plain data
  structures, no I/O.
- ``admission`` (accept or refuse a request), ``wire`` (frame checks, bodies the broker
  writes itself), ``status`` (counters and the StatusReply snapshot).
- ``core``: the state machine. It takes decoded events, sends through a ``sink.Sink`` and
  never touches zmq, so it is unit-tested without sockets. ``BrokerCore`` owns one
  ``state.BrokerState`` (every fact the core keeps) and three collaborators over it, which
  keep nothing of their own: ``flow.JobFlow`` (dispatch, requeue, the one final answer,
  losing a worker or a client, ``settle``), ``worker_events.WorkerEvents`` (the worker
  socket's messages and the chunk hot path) and ``timers.Timers`` (deadlines, liveness).
  The client side is in ``core`` itself.
- ``loop``: owns the two ROUTER sockets, drains them and moves frames in and out of the core.
  The sockets and the raw send/recv helpers come from ``tokenhive.transport``, shared with
  the worker and the client.
- ``command`` / ``__main__`` / ``validate``: the CLI (``python -m tokenhive.broker``).

Policies worth knowing (details where they are implemented):

- Dispatch only to workers that sent Ready and whose last health is ``ok``; slots are the
  broker's own count. Cancelled work keeps its slot until the worker ends it (or a
  heartbeat_interval * heartbeat_liveness grace passes), so a worker is never overfilled.
- A worker lost before it streamed anything for a request: the request goes back to the
  front of its queue (up to max_attempts dispatches, then a retryable worker_lost). Lost
  after streaming began: Error worker_lost with chunks_sent, never re-run.
- A model with queued work and no worker that is alive and healthy or loading: the queued
  requests fail after no_worker_timeout (worker_lost if none is registered, else
  backend_unavailable; both retryable), unless their own deadline comes first.
- A client that does not read: its messages are buffered up to client_buffer, then its
  requests are cut off (Error overloaded after everything already counted as sent, and
  CancelWork to the workers). Other clients' streams never wait for it.
"""
