"""Shared figures of several worker processes (``RELAY_WORKERS``), in one shared mmap.

With SO_REUSEPORT the kernel spreads connections over the workers, and a ``/health`` or
``/metrics`` request lands on any one of them; each must still answer for the whole
server. Before forking, the supervisor maps one anonymous shared region with a slot per
worker. A worker writes its active-session count into its slot on every change (one
8-byte store) and a JSON snapshot of its counters every housekeeping tick (about once a
second), double-buffered so a reader never sees a half-written snapshot unless it is
slower than two ticks. Readers sum the slots. When a worker dies, the supervisor clears
its slot's session count (its counters stay, so totals never go backwards).

Nothing in a slot identifies a client: counts and fixed labels only.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any

import orjson

__all__ = ["Board"]

SLOT = 64 * 1024
_HEAD = struct.Struct("<qqq")  # active sessions, index of the current buffer, its length
_HALF = (SLOT - _HEAD.size) // 2


class Board:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._mm = mmap.mmap(-1, SLOT * workers)

    def set_active(self, worker: int, count: int) -> None:
        struct.pack_into("<q", self._mm, worker * SLOT, count)

    def active_total(self) -> int:
        return sum(struct.unpack_from("<q", self._mm, w * SLOT)[0] for w in range(self.workers))

    def publish(self, worker: int, snapshot: dict[str, Any]) -> None:
        data = orjson.dumps(snapshot)
        if len(data) > _HALF:
            return  # never happens with fixed labels; better stale than torn
        base = worker * SLOT
        active, current, _ = _HEAD.unpack_from(self._mm, base)
        nxt = 1 - current if current in (0, 1) else 0
        start = base + _HEAD.size + nxt * _HALF
        self._mm[start : start + len(data)] = data
        _HEAD.pack_into(self._mm, base, active, nxt, len(data))

    def snapshots(self, skip: int | None = None) -> list[dict[str, Any]]:
        out = []
        for w in range(self.workers):
            if w == skip:
                continue
            base = w * SLOT
            _, current, length = _HEAD.unpack_from(self._mm, base)
            if length <= 0 or current not in (0, 1):
                continue
            start = base + _HEAD.size + current * _HALF
            try:
                snap = orjson.loads(self._mm[start : start + length])
            except orjson.JSONDecodeError:
                continue
            if isinstance(snap, dict):
                out.append(snap)
        return out

    def worker_gone(self, worker: int) -> None:
        self.set_active(worker, 0)
