"""Counters of the relay, as plain integers bumped on the hot path.

Incrementing an attribute costs a few tens of nanoseconds; a labelled Prometheus child
costs a lock and a lookup. So the data plane only touches :class:`Stats`, and
:mod:`.metrics` turns it into Prometheus families when ``/metrics`` is scraped. No
field is ever keyed by anything a client sent: only by endpoint, direction, fixed
reason codes and node index.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

__all__ = ["RTT_BUCKETS", "Stats"]

#: Upper bounds (seconds) of the upstream round-trip histogram.
RTT_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


#: Every field of :class:`Stats` (compiled classes have no ``__dict__`` to list them).
FIELDS: Final = (
    "msgs_to_node",
    "bytes_to_node",
    "msgs_to_client",
    "bytes_to_client",
    "sessions_started",
    "sessions_ended",
    "connections",
    "open_connections",
    "refused",
    "upstream_connects",
    "upstream_failures",
    "rtt_counts",
    "rtt_sum",
)


class Stats:
    # slots: the same in pure Python as compiled (no ad-hoc attributes, no __dict__)
    __slots__ = FIELDS

    def __init__(self, nodes: int) -> None:
        self.msgs_to_node = 0
        self.bytes_to_node = 0
        self.msgs_to_client = 0
        self.bytes_to_client = 0
        self.sessions_started: Counter[str] = Counter()  # by endpoint
        self.sessions_ended: Counter[str] = Counter()  # by reason
        self.connections: Counter[str] = Counter()  # accepted, by endpoint
        self.open_connections: Counter[str] = Counter()  # open now, by endpoint
        self.refused: Counter[str] = Counter()  # by reason code
        self.upstream_connects = [0] * nodes
        self.upstream_failures = [0] * nodes
        self.rtt_counts = [0] * (len(RTT_BUCKETS) + 1)
        self.rtt_sum = 0.0

    def snapshot(self) -> dict[str, Any]:
        """Plain data for other workers (see :mod:`.board`)."""
        return {k: getattr(self, k) for k in FIELDS}

    def merged(self, others: list[dict[str, Any]]) -> Stats:
        """These counters plus other workers' snapshots: the whole server's view."""
        total = Stats(len(self.upstream_connects))
        for part in [self.snapshot(), *others]:
            for key, value in part.items():
                mine = getattr(total, key, None)
                if isinstance(mine, Counter):
                    mine.update(value)
                elif isinstance(mine, list) and isinstance(value, list):
                    for i, v in enumerate(value[: len(mine)]):
                        mine[i] += v
                elif isinstance(mine, int | float) and isinstance(value, int | float):
                    setattr(total, key, mine + value)
        return total

    def observe_rtt(self, seconds: float) -> None:
        # the first bucket whose bound is >= seconds (bisect_left), as a scan: most round
        # trips land in the first buckets, and compiled it is a few float compares
        i = 0
        for bound in RTT_BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.rtt_counts[i] += 1
        self.rtt_sum += seconds
