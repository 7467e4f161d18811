"""Where the sidecar's requests go: a running broker, or a local pool it starts itself.

Which one is decided at ``init``, in this order: the broker the operator named (``--broker``
or ``TOKENHIVE_BROKER``); a local pool the operator described (``--config`` /
``TOKENHIVE_CONFIG`` or pool flags); the ``host`` of ``init``; else a local pool of the default
model. The operator's choice comes first because llmkit fills ``host`` by itself
(``localhost:11434`` for backend ``ollama``, ``localhost:8000`` for ``vllm``/``llama.cpp``)
when its config leaves it empty.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

from tokenhive.clients.async_client import AsyncClient
from tokenhive.clients.cli.target import NoBrokerAnswers, probe_broker
from tokenhive.clients.pool.local import local_pool
from tokenhive.clients.pool.pool import PoolStartError
from tokenhive.clients.sidecar.rpc import (
    CONNECTION_ERROR,
    INVALID_PARAMS,
    MODEL_NOT_FOUND,
    RpcError,
)
from tokenhive.schemas.config import ConfigError, PoolConfig
from tokenhive.schemas.errors import BrokerUnavailable, ModelLoadFailed, TokenHiveError

log = logging.getLogger("tokenhive.sidecar")

SCHEMES = ("tcp://", "ipc://", "inproc://")
# llmkit passes no profile; its config's Env can: every request of this sidecar then runs under
# that ``[profiles.NAME]`` of the pool (defaults, tool set, budgets).
PROFILE_ENV = "TOKENHIVE_PROFILE"


def broker_address(host: str) -> str:
    """llmkit's ``host`` as a broker address: ``host:port`` means tcp."""
    host = host.strip()
    if host.startswith(SCHEMES):
        return host
    if "://" in host:
        raise RpcError(INVALID_PARAMS, f"init: host {host!r} is not a tokenhive broker address "
                                       "(tcp://host:port or ipc://path)")
    return f"tcp://{host}"


class Upstream:
    """One AsyncClient onto the chosen pool; ``close`` also stops a pool we started."""

    def __init__(
        self,
        *,
        broker: str | None,
        pool_config: Callable[[], PoolConfig] | None,
        operator_pool: bool,
        log_level: str,
        ready_timeout: float,
        broker_timeout: float,
        probe_timeout: float = 2.0,
    ) -> None:
        self._broker = broker
        self._pool_config = pool_config
        self._operator_pool = operator_pool  # --config or pool flags were given
        self._log_level = log_level
        self._ready_timeout = ready_timeout
        self._broker_timeout = broker_timeout
        self._probe_timeout = probe_timeout
        self._stack = contextlib.AsyncExitStack()
        self.client: AsyncClient | None = None
        self.address = ""
        self.local = False

    async def connect(self, host: str) -> None:
        """Open the client (starting a local pool if that is the choice) and check that a
        broker answers there; RpcError(-32003) when none does."""
        if self.client is not None:
            return
        address = self._broker
        if address is None and not self._operator_pool and host:
            address = broker_address(host)
        if address is not None:
            await self._open_broker(address)
        else:
            await self._open_local_pool()

    async def _open_broker(self, address: str) -> None:
        try:
            await probe_broker(address, connect_timeout=self._probe_timeout,
                               status_timeout=self._broker_timeout)
        except NoBrokerAnswers:
            raise RpcError(CONNECTION_ERROR, f"no tokenhive broker answers at {address} (is it "
                           "running? the broker comes from TOKENHIVE_BROKER, else init's host)",
                           {"address": address}) from None
        except TokenHiveError as exc:  # a malformed address
            raise RpcError(INVALID_PARAMS, f"init: {exc.message}") from None
        client = AsyncClient(address, broker_timeout=self._broker_timeout,
                             profile=os.environ.get(PROFILE_ENV) or None)
        self.client = await self._stack.enter_async_context(client)
        self.address = address
        log.info("sidecar connected", extra={"address": address})

    async def _open_local_pool(self) -> None:
        if self._pool_config is None:
            raise RpcError(CONNECTION_ERROR, "no broker given and no local pool configured")
        try:
            config = self._pool_config()
            pool = await self._stack.enter_async_context(local_pool(
                config, log_level=self._log_level, ready_timeout=self._ready_timeout))
        except ConfigError as exc:
            raise RpcError(INVALID_PARAMS, f"local pool: {exc}") from None
        except ModelLoadFailed as exc:
            raise RpcError(MODEL_NOT_FOUND, f"local pool: {exc.message}") from None
        except PoolStartError as exc:
            raise RpcError(CONNECTION_ERROR, f"local pool: {exc.message}") from None
        self.client = await self._stack.enter_async_context(
            AsyncClient(pool.address, broker_timeout=self._broker_timeout,
                        profile=os.environ.get(PROFILE_ENV) or None))
        self.address = pool.address
        self.local = True
        log.info("sidecar started a local pool", extra={"address": pool.address,
                                                          "models": pool.models})

    async def served_models(self) -> list[str]:
        """Every model name the broker can route now: workers' models and group names."""
        assert self.client is not None
        try:
            status = await self.client.status(timeout=self._probe_timeout)
        except BrokerUnavailable as exc:
            raise RpcError(CONNECTION_ERROR, exc.message) from None
        return sorted({w.model for w in status.workers} | set(status.groups))

    async def close(self) -> None:
        self.client = None
        await self._stack.aclose()
