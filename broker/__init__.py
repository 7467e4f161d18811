"""The tokenhive broker: a ZeroMQ ROUTER pair between clients and workers.

Layout, one concept per module:

- ``job``, ``queue``, ``deadlines``, ``inflight``, ``registry``, ``balancer``: plain data
  structures, no I/O.
- ``wire``: frame validation and the bodies the broker itself writes (errors, rejections).
- ``core``: the state machine. It takes decoded events, sends through a ``Sink`` and never
  touches zmq, so it is unit-tested without sockets.
- ``loop``: owns the two ROUTER sockets, drains them and moves frames in and out of the core.
- ``command`` / ``__main__``: the CLI (``python -m tokenhive.broker``).
"""
