"""``GET /metrics``: Prometheus text format, built at scrape time from the relay's state.

Families (all prefixed ``ghostcloak_relay_``; no label ever holds client data):

* ``sessions_active`` gauge, ``sessions_started_total{endpoint}``,
  ``sessions_ended_total{reason}``;
* ``connections_active{endpoint}`` gauge, ``connections_total{endpoint}``;
* ``messages_total{direction}`` and ``bytes_total{direction}``, direction
  ``to_node``/``to_client``;
* ``refused_total{reason}``: envelope error codes, policy refusals, limits, timeouts;
* ``upstream_connects_total{node}``, ``upstream_failures_total{node}``,
  ``node_healthy{node}`` (1 healthy, 0 not, -1 not probed yet), ``node_best_block{node}``,
  with ``node`` the index in ``MIDNIGHT_NODE``;
* ``upstream_rtt_seconds`` histogram: request to answer, as the relay sees it;
* ``draining`` and ``ready`` gauges, ``asyncio_tasks`` gauge;
* ``tls_reloads_total{result}``, ``tls_certificate_expiry_timestamp_seconds``;
* ``build_info{version,data_plane}`` (always 1): ``data_plane`` is ``compiled`` when the
  mypyc-compiled hot path runs (:mod:`.native`), else ``python``;
* the standard ``process_*`` families (resident memory, open fds, CPU seconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import NATIVE, __version__
from .stats import RTT_BUCKETS

if TYPE_CHECKING:
    from .server import RelayServer

__all__ = ["CONTENT_TYPE", "RelayCollector", "make_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
P = "ghostcloak_relay_"
ENDPOINTS = ("relay", "rpc")


class RelayCollector(Collector):
    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        stats = server.server_stats()
        info = GaugeMetricFamily(
            P + "build_info",
            "The relay's version and whether its data plane runs compiled",
            labels=["version", "data_plane"],
        )
        info.add_metric([__version__, "compiled" if NATIVE else "python"], 1)
        yield info
        yield GaugeMetricFamily(
            P + "sessions_active",
            "Sessions open now (both endpoints)",
            value=server.active_sessions(),
        )
        started = CounterMetricFamily(
            P + "sessions_started", "Sessions started", labels=["endpoint"]
        )
        for ep in ENDPOINTS:
            started.add_metric([ep], stats.sessions_started[ep])
        yield started
        ended = CounterMetricFamily(
            P + "sessions_ended", "Sessions ended, by reason", labels=["reason"]
        )
        for reason in (
            "client",
            "upstream_closed",
            "upstream_error",
            "expired",
            "idle",
            "shutdown",
        ):
            ended.add_metric([reason], stats.sessions_ended[reason])
        yield ended
        active = GaugeMetricFamily(
            P + "connections_active", "Client connections open now", labels=["endpoint"]
        )
        total = CounterMetricFamily(
            P + "connections", "Client connections accepted", labels=["endpoint"]
        )
        for ep in ENDPOINTS:
            active.add_metric([ep], stats.open_connections[ep])
            total.add_metric([ep], stats.connections[ep])
        yield active
        yield total
        msgs = CounterMetricFamily(P + "messages", "Messages relayed", labels=["direction"])
        msgs.add_metric(["to_node"], stats.msgs_to_node)
        msgs.add_metric(["to_client"], stats.msgs_to_client)
        yield msgs
        size = CounterMetricFamily(P + "bytes", "Payload bytes relayed", labels=["direction"])
        size.add_metric(["to_node"], stats.bytes_to_node)
        size.add_metric(["to_client"], stats.bytes_to_client)
        yield size
        refused = CounterMetricFamily(
            P + "refused", "Requests or messages refused, by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        connects = CounterMetricFamily(
            P + "upstream_connects", "Connection attempts to nodes", labels=["node"]
        )
        failures = CounterMetricFamily(
            P + "upstream_failures", "Failed connection attempts", labels=["node"]
        )
        healthy = GaugeMetricFamily(
            P + "node_healthy", "1 healthy, 0 unhealthy, -1 not probed yet", labels=["node"]
        )
        best = GaugeMetricFamily(
            P + "node_best_block", "Best block seen by the last probe", labels=["node"]
        )
        for node in server.pool.nodes:
            connects.add_metric([node.name], stats.upstream_connects[node.index])
            failures.add_metric([node.name], stats.upstream_failures[node.index])
            healthy.add_metric([node.name], -1 if node.healthy is None else int(node.healthy))
            if node.best_block is not None:
                best.add_metric([node.name], node.best_block)
        yield connects
        yield failures
        yield healthy
        yield best
        cumulative, running = [], 0
        for bound, count in zip((*map(str, RTT_BUCKETS), "+Inf"), stats.rtt_counts, strict=True):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily(
            P + "upstream_rtt_seconds",
            "Request to answer time through the node",
            buckets=cumulative,
            sum_value=stats.rtt_sum,
        )
        yield GaugeMetricFamily(P + "draining", "1 while shutting down", value=int(server.draining))
        yield GaugeMetricFamily(P + "ready", "1 when /ready answers 200", value=int(server.ready()))
        reloads = CounterMetricFamily(
            P + "tls_reloads", "Certificate reloads, by result", labels=["result"]
        )
        for result, count in server.tls_reloads.items():
            reloads.add_metric([result], count)
        yield reloads
        if server.tls_not_after is not None:
            yield GaugeMetricFamily(
                P + "tls_certificate_expiry_timestamp_seconds",
                "notAfter of the serving certificate (Unix time)",
                value=server.tls_not_after,
            )
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:
            tasks = 0
        yield GaugeMetricFamily(P + "asyncio_tasks", "asyncio tasks alive", value=tasks)


def make_registry(server: RelayServer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(server))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
