"""The HAProxy recipe, for real on 127.0.0.1: two relays behind HAProxy, one drained.

HAProxy runs ``deploy/haproxy/haproxy.cfg`` itself, with only what a test machine needs
changed (listen addresses, the two relays as servers, fast health checks, no per-source
cap since every test client is 127.0.0.1). The relays use the settings the file asks for
behind a proxy. The story:

1. ``/relay`` (two sessions each) and ``/rpc`` connections through HAProxy spread over
   both relays, and every session does round trips, which go on for the whole test.
2. Relay A gets SIGTERM while a request of a direct client is held at its node (a gate
   in front of the dev node), so A stays alive draining: its ``/ready`` is 503, HAProxy
   marks it DOWN while the process still runs, and every new connection through HAProxy
   lands on B and works, those of the first instants included (A's 503 is retried).
3. The gate opens: the held answer reaches the client (drain), then A's clients get
   ``session_ended``/``shutdown`` and close 1001; B's connections never notice. A exits
   0, and new sessions keep landing on B.

Needs HAProxy (``scripts/setup-haproxy.sh``): skips without it, fails when
``RELAY_REQUIRE_HAPROXY=1``. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

from ghostcloak_relay.devnode import DevNode

from .conftest import TIMEOUT, Client, RelayProcess, eventually, free_port
from .test_deploy import HAPROXY_CFG, require_haproxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ClientFactory = Callable[..., Awaitable[Client]]

SHUTDOWN_TIMEOUT = 3.0  # RELAY_SHUTDOWN_TIMEOUT: answers in flight get 80% of it
GATE_HOLD = 1.6  # seconds after SIGTERM that A's node answers are held (< 80% of 3 s)
RELAY_CONNS = 8  # /relay connections through HAProxy, two sessions each
RPC_CONNS = 8  # /rpc connections through HAProxy


# -- helpers ------------------------------------------------------------------------------


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def get(url: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, url)


async def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A relay's /metrics as {(series, sorted labels): value}."""
    status, text = await get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(snapshot: dict[Any, float], name: str, **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


def connections_total(snapshot: dict[Any, float]) -> float:
    return sum(
        value(snapshot, "ghostcloak_relay_connections_total", endpoint=ep)
        for ep in ("relay", "rpc")
    )


def cluster_config(port: int, stats_port: int, servers: dict[str, int]) -> str:
    """deploy/haproxy/haproxy.cfg with test addresses, these servers and fast checks."""
    text = HAPROXY_CFG.read_text()

    def sub(pattern: str, repl: str, expected: int = 1) -> None:
        nonlocal text
        text, n = re.subn(pattern, repl, text, flags=re.M)
        assert n == expected, f"haproxy.cfg changed shape: {pattern!r} matched {n} times"

    sub(r"^(\s*)bind :8443\s*$", rf"\g<1>bind 127.0.0.1:{port}")
    sub(r"^(\s*)bind 127\.0\.0\.1:8404\s*$", rf"\g<1>bind 127.0.0.1:{stats_port}")
    sub(r"\bsc0_conn_cur gt \d+", "sc0_conn_cur gt 1000000")
    sub(r"\bsc0_conn_rate gt \d+", "sc0_conn_rate gt 1000000")
    sub(r"^(\s*default-server .*)\binter \S+", r"\g<1>inter 200ms")
    sub(r"^(\s*default-server .*)\bfastinter \S+", r"\g<1>fastinter 100ms")
    sub(r"^(\s*default-server .*)\bdowninter \S+", r"\g<1>downinter 300ms")
    sub(r"^\s*server relay\d+ .*\n", "", expected=3)
    lines = "".join(f"    server {name} 127.0.0.1:{p}\n" for name, p in servers.items())
    sub(r"^(\s*default-server .*\n)", rf"\g<1>{lines}")
    return text


@dataclass
class HAProxy:
    proc: subprocess.Popen[bytes]
    port: int
    stats_port: int
    log_path: Path

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def servers(self) -> dict[str, dict[str, str]]:
        """Server name -> its row of the stats CSV, for the relays backend."""
        status, text = await get(f"http://127.0.0.1:{self.stats_port}/stats;csv")
        assert status == 200, text
        lines = text.splitlines()
        header = lines[0].lstrip("# ").split(",")
        return {
            row["svname"]: row
            for row in csv.DictReader(lines[1:], fieldnames=header)
            if row["pxname"] == "relays" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    async def states(self) -> dict[str, str]:
        """Server name -> status (UP, DOWN, ...)."""
        return {name: row["status"] for name, row in (await self.servers()).items()}

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@contextlib.contextmanager
def run_haproxy(tmp_path: Path, servers: dict[str, int]) -> Iterator[HAProxy]:
    haproxy = require_haproxy()
    port, stats_port = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(cluster_config(port, stats_port, servers))
    check = subprocess.run(
        [haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    log_path = tmp_path / "haproxy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield HAProxy(proc, port, stats_port, log_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class GatedProxy:
    """A TCP forwarder in front of the dev node whose node-to-relay direction can be
    held: requests reach the node, answers wait at the gate."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> GatedProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, gated: bool) -> None:
            try:
                while data := await src.read(65536):
                    if gated:
                        await self.open.wait()
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    async def close(self) -> None:
        self.open.set()
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.close()


@pytest.fixture
async def gate(devnode: DevNode) -> AsyncIterator[GatedProxy]:
    port = int(devnode.url.rsplit(":", 1)[1])
    proxy = await GatedProxy(port).start()
    yield proxy
    await proxy.close()


# -- clients that keep doing round trips --------------------------------------------------


@dataclass
class Conn:
    """A connection through HAProxy that does round trips until told to stop."""

    kind: str  # "relay" or "rpc"
    client: Client
    sids: list[str]
    ok: int = 0
    ended: list[str] = field(default_factory=list)  # session_ended reasons
    close: tuple[int, str] | None = None  # (code, reason) once closed by the relay
    problems: list[str] = field(default_factory=list)

    async def round_trip(self, req_id: int, sid: str | None) -> None:
        call = {"jsonrpc": "2.0", "id": req_id, "method": "chain_getBlockHash", "params": [0]}
        if sid is None:
            await self.client.ws.send(orjson.dumps(call).decode())
        else:
            await self.client.send({"type": "proxy", "sessionId": sid, "payload": call})
        while True:
            msg = await self.client.recv()
            if sid is None:
                answer = msg
            elif msg.get("type") == "proxy" and msg.get("sessionId") == sid:
                answer = msg["payload"]
            elif msg.get("type") == "session_ended":
                self.ended.append(msg["reason"])
                continue
            else:
                self.problems.append(f"unexpected {msg}")
                continue
            if answer.get("id") == req_id:
                if "result" not in answer:
                    self.problems.append(f"error answer {answer}")
                self.ok += 1
                return
            self.problems.append(f"unexpected {answer}")

    async def drive(self, stop: asyncio.Event) -> None:
        req_id = 0
        try:
            while not stop.is_set():
                for sid in self.sids or [None]:
                    req_id += 1
                    await self.round_trip(req_id, sid)
                await asyncio.sleep(0.05)
        except ConnectionClosed as exc:
            self.close = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (-1, "")
            # a send fails as soon as the connection is closed; what the relay sent
            # before its close frame is still there to read
            with contextlib.suppress(ConnectionClosed):
                while True:
                    msg = await self.client.recv()
                    if msg.get("type") == "session_ended":
                        self.ended.append(msg["reason"])
        except Exception as exc:
            self.problems.append(f"{type(exc).__name__}: {exc}")


async def open_conn(client_factory: ClientFactory, url: str, kind: str, tag: str) -> Conn:
    client = await client_factory(url + f"/{kind}")
    conn = Conn(kind, client, [])
    if kind == "relay":
        for i in range(2):
            sid = f"cluster-{tag}-{i}"
            await client.start(sid)
            conn.sids.append(sid)
    await conn.round_trip(0, conn.sids[0] if conn.sids else None)
    return conn


async def open_many(client_factory: ClientFactory, url: str, n: int, tag: str) -> list[Conn]:
    """``n`` connections, alternating /relay and /rpc, each proven with a round trip."""
    conns = []
    for i in range(n):
        kind = "relay" if i % 2 == 0 else "rpc"
        conns.append(await open_conn(client_factory, url, kind, f"{tag}{i}"))
    return conns


# -- the test ---------------------------------------------------------------------------------


async def test_two_relays_behind_haproxy_drain_one_without_touching_the_other(
    tmp_path: Path,
    devnode: DevNode,
    gate: GatedProxy,
    relay_process: Callable[..., RelayProcess],
    client_factory: ClientFactory,
) -> None:
    behind_proxy = {
        "RELAY_NODE_PROBE_INTERVAL": "0.2",
        "RELAY_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
        # what deploy/haproxy/haproxy.cfg asks of relays behind it
        "RELAY_MAX_CONNECTIONS_PER_CLIENT": "100000",
        "RELAY_RATE_LIMIT_PER_CLIENT": "0",
    }
    relay_a = relay_process({"MIDNIGHT_NODE": gate.url, **behind_proxy})
    relay_b = relay_process({"MIDNIGHT_NODE": devnode.url, **behind_proxy})
    for relay in (relay_a, relay_b):
        await relay.wait_listening()
        await eventually(_status_is(f"http://127.0.0.1:{relay.port}/ready", 200), what="ready")

    started = time.monotonic()
    with run_haproxy(tmp_path, {"relay_a": relay_a.port, "relay_b": relay_b.port}) as ha:

        async def both_up() -> bool:
            if ha.proc.poll() is not None:
                pytest.fail(f"haproxy exited ({ha.proc.returncode}):\n{ha.output}")
            try:
                return await ha.states() == {"relay_a": "UP", "relay_b": "UP"}
            except OSError:
                return False

        await eventually(both_up, what="haproxy up with both relays UP")
        base = f"ws://127.0.0.1:{ha.port}"

        # 1. connections through HAProxy spread over both relays
        conns = [
            *[await open_conn(client_factory, base, "relay", f"r{i}") for i in range(RELAY_CONNS)],
            *[await open_conn(client_factory, base, "rpc", f"p{i}") for i in range(RPC_CONNS)],
        ]
        before_a, before_b = await metrics(relay_a.port), await metrics(relay_b.port)
        per_relay: dict[str, dict[str, float]] = {}
        for name, snap in (("a", before_a), ("b", before_b)):
            per_relay[name] = {
                ep: value(snap, "ghostcloak_relay_connections_active", endpoint=ep)
                for ep in ("relay", "rpc")
            }
            assert min(per_relay[name].values()) >= 1, per_relay
        for ep, total in (("relay", RELAY_CONNS), ("rpc", RPC_CONNS)):
            assert per_relay["a"][ep] + per_relay["b"][ep] == total, per_relay
        sessions = [value(s, "ghostcloak_relay_sessions_active") for s in (before_a, before_b)]
        assert sum(sessions) == 2 * RELAY_CONNS + RPC_CONNS
        assert min(sessions) > 0, sessions

        stop = asyncio.Event()
        drivers = [asyncio.create_task(c.drive(stop)) for c in conns]
        release: asyncio.TimerHandle | None = None
        try:
            # 2. a request held at A's node, from a client connected to A directly
            direct = await client_factory(f"ws://127.0.0.1:{relay_a.port}/relay")
            await direct.start("cluster-direct-a")
            await asyncio.sleep(0.3)  # the drivers have done a few round trips
            gate.open.clear()
            await direct.send(
                {
                    "type": "proxy",
                    "sessionId": "cluster-direct-a",
                    "payload": {"jsonrpc": "2.0", "id": 777, "method": "system_health"},
                }
            )
            await asyncio.sleep(0.2)  # the request is at the node, its answer at the gate
            relay_a.proc.send_signal(signal.SIGTERM)
            sigterm = time.monotonic()
            release = asyncio.get_running_loop().call_later(GATE_HOLD, gate.open.set)

            # new connections at once, before HAProxy has noticed: A answers 503 to any
            # upgrade that reaches it, HAProxy retries those on B; all must work
            early = await open_many(client_factory, base, 6, "early")

            async def a_down_while_alive() -> bool:
                row = (await ha.servers())["relay_a"]
                if row["status"].startswith("DOWN"):
                    assert relay_a.proc.poll() is None, "A exited before HAProxy marked it"
                    # marked by its check's answer (/ready 503), not a refused connection;
                    # HAProxy prefixes "* " while the next check is in progress
                    assert row["check_status"].removeprefix("* ") == "L7STS", row
                    return True
                return False

            await eventually(a_down_while_alive, timeout=GATE_HOLD, what="A marked DOWN")
            marked_after = time.monotonic() - sigterm
            assert (await ha.states())["relay_b"] == "UP"
            assert (await get(f"http://127.0.0.1:{relay_a.port}/ready"))[0] == 503
            assert (await get(f"http://127.0.0.1:{relay_a.port}/health"))[0] == 200
            during = await open_many(client_factory, base, 6, "during")
            assert relay_a.proc.poll() is None, "A stopped draining too early for this test"
            draining_a = await metrics(relay_a.port)
            assert value(draining_a, "ghostcloak_relay_draining") == 1
            assert connections_total(draining_a) == connections_total(before_a) + 1  # direct
            retried = value(draining_a, "ghostcloak_relay_refused_total", reason="shutting_down")

            # 3. the gate opens: the held answer arrives, then A's sessions end
            answer = await direct.expect(type="proxy", sessionId="cluster-direct-a")
            assert answer["payload"]["id"] == 777
            assert "result" in answer["payload"]
            assert time.monotonic() - sigterm >= GATE_HOLD - 0.1
            await direct.expect(
                type="session_ended", sessionId="cluster-direct-a", reason="shutdown"
            )
            with pytest.raises(ConnectionClosed):
                await direct.recv()
            assert direct.ws.close_code == 1001
            assert await relay_a.wait_exit(10) == 0
            exited_after = time.monotonic() - sigterm

            b_ok_at_exit = {id(c): c.ok for c in conns}
            after = await open_many(client_factory, base, 6, "after")
            await eventually(
                lambda: all(c.ok > b_ok_at_exit[id(c)] + 2 for c in conns if c.close is None),
                what="B's connections keep doing round trips",
            )
        finally:
            if release is not None:
                release.cancel()
            gate.open.set()  # never leave A's drivers waiting, whatever happened
            stop.set()
            await asyncio.wait_for(asyncio.gather(*drivers), TIMEOUT)

        # A's connections: every session ended with shutdown, then close 1001
        on_a = [c for c in conns if c.close is not None]
        on_b = [c for c in conns if c.close is None]
        for c in on_a:
            assert c.close[0] == 1001, c.close
            assert c.ended == ["shutdown"] * len(c.sids), (c.kind, c.ended)
        assert len([c for c in on_a if c.kind == "relay"]) == per_relay["a"]["relay"]
        assert len([c for c in on_a if c.kind == "rpc"]) == per_relay["a"]["rpc"]
        # B's connections: untouched, never an error, a round trip every time
        for c in on_b:
            assert (c.problems, c.ended) == ([], []), c.kind
            assert c.ok > 3
        for c in on_a:
            assert c.problems == [], (c.kind, c.problems)

        # every connection opened after SIGTERM landed on B and worked
        final_b = await metrics(relay_b.port)
        new = early + during + after
        assert connections_total(final_b) == connections_total(before_b) + len(new)
        for c in new:
            assert c.ok == 1
            assert c.problems == []
            assert c.close is None
        assert (await ha.states())["relay_a"].startswith("DOWN")
        assert ha.proc.poll() is None, ha.output

    print(
        f"\ncluster: haproxy marked A DOWN {marked_after:.2f}s after SIGTERM (A still "
        f"draining), A exited 0 after {exited_after:.2f}s; {len(on_a)} connections on A "
        f"ended with shutdown/1001, {len(on_b)} on B untouched; {len(new)} new connections "
        f"all on B ({retried:.0f} upgrade(s) refused by draining A and retried); "
        f"total {time.monotonic() - started:.1f}s"
    )


def _status_is(url: str, want: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            return (await get(url))[0] == want
        except OSError:
            return False

    return check
