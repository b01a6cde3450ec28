"""``RELAY_WORKERS``: several processes on one port, supervised, reporting as one server."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ghostcloak_relay.devnode import DevNode

from .conftest import TIMEOUT, Client, eventually

ClientFactory = Callable[..., Awaitable[Client]]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        return bytes(resp.read())


async def health(port: int) -> int:
    body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/health")
    return int(orjson.loads(body)["activeSessions"])


async def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float:
    text = (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


async def test_workers_share_the_port_and_report_the_whole_server(
    relay_process: Callable[..., Any], devnode: DevNode, client_factory: ClientFactory
) -> None:
    proc = relay_process(
        {
            "MIDNIGHT_NODE": devnode.url,
            "RELAY_WORKERS": "2",
            "RELAY_SHUTDOWN_TIMEOUT": "5",
            "RELAY_NODE_PROBE_INTERVAL": "0.5",
        }
    )
    await proc.wait_listening()
    await eventually(lambda: len(children(proc.proc.pid)) == 2, what="two workers")
    workers = children(proc.proc.pid)
    clients = []
    for i in range(24):
        c = await client_factory(f"ws://127.0.0.1:{proc.port}/relay")
        await c.start(f"worker-session-{i:03d}")
        clients.append((c, f"worker-session-{i:03d}"))

    def sockets(pid: int) -> int:
        fd_dir = Path(f"/proc/{pid}/fd")
        return sum(1 for fd in fd_dir.iterdir() if "socket" in os.readlink(fd))

    # the kernel spread the connections: both workers hold client sockets
    assert all(sockets(pid) > 6 for pid in workers), [sockets(p) for p in workers]
    # whichever worker answers, it answers for the whole server
    for _ in range(6):
        assert await health(proc.port) == 24
    await eventually(
        lambda: _metric_is(
            proc.port, "ghostcloak_relay_sessions_started_total", {"endpoint": "relay"}, 24
        ),
        what="merged counters",
    )
    for c, sid in clients[:4]:
        assert (await c.call(sid, "system_chain"))["result"] == "GhostCloak Dev"

    # a worker that dies is started again, and its sessions leave the count
    os.kill(workers[0], signal.SIGKILL)
    await eventually(
        lambda: len(children(proc.proc.pid)) == 2 and workers[0] not in children(proc.proc.pid),
        what="worker restarted",
    )
    await eventually(lambda: _health_below(proc.port, 24), what="dead worker's sessions gone")
    assert "worker 0 exited" in proc.output
    fresh = await client_factory(f"ws://127.0.0.1:{proc.port}/relay")
    await fresh.start("after-restart-1")

    # SIGTERM drains every worker; the supervisor exits 0
    proc.proc.send_signal(signal.SIGTERM)
    ended = await fresh.until(type="session_ended", sessionId="after-restart-1")
    assert ended["reason"] == "shutdown"
    assert await proc.wait_exit(20) == 0


async def _metric_is(port: int, name: str, labels: dict[str, str], want: float) -> bool:
    return await metric(port, name, labels) == want


async def _health_below(port: int, n: int) -> bool:
    return await health(port) < n


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    relay_process: Callable[..., Any], devnode: DevNode, client_factory: ClientFactory
) -> None:
    """SIGKILL (or the OOM killer) gives the supervisor no chance to pass SIGTERM on: its
    workers must not go on serving the port unsupervised, but drain and exit."""
    proc = relay_process(
        {"MIDNIGHT_NODE": devnode.url, "RELAY_WORKERS": "2", "RELAY_SHUTDOWN_TIMEOUT": "3"}
    )
    await proc.wait_listening()
    await eventually(lambda: len(children(proc.proc.pid)) == 2, what="two workers")
    workers = children(proc.proc.pid)
    c = await client_factory(f"ws://127.0.0.1:{proc.port}/relay")
    await c.start("orphan-session-1")
    assert (await c.call("orphan-session-1", "system_chain"))["result"] == "GhostCloak Dev"

    proc.proc.kill()
    assert await proc.wait_exit(10) == -signal.SIGKILL
    # the session's worker drains: the session ends with "shutdown", then close 1001
    ended = await c.until(type="session_ended", sessionId="orphan-session-1")
    assert ended["reason"] == "shutdown"
    await eventually(lambda: not any(_alive(pid) for pid in workers), 20, "workers gone")
    with pytest.raises(OSError):
        _, w = await asyncio.open_connection("127.0.0.1", proc.port)
        w.close()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, reaped by init soon, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
