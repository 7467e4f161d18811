"""Clients for a tokenhive broker: AsyncClient (the core), Client (sync), and the CLI."""

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.result import Result
from tokenhive.clients.retry import NO_RETRY, RetryPolicy
from tokenhive.clients.stream import Stream
from tokenhive.clients.sync_client import Client, SyncStream

__all__ = ["NO_RETRY", "AsyncClient", "Client", "Result", "RetryPolicy", "Stream", "SyncStream"]
