"""Operations: the node pool and its probes, ``/ready`` and drain, ``/metrics``, JSON logs,
and certificate reload, each driven end to end over real sockets on 127.0.0.1.

Where node choice is random (the pool shuffles healthy or unprobed nodes), the tests use
enough sessions that the chance of a false failure is below 1e-10, and say so. No test
asserts a timing: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import ghostcloak_relay
from ghostcloak_relay.devnode import DevNode, start_devnode
from ghostcloak_relay.server import RelayServer

from .conftest import (
    TIMEOUT,
    VENV_BIN,
    Client,
    RelayFactory,
    ScriptedUpstream,
    UpstreamConn,
    eventually,
    free_port,
    relay_url,
)

ClientFactory = Callable[..., Awaitable[Client]]
NodeFactory = Callable[..., Awaitable[DevNode]]

# -- helpers -------------------------------------------------------------------------------


def _get(url: str, ctx: ssl.SSLContext | None) -> tuple[int, bytes]:
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if ctx is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=TIMEOUT) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


async def http_get(url: str, ctx: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    return await asyncio.to_thread(_get, url, ctx)


@dataclass
class Metrics:
    text: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    labels: list[dict[str, str]]

    def get(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in self.samples, f"no sample {name}{labels} in /metrics"
        return self.samples[key]

    def count(self, name: str, **labels: str) -> float:
        """A counter sample that is only exported once it is non-zero (refused_total)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


def parse_metrics(text: str) -> Metrics:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    labels: list[dict[str, str]] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
            labels.append(dict(s.labels))
    return Metrics(text, samples, labels)


async def scrape(base: str, ctx: ssl.SSLContext | None = None) -> Metrics:
    status, body = await http_get(base + "/metrics", ctx)
    assert status == 200
    return parse_metrics(body.decode())


def base_url(server: RelayServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def healthy_flag(server: RelayServer, node: int) -> float:
    return (await scrape(base_url(server))).get("ghostcloak_relay_node_healthy", node=str(node))


async def wait_healthy(server: RelayServer, node: int, value: int, what: str = "") -> None:
    async def check() -> bool:
        return await healthy_flag(server, node) == value

    await eventually(check, what=what or f"node_healthy{{node={node}}} == {value}")


async def rpc_call(ws: ClientConnection, method: str, params: Any = None, req_id: int = 1) -> Any:
    request = {"jsonrpc": "2.0", "id": req_id, "method": method, "params": params or []}
    await ws.send(orjson.dumps(request).decode())
    answer = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert answer["id"] == req_id
    return answer


def dead_url() -> str:
    """A node URL with nothing listening (connection refused)."""
    return f"ws://127.0.0.1:{free_port()}"


@pytest.fixture
async def node_factory() -> AsyncIterator[NodeFactory]:
    """Extra in-process dev nodes (blocks only on demand), all stopped at the end."""
    nodes: list[DevNode] = []

    async def make(port: int = 0) -> DevNode:
        node = await start_devnode("127.0.0.1", port, block_time=3600)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.aclose()


class DevNodeProcess:
    """``ghostcloak-relay devnode`` as a child process, so that it can die abruptly
    (SIGKILL: TCP connections drop without a WebSocket CLOSE)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"ws://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "ghostcloak-relay"),
                "devnode",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--block-time",
                "3600",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_listening(self) -> None:
        async def up() -> bool:
            assert self.proc.poll() is None, "dev node process exited early"
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            w.close()
            return True

        await eventually(up, 20, "dev node process listening")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
async def node_process() -> AsyncIterator[Callable[[], Awaitable[DevNodeProcess]]]:
    procs: list[DevNodeProcess] = []

    async def make() -> DevNodeProcess:
        proc = DevNodeProcess(free_port())
        procs.append(proc)
        await proc.wait_listening()
        return proc

    yield make
    for proc in procs:
        proc.kill()


async def open_relay_sessions(
    client_factory: ClientFactory, server: RelayServer, prefix: str, count: int, per_conn: int = 15
) -> list[tuple[Client, str]]:
    """``count`` sessions on ``/relay``, ``per_conn`` per connection, each proven open by a
    round trip."""
    sessions: list[tuple[Client, str]] = []
    client: Client | None = None
    for i in range(count):
        if i % per_conn == 0:
            client = await client_factory(relay_url(server))
        assert client is not None
        sid = f"{prefix}-{i:04d}"
        await client.start(sid)
        assert (await client.call(sid, "system_chain"))["result"] == "GhostCloak Dev"
        sessions.append((client, sid))
    return sessions


async def open_rpc_sessions(
    server: RelayServer, count: int, *, sequential: bool = False
) -> list[ClientConnection]:
    """``count`` ``/rpc`` connections (one session each), each proven by a round trip;
    opened all at once unless ``sequential``."""

    async def one() -> ClientConnection:
        ws = await connect(relay_url(server, "/rpc"), open_timeout=TIMEOUT)
        assert (await rpc_call(ws, "system_chain"))["result"] == "GhostCloak Dev"
        return ws

    if sequential:
        return [await one() for _ in range(count)]
    return list(await asyncio.gather(*(one() for _ in range(count))))


async def close_all(conns: list[ClientConnection]) -> None:
    for ws in conns:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2)


# -- 1. the node pool ----------------------------------------------------------------------


async def test_sessions_spread_over_every_node_of_the_pool(
    relay_factory: RelayFactory, node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    nodes = [await node_factory() for _ in range(3)]
    relay = await relay_factory(node=tuple(n.url for n in nodes))  # probes off: only sessions
    # 60 sessions, each on a node picked uniformly at random among 3: the chance that some
    # node gets none is at most 3 * (2/3)**60 < 1e-10.
    relay_sessions = await open_relay_sessions(client_factory, relay, "spread", 30)
    rpc_conns = await open_rpc_sessions(relay, 30)
    try:
        counts = [n.total_connections for n in nodes]
        assert all(c > 0 for c in counts), counts
        assert sum(counts) == 60
        metrics = await scrape(base_url(relay))
        for i, node in enumerate(nodes):
            connects = metrics.get("ghostcloak_relay_upstream_connects_total", node=str(i))
            assert connects == node.total_connections
        assert len(relay_sessions) == 30
    finally:
        await close_all(rpc_conns)


async def test_failover_past_a_dead_first_node_without_probes(
    relay_factory: RelayFactory, node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    live = [await node_factory() for _ in range(2)]
    relay = await relay_factory(node=(dead_url(), live[0].url, live[1].url))
    # Without probes the relay learns that node 0 is dead only by dialing it. Each session
    # dials it first with probability 1/3 until it has failed once; over 60 sessions it is
    # never tried with probability (2/3)**60 < 1e-10. Every session must start regardless.
    # (One at a time, so that the first failure is known before the next session dials.)
    relay_sessions = await open_relay_sessions(client_factory, relay, "failover", 40)
    rpc_conns = await open_rpc_sessions(relay, 20, sequential=True)
    try:
        assert len(relay_sessions) == 40
        assert sum(n.total_connections for n in live) == 60
        metrics = await scrape(base_url(relay))
        assert "upstream_unavailable" not in {lb.get("reason") for lb in metrics.labels}
        # tried exactly once: after the failure it is the last resort behind live nodes
        assert metrics.get("ghostcloak_relay_upstream_failures_total", node="0") == 1
        assert metrics.get("ghostcloak_relay_upstream_connects_total", node="0") == 1
        assert metrics.get("ghostcloak_relay_node_healthy", node="0") == 0
    finally:
        await close_all(rpc_conns)


async def test_failover_past_a_dead_first_node_with_probes(
    relay_factory: RelayFactory, node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    live = [await node_factory() for _ in range(2)]
    relay = await relay_factory(
        node=(dead_url(), live[0].url, live[1].url), probe_nodes=True, node_probe_interval=0.1
    )
    # sessions right away, some probably before the first probe has answered
    early = await open_relay_sessions(client_factory, relay, "early", 10)
    assert len(early) == 10
    await wait_healthy(relay, 0, 0)
    await wait_healthy(relay, 1, 1)
    await wait_healthy(relay, 2, 1)
    before = await scrape(base_url(relay))
    dialed = before.get("ghostcloak_relay_upstream_connects_total", node="0")
    late = await open_relay_sessions(client_factory, relay, "late", 20)
    rpc_conns = await open_rpc_sessions(relay, 10)
    try:
        assert len(late) == 20
        after = await scrape(base_url(relay))
        # a node known to be unhealthy is not dialed while healthy ones exist
        assert after.get("ghostcloak_relay_upstream_connects_total", node="0") == dialed
        assert after.count("ghostcloak_relay_refused_total", reason="upstream_unavailable") == 0
        status, _ = await http_get(base_url(relay) + "/ready")
        assert status == 200
    finally:
        await close_all(rpc_conns)


async def test_probes_mark_a_dead_node_unhealthy_and_a_returning_one_healthy(
    relay_factory: RelayFactory, node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    a = await node_factory()
    b = await node_factory()
    port = a.port
    relay = await relay_factory(node=(a.url, b.url), probe_nodes=True, node_probe_interval=0.1)
    await wait_healthy(relay, 0, 1)
    await wait_healthy(relay, 1, 1)

    await a.aclose()
    await wait_healthy(relay, 0, 0, "dead node 0 marked unhealthy")
    assert await healthy_flag(relay, 1) == 1
    c = await client_factory(relay_url(relay))
    for i in range(10):  # all on node 1, none refused
        await c.start(f"while-dead-{i:03d}")
    metrics = await scrape(base_url(relay))
    assert metrics.count("ghostcloak_relay_refused_total", reason="upstream_unavailable") == 0
    dialed = metrics.get("ghostcloak_relay_upstream_connects_total", node="0")

    await node_factory(port)  # back on the same port
    await wait_healthy(relay, 0, 1, "returning node 0 marked healthy")
    # both healthy again: 40 sessions all on node 1 has probability 2**-40 < 1e-12
    await open_relay_sessions(client_factory, relay, "after-return", 40)
    metrics = await scrape(base_url(relay))
    assert metrics.get("ghostcloak_relay_upstream_connects_total", node="0") > dialed


async def test_sessions_on_a_node_that_dies_end_with_upstream_error(
    relay_factory: RelayFactory,
    node_factory: NodeFactory,
    node_process: Callable[[], Awaitable[DevNodeProcess]],
    client_factory: ClientFactory,
) -> None:
    doomed = await node_process()
    survivor = await node_factory()
    relay = await relay_factory(node=(doomed.url, survivor.url))  # probes off
    # 48 sessions, each on either node with probability 1/2: all on one node has
    # probability 2**-47 < 1e-14.
    relay_sessions = await open_relay_sessions(client_factory, relay, "dies", 42, per_conn=14)
    rpc_conns = await open_rpc_sessions(relay, 6)
    try:
        on_survivor = survivor.active_connections  # probes off: one per session
        total = len(relay_sessions) + len(rpc_conns)
        assert 0 < on_survivor < total

        doomed.kill()  # abrupt: no WebSocket CLOSE from the node
        await eventually(
            lambda: relay.manager.active_count() == on_survivor, what="dead sessions ended"
        )

        alive = 0
        ended: list[str] = []
        clients = list(dict.fromkeys(c for c, _ in relay_sessions))
        expected_ended = {sid for _, sid in relay_sessions}
        for client in clients:
            # read the session_ended envelopes that arrived for the sessions of node 0
            with contextlib.suppress(TimeoutError):
                while True:
                    msg = await client.recv(0.2)
                    assert msg["type"] == "session_ended", msg
                    assert msg["reason"] == "upstream_error", msg
                    ended.append(msg["sessionId"])
        for client, sid in relay_sessions:
            if sid in ended:
                continue
            assert (await client.call(sid, "system_name", req_id=2))["result"]
            alive += 1
        rpc_closes: list[tuple[int, str] | None] = []
        for ws in rpc_conns:
            try:
                answer = await rpc_call(ws, "system_name", req_id=2)
            except ConnectionClosed as exc:
                rpc_closes.append(None if exc.rcvd is None else (exc.rcvd.code, exc.rcvd.reason))
            else:
                assert answer["result"]
                alive += 1
        assert all(close == (1014, "upstream_error") for close in rpc_closes), rpc_closes
        rpc_closed = len(rpc_closes)
        assert set(ended) <= expected_ended
        assert alive == on_survivor
        assert len(ended) + rpc_closed == total - on_survivor
        metrics = await scrape(base_url(relay))
        assert metrics.get("ghostcloak_relay_sessions_ended_total", reason="upstream_error") == (
            total - on_survivor
        )
    finally:
        await close_all(rpc_conns)


async def test_all_nodes_dead_is_upstream_unavailable_after_one_try_each(
    relay_factory: RelayFactory, client_factory: ClientFactory
) -> None:
    urls = tuple(dead_url() for _ in range(4))
    relay = await relay_factory(node=urls)
    c = await client_factory(relay_url(relay))
    await c.send({"type": "session_start", "sessionId": "nobody-home-1"})
    msg = await c.expect(type="error", code="upstream_unavailable")
    assert msg["sessionId"] == "nobody-home-1"
    metrics = await scrape(base_url(relay))
    tries = sum(
        metrics.get("ghostcloak_relay_upstream_connects_total", node=str(i))
        for i in range(len(urls))
    )
    assert tries == len(urls)  # every configured node once, then upstream_unavailable
    # the id is free again, and /rpc is closed with 1014 upstream_unavailable
    await c.send({"type": "session_start", "sessionId": "nobody-home-1"})
    await c.expect(type="error", code="upstream_unavailable", sessionId="nobody-home-1")
    ws = await connect(relay_url(relay, "/rpc"), open_timeout=TIMEOUT)
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1014, "upstream_unavailable")
    metrics = await scrape(base_url(relay))
    assert metrics.count("ghostcloak_relay_refused_total", reason="upstream_unavailable") == 3
    assert relay.manager.active_count() == 0


async def test_a_stalled_node_is_taken_out_and_returns_when_it_advances(
    relay_factory: RelayFactory, node_factory: NodeFactory, client_factory: ClientFactory
) -> None:
    stalled = await node_factory()
    busy = await node_factory()
    relay = await relay_factory(
        node=(stalled.url, busy.url),
        probe_nodes=True,
        node_probe_interval=0.1,
        node_stale_after=0.5,
    )
    producing: set[DevNode] = {busy}

    async def produce() -> None:
        while True:
            for node in list(producing):
                node.produce_block()
            await asyncio.sleep(0.05)

    producer = asyncio.create_task(produce())
    try:
        await wait_healthy(relay, 0, 0, "stalled node taken out")
        await wait_healthy(relay, 1, 1)
        metrics = await scrape(base_url(relay))
        assert metrics.get("ghostcloak_relay_node_best_block", node="1") > 0
        dialed = metrics.get("ghostcloak_relay_upstream_connects_total", node="0")
        await open_relay_sessions(client_factory, relay, "avoid-stalled", 20)
        metrics = await scrape(base_url(relay))
        assert metrics.get("ghostcloak_relay_upstream_connects_total", node="0") == dialed
        assert metrics.get("ghostcloak_relay_upstream_connects_total", node="1") >= 20

        producing.add(stalled)  # its chain advances again
        await wait_healthy(relay, 0, 1, "stalled node back once it advances")
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


# -- 2. /ready and drain -------------------------------------------------------------------


async def test_ready_follows_node_health(
    relay_factory: RelayFactory, node_factory: NodeFactory
) -> None:
    port = free_port()
    relay = await relay_factory(
        node=(f"ws://127.0.0.1:{port}",), probe_nodes=True, node_probe_interval=0.1
    )
    ready_url, health_url = base_url(relay) + "/ready", base_url(relay) + "/health"

    async def ready_is(status: int) -> bool:
        return (await http_get(ready_url))[0] == status

    status, body = await http_get(ready_url)
    assert status == 503
    assert orjson.loads(body)["healthyNodes"] == 0
    assert (await http_get(health_url))[0] == 200  # alive though not ready

    node = await node_factory(port)
    await eventually(lambda: ready_is(200), what="/ready 200 once a probe succeeds")
    status, body = await http_get(ready_url)
    assert orjson.loads(body) == {"status": "ready", "draining": False, "healthyNodes": 1}

    await node.aclose()
    await eventually(lambda: ready_is(503), what="/ready 503 when every node is dead")
    assert (await http_get(health_url))[0] == 200


async def test_drain_turns_ready_503_keeps_health_and_refuses_upgrades(
    relay_factory: RelayFactory, client_factory: ClientFactory
) -> None:
    release = asyncio.Event()

    async def handler(conn: UpstreamConn, msg: Any) -> None:
        method = msg.get("method")
        if method == "system_health":  # enough of a node for the probes
            result: Any = {"peers": 0, "isSyncing": False, "shouldHavePeers": False}
        elif method == "chain_getHeader":
            result = {"number": "0x1"}
        else:
            await release.wait()  # a slow node
            result = f"slow:{method}"
        await conn.ws.send(orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}))

    up = ScriptedUpstream()
    up.handler = handler
    await up.start()
    shutdown: asyncio.Task[None] | None = None
    try:
        relay = await relay_factory(node=(up.url,), probe_nodes=True, node_probe_interval=0.1)
        base = base_url(relay)
        await eventually(
            lambda: _status_is(base + "/ready", 200), what="/ready 200 before draining"
        )
        c = await client_factory(relay_url(relay))
        await c.start("drain-session-1")
        await c.send(
            {
                "type": "proxy",
                "sessionId": "drain-session-1",
                "payload": {"jsonrpc": "2.0", "id": 7, "method": "system_chain", "params": []},
            }
        )
        await eventually(lambda: relay.in_flight() == 1, what="request in flight")

        shutdown = asyncio.create_task(relay.shutdown())
        await eventually(lambda: relay.draining, what="draining")

        status, body = await http_get(base + "/ready")
        assert status == 503
        assert orjson.loads(body)["draining"] is True
        status, body = await http_get(base + "/health")
        assert status == 200
        assert orjson.loads(body) == {"status": "ok", "activeSessions": 1}
        metrics = await scrape(base)
        assert metrics.get("ghostcloak_relay_draining") == 1
        assert metrics.get("ghostcloak_relay_ready") == 0
        for path in ("/relay", "/rpc"):
            with pytest.raises(InvalidStatus) as info:
                await connect(relay_url(relay, path), open_timeout=TIMEOUT)
            assert info.value.response.status_code == 503
        # the open connection cannot start another session either
        await c.send({"type": "session_start", "sessionId": "drain-session-2"})
        await c.expect(type="error", code="shutting_down", sessionId="drain-session-2")

        release.set()  # the node answers within the drain window: the client gets it
        answer = await c.expect(type="proxy", sessionId="drain-session-1")
        assert answer["payload"] == {"jsonrpc": "2.0", "id": 7, "result": "slow:system_chain"}
        await c.expect(type="session_ended", sessionId="drain-session-1", reason="shutdown")
        await asyncio.wait_for(shutdown, TIMEOUT)
    finally:
        release.set()
        if shutdown is not None and not shutdown.done():
            shutdown.cancel()
        await up.close()


async def _status_is(url: str, status: int) -> bool:
    return (await http_get(url))[0] == status


# -- 3. /metrics ---------------------------------------------------------------------------


async def test_metrics_count_a_known_workload_without_client_data_in_labels(
    relay_factory: RelayFactory, devnode: DevNode, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(devnode.url,), probe_nodes=True)
    base = base_url(relay)
    await wait_healthy(relay, 0, 1)
    s1, s2 = "metrics-session-a1b2c3d4", "metrics-session-e5f6a7b8"
    sent: list[bytes] = []  # what should reach the node, byte for byte
    received: list[bytes] = []  # what the node sent back, byte for byte
    methods = ["system_chain", "system_name", "author_rotateKeys", "system_version"]

    c = await client_factory(relay_url(relay))
    await c.start(s1)
    await c.start(s2)

    async def relay_call(sid: str, method: str, req_id: int) -> dict[str, Any]:
        payload = {"jsonrpc": "2.0", "id": req_id, "method": method, "params": []}
        await c.send({"type": "proxy", "sessionId": sid, "payload": payload})
        raw = await asyncio.wait_for(c.ws.recv(), TIMEOUT)
        raw_bytes = raw.encode() if isinstance(raw, str) else raw
        envelope = orjson.loads(raw_bytes)
        assert envelope["type"] == "proxy"
        assert envelope["sessionId"] == sid
        if "error" not in envelope["payload"]:
            sent.append(orjson.dumps(payload))
            # the envelope is {"type":"proxy","sessionId":..,"payload":<node bytes>}
            start = raw_bytes.index(b'"payload":') + len(b'"payload":')
            received.append(raw_bytes[start:-1])
        result: dict[str, Any] = envelope["payload"]
        return result

    assert (await relay_call(s1, "system_chain", 1))["result"] == "GhostCloak Dev"
    assert (await relay_call(s2, "system_name", 1))["result"]
    refused = await relay_call(s1, "author_rotateKeys", 2)  # unsafe: the relay answers
    assert refused["error"]["code"] == -32601
    await c.send({"type": "session_end", "sessionId": s2})
    await c.expect(type="session_ended", sessionId=s2, reason="client")

    ws = await connect(relay_url(relay, "/rpc"), open_timeout=TIMEOUT)
    try:
        for req_id, method in enumerate(("system_version", "system_chain"), 1):
            text = orjson.dumps(
                {"jsonrpc": "2.0", "id": req_id, "method": method, "params": []}
            ).decode()
            await ws.send(text)
            answer = await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert isinstance(answer, str)
            assert orjson.loads(answer)["id"] == req_id
            sent.append(text.encode())
            received.append(answer.encode())
        client_ports = {c.ws.local_address[1], ws.local_address[1]}

        m = await scrape(base)
    finally:
        await ws.close()

    assert m.get("ghostcloak_relay_sessions_started_total", endpoint="relay") == 2
    assert m.get("ghostcloak_relay_sessions_started_total", endpoint="rpc") == 1
    assert m.get("ghostcloak_relay_sessions_ended_total", reason="client") == 1
    assert m.get("ghostcloak_relay_sessions_active") == 2
    assert m.get("ghostcloak_relay_connections_total", endpoint="relay") == 1
    assert m.get("ghostcloak_relay_connections_total", endpoint="rpc") == 1
    assert m.get("ghostcloak_relay_connections_active", endpoint="relay") == 1
    answered = len(sent)
    assert answered == 4
    assert m.get("ghostcloak_relay_messages_total", direction="to_node") == answered
    assert m.get("ghostcloak_relay_messages_total", direction="to_client") == answered
    assert m.get("ghostcloak_relay_bytes_total", direction="to_node") == sum(map(len, sent))
    assert m.get("ghostcloak_relay_bytes_total", direction="to_client") == sum(map(len, received))
    assert m.count("ghostcloak_relay_refused_total", reason="method_not_allowed") == 1
    assert m.get("ghostcloak_relay_upstream_connects_total", node="0") == 3
    assert m.get("ghostcloak_relay_upstream_failures_total", node="0") == 0
    assert m.get("ghostcloak_relay_node_healthy", node="0") == 1
    assert m.get("ghostcloak_relay_upstream_rtt_seconds_count") == answered
    assert m.get("ghostcloak_relay_upstream_rtt_seconds_bucket", le="+Inf") == answered
    assert m.get("ghostcloak_relay_upstream_rtt_seconds_sum") > 0
    assert m.get("ghostcloak_relay_ready") == 1
    assert m.get("process_resident_memory_bytes") > 0
    plane = "compiled" if ghostcloak_relay.NATIVE else "python"
    assert m.get("ghostcloak_relay_build_info", version="0.1.0", data_plane=plane) == 1

    forbidden = {s1, s2, "127.0.0.1", *methods, *(str(p) for p in client_ports)}
    for labels in m.labels:
        for value in labels.values():
            for bad in forbidden:
                assert bad not in value, f"label value {value!r} holds client data {bad!r}"
    for bad in (s1, s2, *methods):
        assert bad not in m.text


async def test_metrics_byte_counts_are_bytes_for_non_ascii_text(
    relay_factory: RelayFactory, devnode: DevNode
) -> None:
    """``bytes_total{direction="to_node"}`` counts bytes, on ``/rpc`` as on ``/relay``."""
    relay = await relay_factory(node=(devnode.url,))
    text = orjson.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "system_accountNextIndex", "params": ["Zürich€✓"]}
    ).decode()
    async with connect(relay_url(relay, "/rpc"), open_timeout=TIMEOUT) as ws:
        await ws.send(text)
        assert orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["id"] == 1
        m = await scrape(base_url(relay))
    assert len(text.encode()) > len(text)
    assert m.get("ghostcloak_relay_bytes_total", direction="to_node") == len(text.encode())


# -- 4. JSON logs --------------------------------------------------------------------------


async def test_json_logs_one_object_per_line_and_nothing_of_the_client(
    relay_process: Any, devnode: DevNode, client_factory: ClientFactory
) -> None:
    proc = relay_process(
        {"MIDNIGHT_NODE": devnode.url, "RELAY_LOG_FORMAT": "json", "RELAY_LOG_LEVEL": "debug"}
    )
    await proc.wait_listening()
    base = f"ws://127.0.0.1:{proc.port}"
    sid = "logcheck-7d1e2f9a-session"
    markers = ["PAYLOAD-MARKER-5f3c9e", "RPC-MARKER-0c4b1a", "UNKNOWN-SESSION-9e8d7c"]

    c = await client_factory(base + "/relay")
    await c.start(sid)
    await c.send(
        {
            "type": "proxy",
            "sessionId": sid,
            "payload": {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "system_accountNextIndex",
                "params": [markers[0]],
            },
        }
    )
    await c.expect(type="proxy", sessionId=sid)
    await c.send(  # refused by policy, with a marker in its params
        {
            "type": "proxy",
            "sessionId": sid,
            "payload": {"jsonrpc": "2.0", "id": 2, "method": "author_rotateKeys", "params": [sid]},
        }
    )
    await c.expect(type="proxy", sessionId=sid)
    await c.send({"type": "proxy", "sessionId": markers[2], "payload": {"id": 3}})
    await c.expect(type="error", code="unknown_session")
    await c.send({"type": "session_end", "sessionId": sid})
    await c.expect(type="session_ended", sessionId=sid, reason="client")
    async with connect(base + "/rpc", open_timeout=TIMEOUT) as ws:
        await rpc_call(ws, "system_accountNextIndex", [markers[1]])
        await ws.send("not json " + markers[1])
        assert orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["error"]["code"] == -32700
        rpc_port = ws.local_address[1]
    port = c.ws.local_address[1]
    await c.ws.close()

    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.wait_exit() == 0
    lines = [line for line in proc.output.splitlines() if line.strip()]
    assert len(lines) >= 3  # at least listening, a session line at debug, shutdown
    levels = set()
    session_lines = 0
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), line
        levels.add(entry["level"])
        if entry["level"] == "debug" and entry["logger"] == "ghostcloak_relay.session":
            session_lines += 1  # the session's events are logged, under a keyed hash
        for bad in (sid, *markers, "system_accountNextIndex", "author_rotateKeys"):
            assert bad not in line, f"log line holds client data {bad!r}: {line}"
        for p in (port, rpc_port):
            assert not re.search(rf"(?<!\d){p}(?!\d)", line), f"client port in: {line}"
    assert session_lines >= 2
    assert "info" in levels


async def test_invalid_log_format_exits_with_one_line_naming_the_variable(
    relay_process: Any,
) -> None:
    proc = relay_process({"RELAY_LOG_FORMAT": "xml", "MIDNIGHT_NODE": dead_url()})
    code = await proc.wait_exit()
    assert code != 0
    lines = [line for line in proc.output.splitlines() if line.strip()]
    assert len(lines) == 1, proc.output
    assert "RELAY_LOG_FORMAT" in lines[0]
    assert "xml" in lines[0]


# -- 5. certificate reload -----------------------------------------------------------------


@dataclass
class Pair:
    ca: trustme.CA
    cert: bytes
    key: bytes

    @classmethod
    def make(cls) -> Pair:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return cls(ca, chain, leaf.private_key_pem.bytes())

    def trust(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def replace_file(path: Path, data: bytes, *, keep_mtime: bool) -> None:
    """Atomically replace ``path``. With ``keep_mtime`` the new file carries the old
    modification time, so the relay's file watcher does not see the change and only
    SIGHUP reloads it (which keeps the reload counters exact)."""
    old = path.stat()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if keep_mtime:
        os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(tmp, path)


async def wss_connects(url: str, ctx: ssl.SSLContext) -> bool:
    """True if a wss connection trusting only ``ctx``'s CA is accepted; False when the
    relay's certificate does not verify."""
    try:
        ws = await connect(url, ssl=ctx, open_timeout=TIMEOUT)
    except ssl.SSLCertVerificationError:
        return False
    await ws.close()
    return True


async def test_certificate_reload_on_sighup_and_on_file_change(
    relay_process: Any, devnode: DevNode, tmp_path: Path
) -> None:
    a, b, c = Pair.make(), Pair.make(), Pair.make()
    cert, key = tmp_path / "relay-cert.pem", tmp_path / "relay-key.pem"
    cert.write_bytes(a.cert)
    key.write_bytes(a.key)
    proc = relay_process(
        {"MIDNIGHT_NODE": devnode.url, "RELAY_TLS_CERT": str(cert), "RELAY_TLS_KEY": str(key)}
    )
    await proc.wait_listening()
    wss = f"wss://127.0.0.1:{proc.port}/relay"
    https = f"https://127.0.0.1:{proc.port}"

    async def reloads(ctx: ssl.SSLContext) -> tuple[float, float]:
        m = await scrape(https, ctx)
        return (
            m.get("ghostcloak_relay_tls_reloads_total", result="ok"),
            m.get("ghostcloak_relay_tls_reloads_total", result="failed"),
        )

    async def round_trip(client: Client, sid: str, req_id: int) -> None:
        assert (await client.call(sid, "system_chain", req_id=req_id))["result"] == (
            "GhostCloak Dev"
        )

    old_ws = await connect(wss, ssl=a.trust(), open_timeout=TIMEOUT)
    try:
        old = Client(old_ws)
        await old.start("tls-old-session")
        await round_trip(old, "tls-old-session", 1)
        assert await reloads(a.trust()) == (0, 0)

        # SIGHUP with B's pair in place: new connections get B, the old session goes on
        replace_file(cert, b.cert, keep_mtime=True)
        replace_file(key, b.key, keep_mtime=True)
        proc.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: wss_connects(wss, b.trust()), what="B served after SIGHUP")
        assert not await wss_connects(wss, a.trust())
        assert await reloads(b.trust()) == (1, 0)
        await round_trip(old, "tls-old-session", 2)

        # a garbage certificate: refused with a log line, B keeps serving
        replace_file(cert, b"-----BEGIN CERTIFICATE-----\ngarbage\n", keep_mtime=True)
        proc.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: "TLS reload refused" in proc.output, what="refusal logged")
        assert await reloads(b.trust()) == (1, 1)
        b_ws = await connect(wss, ssl=b.trust(), open_timeout=TIMEOUT)
        b_client = Client(b_ws)
        await b_client.start("tls-b-session")
        await round_trip(b_client, "tls-b-session", 1)
        await b_ws.close()

        # a key that does not match the certificate: refused too, B keeps serving
        replace_file(cert, c.cert, keep_mtime=True)
        replace_file(key, b.key, keep_mtime=True)
        proc.proc.send_signal(signal.SIGHUP)

        async def failed_twice() -> bool:
            return await reloads(b.trust()) == (1, 2)

        await eventually(failed_twice, what="mismatched pair refused")
        assert proc.output.count("TLS reload refused") == 2
        assert await wss_connects(wss, b.trust())
        assert not await wss_connects(wss, c.trust())
        await round_trip(old, "tls-old-session", 3)

        # the file-change path, no signal: the key first (unseen), then the certificate
        replace_file(key, c.key, keep_mtime=True)
        replace_file(cert, c.cert, keep_mtime=False)
        await eventually(lambda: wss_connects(wss, c.trust()), what="C served after file change")
        assert not await wss_connects(wss, b.trust())
        assert await reloads(c.trust()) == (2, 2)
        await round_trip(old, "tls-old-session", 4)
        m = await scrape(https, c.trust())
        assert m.get("ghostcloak_relay_tls_certificate_expiry_timestamp_seconds") > 0
    finally:
        await old_ws.close()
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.wait_exit() == 0


async def test_metrics_port_keeps_metrics_off_the_public_port(
    relay_factory: RelayFactory, devnode: DevNode
) -> None:
    """RELAY_METRICS_PORT: /metrics (with /health and /ready) on a separate listener; the
    public port then answers 404 for /metrics, and the admin port takes no WebSocket."""
    relay = await relay_factory(node=(devnode.url,), metrics_port=0)
    assert relay.metrics_port is not None
    admin = f"http://127.0.0.1:{relay.metrics_port}"
    public = base_url(relay)

    def status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return err.code

    assert await asyncio.to_thread(status, public + "/metrics") == 404
    assert await asyncio.to_thread(status, public + "/health") == 200
    assert await asyncio.to_thread(status, admin + "/health") == 200
    metrics = await scrape(admin)
    assert metrics.get("ghostcloak_relay_sessions_active") == 0
    with pytest.raises(InvalidStatus) as info:
        await connect(f"ws://127.0.0.1:{relay.metrics_port}/relay", open_timeout=TIMEOUT)
    assert info.value.response.status_code == 404
