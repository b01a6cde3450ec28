"""Process memory, read cheaply from ``/proc/self/status`` (no psutil, no tracemalloc).

``Heap`` in the monitoring line is the Python process's equivalent of Node's
``heapUsed/heapTotal``:

* used  = ``RssAnon``: resident anonymous memory, i.e. everything the process allocated
  for itself (Python objects in pymalloc arenas, malloc'd buffers, socket buffers held by
  the interpreter), excluding mapped files such as shared libraries;
* total = ``VmData``: the size of the process's data segments (heap plus anonymous
  mappings) it has reserved, resident or not.

Both come from one read of a small proc file, cheap enough for every log interval.
Elsewhere than Linux, RSS falls back to ``getrusage`` peak and Heap to RSS/RSS.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

__all__ = ["MemoryReading", "read_memory"]


@dataclass(frozen=True, slots=True)
class MemoryReading:
    rss: int  # bytes
    heap_used: int  # bytes
    heap_total: int  # bytes


def _parse_status(text: str) -> MemoryReading:
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmData"):
            fields[key] = int(rest.split()[0]) * 1024
    rss = fields.get("VmRSS", 0)
    return MemoryReading(rss, fields.get("RssAnon", rss), fields.get("VmData", rss))


def read_memory() -> MemoryReading:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return _parse_status(f.read())
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = peak if sys.platform == "darwin" else peak * 1024
        return MemoryReading(rss, rss, rss)


def _mb(n: int) -> int:
    return round(n / (1024 * 1024))


def status_line(active_sessions: int, mem: MemoryReading) -> str:
    """``Active sessions: 3, RSS: 45MB, Heap: 32MB/64MB``, exactly the original form."""
    return (
        f"Active sessions: {active_sessions}, RSS: {_mb(mem.rss)}MB, "
        f"Heap: {_mb(mem.heap_used)}MB/{_mb(mem.heap_total)}MB"
    )
