"""Rate limits and per-client accounting, as plain classes with an injected clock.

* :class:`TokenBucket`: ``rate`` tokens per second, at most ``burst`` saved up. A call
  costs its weight (:func:`weight`): cheap status calls cost less than state reads.
* :class:`ClientRegistry`: connections per client address and one shared bucket per
  address. Addresses are only ever held as a keyed hash (:func:`.logs.ref`), in memory,
  while the address has connections; they are never logged or exported.

Memory: one small object per distinct client address with an open connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["CHEAP_METHODS", "ClientRegistry", "TokenBucket", "weight"]

#: Calls that cost a node almost nothing; they weigh a quarter of a normal call.
CHEAP_METHODS: Final = frozenset(
    {
        "system_health",
        "system_chain",
        "system_name",
        "system_version",
        "system_properties",
        "system_chainType",
        "rpc_methods",
        "chain_getFinalizedHead",
        "chain_getFinalisedHead",
        "chain_getBlockHash",
        "chain_getHead",
    }
)
CHEAP_WEIGHT: Final = 0.25


def weight(method: str) -> float:
    return CHEAP_WEIGHT if method in CHEAP_METHODS else 1.0


class TokenBucket:
    """``rate`` per second sustained, ``burst`` at once; ``rate == 0`` means unlimited."""

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(2.0 * rate, 1.0)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def would_take(self, cost: float = 1.0) -> bool:
        """Whether :meth:`take` would succeed now (nothing is spent)."""
        if self.rate <= 0:
            return True
        tokens = self._tokens + (self._clock() - self._stamp) * self.rate
        return min(self.burst, tokens) >= cost

    def take(self, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are enough; False (nothing spent) otherwise."""
        if self.rate <= 0:
            return True
        now = self._clock()
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens < cost:
            self._tokens = tokens
            return False
        self._tokens = tokens - cost
        return True


class _Client:
    __slots__ = ("bucket", "connections")

    def __init__(self, bucket: TokenBucket) -> None:
        self.connections = 0
        self.bucket = bucket


class ClientRegistry:
    """Open connections and the shared rate bucket of each client address (hashed)."""

    __slots__ = ("_clients", "_clock", "max_connections", "rate")

    def __init__(
        self, max_connections: int, rate: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_connections = max_connections
        self.rate = rate
        self._clock = clock
        self._clients: dict[str, _Client] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def acquire(self, key: str) -> TokenBucket | None:
        """Count one more connection for ``key``; None if it already has the maximum."""
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _Client(TokenBucket(self.rate, clock=self._clock))
        if client.connections >= self.max_connections:
            return None
        client.connections += 1
        return client.bucket

    def release(self, key: str) -> None:
        client = self._clients.get(key)
        if client is None:
            return
        client.connections -= 1
        if client.connections <= 0:
            del self._clients[key]
