"""Clients for a tokenhive broker: AsyncClient (the core), Client (sync), and the CLI."""

from .async_client import AsyncClient
from .result import Result
from .retry import NO_RETRY, RetryPolicy
from .stream import Stream
from .sync_client import Client, SyncStream

__all__ = ["NO_RETRY", "AsyncClient", "Client", "Result", "RetryPolicy", "Stream", "SyncStream"]
