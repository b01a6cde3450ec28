"""Backpressure end to end: a client that does not read, and a node that does not read.

Both tests run the relay as a subprocess (``ghostcloak-relay serve``) so that its memory
can be read from ``/proc/<pid>/status`` without the test's own allocations in it, and
drive it with test-controlled upstreams on 127.0.0.1:

* a fast subscription: the node pushes ~2 KB notifications as fast as ``await
  ws.send()`` lets it, to a client that never reads. The relay must stop reading the node
  (TCP pushes back, the node's sends stall), keep its memory bounded, keep serving other
  clients, and close the stuck client after ``RELAY_SLOW_CLIENT_TIMEOUT`` (1013);
* a slow node: the node stops reading its socket; the relay must stop reading the
  client sending to it (the client's sends block), keep its memory bounded, end that
  session after ``RELAY_SLOW_CLIENT_TIMEOUT`` (``/rpc``: 1014 ``upstream_error``), and
  release everything of it.

Nothing here asserts a duration: conditions are polled with deadlines. Latencies are
printed (run with ``-s``) for the record only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import struct
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, eventually
from .rawws import frame, upgrade_request

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
CLIENT_BUFFER = 256 * 1024  # RELAY_CLIENT_BUFFER_BYTES of the relay under test
SLOW_TIMEOUT = 5  # RELAY_SLOW_CLIENT_TIMEOUT (seconds)
RSS_BUDGET = 64 * MiB  # relay RSS growth allowed while a peer is stuck
FLOOD_CAP_BYTES = 200 * MiB  # the node would send this much if nothing pushed back
FLOOD_CAP_SECONDS = 60.0
STALL_SAMPLES = 5  # consecutive unchanged samples (SAMPLE apart) that make a stall
SAMPLE = 0.2
SMALL_SOCKET_BUFFER = 4096  # SO_RCVBUF of the peers that do not read (the kernel doubles it)


# -- the relay subprocess: memory and metrics ------------------------------------------------


def vm_rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes, from ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def tcp_sockets(pid: int) -> list[str]:
    """The TCP sockets ``pid`` holds descriptors for: ``local->remote state tx=bytes``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    with open(f"/proc/{pid}/net/tcp", encoding="ascii") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[9] in inodes:
                local, remote = (int(a.split(":")[1], 16) for a in cols[1:3])
                tx = int(cols[4].split(":")[0], 16)
                out.append(f"{local}->{remote} {TCP_STATES.get(cols[3], cols[3])} tx={tx}")
    return sorted(out)


def sockets_to(pid: int, url: str) -> list[str]:
    """The TCP sockets ``pid`` holds to the server at ``url`` (a node)."""
    port = url.rsplit(":", 1)[1]
    return [s for s in tcp_sockets(pid) if s.split()[0].endswith(f"->{port}")]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        body: bytes = resp.read()
    return body.decode()


async def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics`` of the relay, as {(sample name, sorted labels): value}."""
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(
    m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def sessions_active(port: int) -> int:
    return int(metric(await metrics(port), "ghostcloak_relay_sessions_active"))


class RssSampler:
    """Samples the relay's VmRSS every ``SAMPLE`` seconds in the background."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.samples.append(vm_rss(self.pid))
            await asyncio.sleep(SAMPLE)

    def start(self) -> None:
        self.samples.clear()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> int:
        """Stop; return the largest sample."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(OSError):
            self.samples.append(vm_rss(self.pid))
        return max(self.samples)


def small_buffer_listener(*, rcvbuf: int | None = None) -> socket.socket:
    """A listening socket on 127.0.0.1 whose accepted sockets inherit ``rcvbuf``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def answer(msg: dict[str, Any], result: Any = None) -> bytes:
    method = msg.get("method")
    return orjson.dumps({"jsonrpc": "2.0", "id": msg.get("id"), "result": result or f"ok:{method}"})


# -- a well-behaved client: request/answer round trips ---------------------------------------


@dataclass
class RoundTrips:
    """``system_chain`` round trips on an ``/rpc`` connection until stopped."""

    ws: ClientConnection
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def one(self, req_id: int) -> None:
        started = time.perf_counter()
        req = {"jsonrpc": "2.0", "id": req_id, "method": "system_chain", "params": []}
        await self.ws.send(orjson.dumps(req).decode())
        reply = orjson.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
        assert reply.get("id") == req_id, reply
        assert "result" in reply, reply
        self.latencies.append(time.perf_counter() - started)

    async def _run(self) -> None:
        req_id = 0
        while not self.stop.is_set():
            req_id += 1
            try:
                await self.one(req_id)
            except (Exception, AssertionError) as exc:  # every failure is reported
                self.errors.append(f"round trip {req_id}: {exc!r}")
                return
            await asyncio.sleep(0.02)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def finish(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, TIMEOUT + 5)

    def report(self, label: str) -> str:
        lat = sorted(self.latencies)
        if not lat:
            return f"{label}: no round trips"
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return (
            f"{label}: {len(lat)} round trips, latency ms min {lat[0] * 1e3:.2f} "
            f"median {statistics.median(lat) * 1e3:.2f} p99 {p99 * 1e3:.2f} "
            f"max {lat[-1] * 1e3:.2f}"
        )


# -- a raw WebSocket client that never reads -------------------------------------------------


class StuckClient:
    """A raw TCP WebSocket client with a tiny receive buffer that reads nothing after the
    handshake (so the relay's outbound buffer towards it fills)."""

    def __init__(self, port: int, path: str) -> None:
        self.port = port
        self.path = path
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # before connect, so the advertised window and its scale stay small
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_SOCKET_BUFFER)
        self.sock.setblocking(False)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(self.sock, ("127.0.0.1", self.port)), TIMEOUT)
        await loop.sock_sendall(self.sock, upgrade_request(self.port, self.path))
        head = b""
        while b"\r\n\r\n" not in head:  # read the response head byte by byte: nothing more
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 1), TIMEOUT)
            assert chunk, f"connection closed during the handshake: {head!r}"
            head += chunk
            assert len(head) < 4096
        assert head.startswith(b"HTTP/1.1 101"), head

    async def send_json(self, obj: Any) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_sendall(self.sock, frame(0x1, orjson.dumps(obj))), TIMEOUT)

    async def drain_until_gone(self, timeout: float = 20.0, cap: int = 256 * MiB) -> RawDrain:
        """Read everything the relay left in the connection until EOF or reset; parse
        the frames (server frames are unmasked) to find a CLOSE frame if one arrives."""
        loop = asyncio.get_running_loop()
        result = RawDrain()
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while result.total < cap:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return result
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), remaining)
            except TimeoutError:
                return result
            except ConnectionResetError:
                result.gone = "reset"
                return result
            if not chunk:
                result.gone = "eof"
                return result
            result.total += len(chunk)
            buf += chunk
            result.parse(buf)
        return result

    def close(self) -> None:
        self.sock.close()


@dataclass
class RawDrain:
    total: int = 0
    frames: int = 0
    close_code: int | None = None
    gone: str | None = None  # "eof" or "reset" once the connection is gone

    def parse(self, buf: bytearray) -> None:
        while len(buf) >= 2:
            opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
            offset = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, offset = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, offset = struct.unpack_from("!Q", buf, 2)[0], 10
            if len(buf) < offset + n:
                return
            if opcode == 0x8 and n >= 2:
                self.close_code = struct.unpack_from("!H", buf, offset)[0]
            self.frames += 1
            del buf[: offset + n]


# -- a node with a fast subscription ---------------------------------------------------------


@dataclass
class Flood:
    """One subscription's push loop, as the node sees it."""

    sub: str
    sent: int = 0
    sent_bytes: int = 0
    in_send: bool = False
    finished: bool = False


class FloodNode:
    """Answers requests; on ``chain_subscribeNewHeads`` pushes ~2 KB notifications on
    that connection as fast as ``await ws.send()`` allows (up to ``FLOOD_CAP_BYTES`` or
    ``FLOOD_CAP_SECONDS``)."""

    def __init__(self) -> None:
        self.floods: list[Flood] = []
        self.server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._digest = "0x" + "ab" * 900  # makes each notification about 2 KB

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> FloodNode:
        self.server = await serve(self._serve, "127.0.0.1", 0, ping_interval=None)
        return self

    def notification(self, flood: Flood) -> bytes:
        number = flood.sent + 1
        return orjson.dumps(
            {
                "jsonrpc": "2.0",
                "method": "chain_newHead",
                "params": {
                    "subscription": flood.sub,
                    "result": {
                        "parentHash": "0x" + f"{number - 1:064x}",
                        "number": hex(number),
                        "stateRoot": "0x" + "11" * 32,
                        "extrinsicsRoot": "0x" + "22" * 32,
                        "digest": {"logs": [self._digest]},
                    },
                },
            }
        )

    async def _serve(self, ws: ServerConnection) -> None:
        try:
            async for raw in ws:
                msg = orjson.loads(raw)
                if msg.get("method") == "chain_subscribeNewHeads":
                    flood = Flood(f"flood-{len(self.floods)}")
                    self.floods.append(flood)
                    await ws.send(answer(msg, flood.sub), text=True)
                    task = asyncio.get_running_loop().create_task(self._push(ws, flood))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    await ws.send(answer(msg, "GhostCloak Flood"), text=True)
        except ConnectionClosed:
            pass

    async def _push(self, ws: ServerConnection, flood: Flood) -> None:
        deadline = time.monotonic() + FLOOD_CAP_SECONDS
        try:
            while flood.sent_bytes < FLOOD_CAP_BYTES and time.monotonic() < deadline:
                data = self.notification(flood)
                flood.in_send = True
                await ws.send(data, text=True)
                flood.in_send = False
                flood.sent += 1
                flood.sent_bytes += len(data)
                if flood.sent % 32 == 0:
                    await asyncio.sleep(0)  # send() may not yield while the kernel takes it
        except ConnectionClosed:
            pass
        finally:
            flood.in_send = False
            flood.finished = True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await asyncio.wait_for(self.server.wait_closed(), TIMEOUT)


async def wait_stalled(floods: list[Flood], what: str, timeout: float = 20.0) -> list[int]:
    """Poll until every flood is blocked in ``send()`` and its count stopped moving for
    ``STALL_SAMPLES`` samples; fail if one finished first. Return the stalled counts."""
    history: list[list[int]] = []
    deadline = time.monotonic() + timeout
    while True:
        for f in floods:
            assert not f.finished, f"{what}: a push loop ended before it stalled: {f}"
        history.append([f.sent for f in floods])
        recent = history[-STALL_SAMPLES:]
        if (
            len(recent) == STALL_SAMPLES
            and all(r == recent[0] for r in recent)
            and all(f.in_send for f in floods)
        ):
            return recent[0]
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: node sends never stalled: {floods}")
        await asyncio.sleep(SAMPLE)


def relay_env(node_url: str) -> dict[str, str]:
    return {
        "MIDNIGHT_NODE": node_url,
        "RELAY_CLIENT_BUFFER_BYTES": str(CLIENT_BUFFER),
        "RELAY_SLOW_CLIENT_TIMEOUT": str(SLOW_TIMEOUT),
        "RELAY_RATE_LIMIT": "0",
        "RELAY_RATE_LIMIT_PER_CLIENT": "0",
        "RELAY_NODE_PROBE_INTERVAL": "3600",
        "RELAY_LOG_LEVEL": "info",
    }


# -- 1a: a client that does not read a fast subscription -------------------------------------


async def test_client_not_reading_a_fast_subscription_pushes_back_on_the_node(
    relay_process: Any,
) -> None:
    """A ``/relay`` client with two sessions subscribes to a node that pushes ~2 KB
    notifications as fast as it can, then reads nothing. The relay stops reading both
    nodes (their sends stall far below the 200 MB they would send), its RSS grows less
    than 64 MB, a second client's round trips on another connection all complete, and
    after ``RELAY_SLOW_CLIENT_TIMEOUT`` the stuck client is dropped (1013, then abort)
    and only the second client's session remains, with every descriptor of the stuck
    one released.

    The 1013 CLOSE frame is queued behind the data the client never read, and abort()
    discards it, so the client normally sees the connection end without it; it is
    checked only if it does arrive. The drop is checked through ``refused_total
    {reason="slow_client"}`` and the log line instead."""
    started = time.monotonic()
    node = await FloodNode().start()
    relay = relay_process(relay_env(node.url))
    sampler = RssSampler(relay.proc.pid)
    stuck = StuckClient(relay.port, "/relay")
    good_ws: ClientConnection | None = None
    try:
        await relay.wait_listening()
        pid = relay.proc.pid

        good_ws = await connect(f"ws://127.0.0.1:{relay.port}/rpc", open_timeout=TIMEOUT)
        good = RoundTrips(good_ws)
        for i in range(20):  # warm up both processes before the baseline
            await good.one(-1 - i)
        good.latencies.clear()
        await eventually(  # the start-up probe's connection to the node is gone
            lambda: len(sockets_to(pid, node.url)) == 1, what="only the good session's socket"
        )
        m = await metrics(relay.port)
        baseline_fds = metric(m, "process_open_fds")
        baseline_rss = vm_rss(pid)
        assert metric(m, "ghostcloak_relay_sessions_active") == 1
        good.start()
        sampler.start()

        await stuck.open()
        for n in (1, 2):
            sid = f"stuck-session-{n}"
            await stuck.send_json({"type": "session_start", "sessionId": sid})
            await stuck.send_json(
                {
                    "type": "proxy",
                    "sessionId": sid,
                    "payload": {
                        "jsonrpc": "2.0",
                        "id": n,
                        "method": "chain_subscribeNewHeads",
                        "params": [],
                    },
                }
            )
        await eventually(lambda: len(node.floods) == 2, what="both subscriptions started")
        stalled_at = await wait_stalled(node.floods, "stuck client")
        trips_at_stall = len(good.latencies)
        stalled_bytes = [f.sent_bytes for f in node.floods]
        rss_at_stall = vm_rss(pid)
        print(
            f"\n[1a] node sends stalled at {stalled_at} notifications "
            f"({[round(b / MiB, 1) for b in stalled_bytes]} MiB) per subscription; "
            f"relay RSS baseline {baseline_rss / MiB:.1f} MiB, "
            f"at stall {rss_at_stall / MiB:.1f} MiB"
        )
        for b in stalled_bytes:
            assert b < FLOOD_CAP_BYTES // 4, "TCP backpressure did not reach the node"
        assert rss_at_stall - baseline_rss < RSS_BUDGET

        # the slow-client timeout: the relay drops the stuck connection and both sessions
        await eventually(
            lambda: all(f.finished for f in node.floods),
            timeout=SLOW_TIMEOUT + 15,
            what="the relay closed the stuck client's node connections",
        )
        trips_while_stuck = len(good.latencies) - trips_at_stall

        async def only_good_left() -> bool:
            return await sessions_active(relay.port) == 1

        await eventually(only_good_left, what="sessions_active back to the good client's 1")
        max_rss = await sampler.stop()
        drained = await stuck.drain_until_gone()
        print(
            f"[1a] stuck client: read {drained.total / MiB:.2f} MiB left in the kernel "
            f"({drained.frames} frames) then {drained.gone}; close frame code "
            f"{drained.close_code}; relay RSS max {max_rss / MiB:.1f} MiB "
            f"(+{(max_rss - baseline_rss) / MiB:.1f} MiB)"
        )
        assert drained.gone is not None, "the stuck client's connection is still open"
        if drained.close_code is not None:
            assert drained.close_code == 1013
        assert max_rss - baseline_rss < RSS_BUDGET
        m = await metrics(relay.port)
        assert metric(m, "ghostcloak_relay_refused_total", reason="slow_client") == 1
        assert "client not reading" in relay.output

        fds: list[float] = []

        async def released() -> bool:  # the stuck client's socket and its two node sockets
            fds.append(metric(await metrics(relay.port), "process_open_fds"))
            return fds[-1] <= baseline_fds and len(sockets_to(pid, node.url)) == 1

        with contextlib.suppress(pytest.fail.Exception):
            await eventually(released, timeout=10, what="descriptors released")
        sockets = tcp_sockets(pid)
        print(f"[1a] relay open fds: baseline {baseline_fds:.0f}, after the drop {fds[-1]:.0f}")
        detail = f"relay TCP sockets: {sockets} (node: {node.url})"
        assert len(sockets_to(pid, node.url)) == 1, f"node connections left over; {detail}"
        assert fds[-1] <= baseline_fds, (
            f"the relay holds {fds[-1] - baseline_fds:.0f} more descriptor(s) than before "
            f"the stuck client; {detail}"
        )

        await good.finish()
        for i in range(10):  # the good client goes on after the drop too
            await good.one(10_000 + i)
        print(good.report("[1a] well-behaved client"))
        print(f"[1a] round trips between the stall and the drop: {trips_while_stuck}")
        assert not good.errors, good.errors
        assert trips_while_stuck > 0, "the relay served nobody while a client was stuck"
        assert relay.proc.poll() is None
        print(f"[1a] test time {time.monotonic() - started:.1f} s")
    finally:
        if sampler.samples:
            await sampler.stop()
        stuck.close()
        if good_ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(good_ws.close(), 2)
        await node.close()


# -- 1b: a node that does not read -----------------------------------------------------------

STALL_MARKER = {"jsonrpc": "2.0", "id": 0, "method": "system_name", "params": ["stall"]}


class SlowNode:
    """Answers requests, except that a connection whose first request is
    ``STALL_MARKER`` gets its answer and then is never read again (its socket's reading
    is paused, and its receive buffer is small)."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.stalled: list[ServerConnection] = []
        self.answered = 0
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> SlowNode:
        sock = small_buffer_listener(rcvbuf=SMALL_SOCKET_BUFFER)
        self.server = await serve(self._serve, sock=sock, ping_interval=None, max_queue=1)
        return self

    async def _serve(self, ws: ServerConnection) -> None:
        try:
            async for raw in ws:
                msg = orjson.loads(raw)
                await ws.send(answer(msg), text=True)
                self.answered += 1
                if msg == STALL_MARKER:
                    ws.transport.pause_reading()
                    self.stalled.append(ws)
                    # no more recv(): websockets resumes reading only when its queue is read
                    await self._release.wait()
                    return
        except ConnectionClosed:
            pass

    async def close(self) -> None:
        for ws in self.stalled:
            ws.transport.abort()
        self._release.set()
        if self.server is not None:
            self.server.close()
            await asyncio.wait_for(self.server.wait_closed(), TIMEOUT)


async def test_node_not_reading_pushes_back_on_the_client_and_ends_its_session(
    relay_process: Any,
) -> None:
    """An ``/rpc`` client sends 4 KB requests to a node that stopped reading. The relay
    stops reading that client (its sends block, its write buffer grows), its RSS grows
    less than 64 MB, another client's session keeps answering, and after
    ``RELAY_SLOW_CLIENT_TIMEOUT`` the slow session ends: the client is closed with 1014
    ``upstream_error``, and the relay holds no more descriptors than before it."""
    started = time.monotonic()
    node = await SlowNode().start()
    relay = relay_process(relay_env(node.url))
    sampler = RssSampler(relay.proc.pid)
    good_ws: ClientConnection | None = None
    slow_ws: ClientConnection | None = None
    sender: asyncio.Task[None] | None = None
    try:
        await relay.wait_listening()
        pid = relay.proc.pid
        url = f"ws://127.0.0.1:{relay.port}/rpc"

        good_ws = await connect(url, open_timeout=TIMEOUT)
        good = RoundTrips(good_ws)
        for i in range(20):
            await good.one(-1 - i)
        good.latencies.clear()
        # the start-up probe's connection to the node must be gone from the baseline
        await eventually(
            lambda: len(sockets_to(pid, node.url)) == 1, what="only the good session's socket"
        )
        m = await metrics(relay.port)
        baseline_fds = metric(m, "process_open_fds")
        baseline_sockets = tcp_sockets(pid)
        baseline_rss = vm_rss(pid)
        assert metric(m, "ghostcloak_relay_sessions_active") == 1
        good.start()
        sampler.start()

        slow_ws = await connect(url, open_timeout=TIMEOUT, ping_interval=None)
        await slow_ws.send(orjson.dumps(STALL_MARKER).decode())
        reply = orjson.loads(await asyncio.wait_for(slow_ws.recv(), TIMEOUT))
        assert reply["id"] == 0
        assert len(node.stalled) == 1

        sent = 0
        blocked = False
        pad = "x" * 4000

        async def send_many() -> None:
            nonlocal sent, blocked
            assert slow_ws is not None
            while sent < 20_000:  # 80 MB at most
                req = {"jsonrpc": "2.0", "id": sent + 1, "method": "system_chain", "params": [pad]}
                blocked = True
                await slow_ws.send(orjson.dumps(req).decode())
                blocked = False
                sent += 1
                if sent % 32 == 0:
                    await asyncio.sleep(0)

        sender = asyncio.get_running_loop().create_task(send_many())

        history: list[int] = []
        deadline = time.monotonic() + 20
        while True:  # until the client's sends are blocked and its count stands still
            assert not sender.done(), f"the sender ended before its sends blocked: {sender}"
            history.append(sent)
            recent = history[-STALL_SAMPLES:]
            if len(recent) == STALL_SAMPLES and len(set(recent)) == 1 and blocked:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the client's sends never blocked ({sent} sent)")
            await asyncio.sleep(SAMPLE)
        trips_at_stall = len(good.latencies)
        buffered = slow_ws.transport.get_write_buffer_size()
        rss_at_stall = vm_rss(pid)
        print(
            f"\n[1b] client sends blocked after {sent} requests ({sent * 4 / 1024:.1f} MiB); "
            f"client write buffer {buffered / 1024:.0f} KiB; relay RSS baseline "
            f"{baseline_rss / MiB:.1f} MiB, at stall {rss_at_stall / MiB:.1f} MiB"
        )
        assert buffered > 0
        assert rss_at_stall - baseline_rss < RSS_BUDGET

        # the slow session ends after RELAY_SLOW_CLIENT_TIMEOUT with upstream_error
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(sender, SLOW_TIMEOUT + 15)
        trips_while_stuck = len(good.latencies) - trips_at_stall
        print(
            f"[1b] slow client closed: code {slow_ws.close_code} "
            f"reason {slow_ws.close_reason!r} after {sent} requests"
        )
        assert slow_ws.close_code == 1014
        assert slow_ws.close_reason == "upstream_error"
        max_rss = await sampler.stop()
        assert max_rss - baseline_rss < RSS_BUDGET

        async def only_good_left() -> bool:
            return await sessions_active(relay.port) == 1

        await eventually(only_good_left, what="sessions_active back to the good client's 1")
        m = await metrics(relay.port)
        assert metric(m, "ghostcloak_relay_sessions_ended_total", reason="upstream_error") == 1

        await good.finish()
        for i in range(10):  # the good client goes on
            await good.one(10_000 + i)
        print(good.report("[1b] well-behaved client"))
        print(f"[1b] round trips between the stall and the end of the session: {trips_while_stuck}")
        assert not good.errors, good.errors
        assert trips_while_stuck > 0, "the relay served nobody while a node was stuck"

        # nothing of the ended session is left: its client and node sockets are closed
        fds: list[float] = []

        async def fds_back() -> bool:
            fds.append(metric(await metrics(relay.port), "process_open_fds"))
            return fds[-1] <= baseline_fds and len(sockets_to(pid, node.url)) == 1

        with contextlib.suppress(pytest.fail.Exception):
            await eventually(fds_back, timeout=10, what="fds back to baseline")
        print(
            f"[1b] relay open fds: baseline {baseline_fds:.0f}, after the session ended "
            f"{fds[-1]:.0f}; RSS max {max_rss / MiB:.1f} MiB "
            f"(+{(max_rss - baseline_rss) / MiB:.1f} MiB); test time "
            f"{time.monotonic() - started:.1f} s"
        )
        sockets = tcp_sockets(pid)
        print(f"[1b] relay TCP sockets before: {baseline_sockets}\n[1b] after: {sockets}")
        detail = f"relay TCP sockets now: {sockets}, before: {baseline_sockets} (node: {node.url})"
        assert len(sockets_to(pid, node.url)) == 1, (
            f"the ended session's connection to the node is still open; {detail}"
        )
        assert fds[-1] <= baseline_fds, (
            f"the relay still holds {fds[-1] - baseline_fds:.0f} more descriptor(s) than "
            f"before the slow session, after it ended; {detail}"
        )
        assert relay.proc.poll() is None
    finally:
        if sender is not None and not sender.done():
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
        if sampler.samples:
            await sampler.stop()
        for ws in (slow_ws, good_ws):
            if ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2)
        await node.close()
