"""The pool of configured nodes and their health, as plain state (clock injected).

``MIDNIGHT_NODE`` may list several nodes. Each new session tries them in the order of
:meth:`NodePool.candidates`: healthy nodes first, shuffled (so no single node sees every
session), then nodes not probed yet, then unhealthy ones as a last resort, so a wallet
never gets ``upstream_unavailable`` while any node answers. A node is unhealthy after a
failed probe or a failed session connect, or when its best block has not advanced for
``stale_after`` seconds; a later successful, advancing probe brings it back.

Nodes are named by their index in the configured list (``node="0"``) in metrics and
logs, never by anything a client sent.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

__all__ = ["Node", "NodePool"]


class Node:
    __slots__ = ("best_block", "healthy", "index", "last_advance", "url")

    def __init__(self, index: int, url: str) -> None:
        self.index = index
        self.url = url
        self.healthy: bool | None = None  # None: not probed yet
        self.best_block: int | None = None
        self.last_advance: float | None = None

    @property
    def name(self) -> str:
        return str(self.index)


class NodePool:
    def __init__(
        self, urls: Sequence[str], stale_after: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.nodes = [Node(i, url) for i, url in enumerate(urls)]
        self.stale_after = stale_after
        self._clock = clock

    def candidates(self, rng: random.Random | None = None) -> list[Node]:
        """Every node, in the order a new session should try them."""
        shuffle = (rng or random).shuffle
        groups: list[list[Node]] = [[], [], []]
        for node in self.nodes:
            groups[0 if node.healthy else 1 if node.healthy is None else 2].append(node)
        for group in groups:
            shuffle(group)
        return groups[0] + groups[1] + groups[2]

    @property
    def any_healthy(self) -> bool:
        return any(node.healthy for node in self.nodes)

    def probe_ok(self, node: Node, best_block: int) -> None:
        """A probe answered; the node is healthy unless its chain has stalled."""
        now = self._clock()
        if node.last_advance is None or best_block != node.best_block:
            node.last_advance = now
        node.best_block = best_block
        node.healthy = now - node.last_advance < self.stale_after

    def failed(self, node: Node) -> None:
        """A probe or a session connect failed."""
        node.healthy = False
