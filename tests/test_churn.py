"""Session churn: thousands of sessions opened and closed every way, and nothing left over.

A relay subprocess in front of the in-process dev node goes through waves of clients
that start and end sessions in every way a client can: envelope sessions ended with
``session_end``, ``/relay`` connections closed with sessions still open, ``/rpc``
connections, and clients that vanish (``transport.abort()``) while their sessions are
still dialing or have requests in flight. Afterwards the relay must hold what it held
before the waves: no session, no node connection, no extra descriptor or task, and
about the same memory.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from ghostcloak_relay.devnode import DevNode

from .conftest import TIMEOUT

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
WAVES = 6
CONCURRENCY = 64  # clients alive at once
SESSIONS_PER_RELAY_CONN = 4
#: connections per wave, by kind; sessions per wave = 4*(40+40+12) + 130 + 12 = 510,
#: of which 24 of 234 connections (10%) vanish without a close.
WAVE_PLAN = {
    "relay_end": 40,  # sessions each do a request, then session_end; then a clean close
    "relay_open": 40,  # sessions each do a request; the connection closes with them open
    "rpc": 130,  # one request, then a clean close
    "abort_relay_dialing": 6,  # session_start x4, then abort before session_started
    "abort_relay_in_flight": 6,  # sessions started, requests sent, abort before answers
    "abort_rpc_in_flight": 12,  # request sent, abort before the answer
}
FD_TOLERANCE = 5
TASK_TOLERANCE = 2
RSS_TOLERANCE = 30 * MiB
#: RSS the second half of the waves may add: memory must level off once the allocator
#: has grown to the working set, not grow with every session ever served.
PLATEAU_TOLERANCE = 5 * MiB

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        body: bytes = resp.read()
    return body.decode()


async def metrics(port: int) -> Metrics:
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(m: Metrics, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def resources(m: Metrics) -> tuple[float, float, float]:
    """(open fds, asyncio tasks, RSS bytes) of the relay."""
    return (
        metric(m, "process_open_fds"),
        metric(m, "ghostcloak_relay_asyncio_tasks"),
        metric(m, "process_resident_memory_bytes"),
    )


async def poll(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, *, fail: bool = True
) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            if fail:
                pytest.fail(f"not within {timeout}s: {what}")
            return False
        await asyncio.sleep(0.05)


# -- clients ---------------------------------------------------------------------------------


async def recv(ws: ClientConnection) -> dict[str, Any]:
    msg = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert isinstance(msg, dict), msg
    return msg


async def collect(ws: ClientConnection, kind: str, sids: list[str]) -> dict[str, dict[str, Any]]:
    """Read envelopes until one of type ``kind`` arrived for every session in ``sids``."""
    got: dict[str, dict[str, Any]] = {}
    for _ in range(len(sids) * 4 + 16):  # bounded: a few unrelated envelopes at most
        msg = await recv(ws)
        assert msg.get("type") != "error", msg
        if msg.get("type") == kind and msg.get("sessionId") in sids:
            got[msg["sessionId"]] = msg
            if len(got) == len(sids):
                return got
    raise AssertionError(f"not every {kind} arrived: {sorted(got)} of {sids}")


def proxy(sid: str, req_id: int) -> dict[str, Any]:
    return {
        "type": "proxy",
        "sessionId": sid,
        "payload": {"jsonrpc": "2.0", "id": req_id, "method": "system_chain", "params": []},
    }


async def send(ws: ClientConnection, obj: Any) -> None:
    await ws.send(orjson.dumps(obj).decode())


async def open_ws(port: int, path: str) -> ClientConnection:
    return await connect(
        f"ws://127.0.0.1:{port}{path}",
        open_timeout=TIMEOUT,
        ping_interval=None,
        compression=None,
        close_timeout=TIMEOUT,
    )


async def vanish(ws: ClientConnection) -> None:
    """Drop the TCP connection without a WebSocket close (RST)."""
    ws.transport.abort()
    await asyncio.sleep(0)


async def relay_client(port: int, tag: str, kind: str) -> None:
    ws = await open_ws(port, "/relay")
    try:
        sids = [f"churn-{tag}-s{i}" for i in range(SESSIONS_PER_RELAY_CONN)]
        for sid in sids:
            await send(ws, {"type": "session_start", "sessionId": sid})
        if kind == "abort_relay_dialing":
            await vanish(ws)
            return
        await collect(ws, "session_started", sids)
        for n, sid in enumerate(sids, 1):
            await send(ws, proxy(sid, n))
        if kind == "abort_relay_in_flight":
            await vanish(ws)
            return
        answers = await collect(ws, "proxy", sids)
        for n, sid in enumerate(sids, 1):
            payload = answers[sid]["payload"]
            assert payload.get("id") == n, payload
            assert "result" in payload, payload
        if kind == "relay_end":
            for sid in sids:
                await send(ws, {"type": "session_end", "sessionId": sid})
            ended = await collect(ws, "session_ended", sids)
            assert {m["reason"] for m in ended.values()} == {"client"}, ended
        await asyncio.wait_for(ws.close(), TIMEOUT)
    finally:
        if ws.transport is not None and not ws.transport.is_closing():
            ws.transport.abort()


async def rpc_client(port: int, kind: str) -> None:
    ws = await open_ws(port, "/rpc")
    try:
        await ws.send('{"jsonrpc":"2.0","id":7,"method":"system_chain","params":[]}')
        if kind == "abort_rpc_in_flight":
            await vanish(ws)
            return
        reply = await recv(ws)
        assert reply.get("id") == 7, reply
        assert "result" in reply, reply
        await asyncio.wait_for(ws.close(), TIMEOUT)
    finally:
        if ws.transport is not None and not ws.transport.is_closing():
            ws.transport.abort()


async def run_wave(port: int, wave: int, rng: random.Random) -> tuple[int, int, list[str]]:
    """One wave of clients, ``CONCURRENCY`` at a time; return (connections, sessions,
    errors)."""
    jobs: list[tuple[str, str]] = [
        (kind, f"w{wave}-{kind}-{n}") for kind, count in WAVE_PLAN.items() for n in range(count)
    ]
    rng.shuffle(jobs)
    limit = asyncio.Semaphore(CONCURRENCY)
    errors: list[str] = []

    async def one(kind: str, tag: str) -> None:
        async with limit:
            try:
                if kind.startswith(("relay", "abort_relay")):
                    await relay_client(port, tag, kind)
                else:
                    await rpc_client(port, kind)
            except Exception as exc:
                errors.append(f"{tag}: {exc!r}")

    await asyncio.gather(*(one(kind, tag) for kind, tag in jobs))
    sessions = sum(1 if "rpc" in kind else SESSIONS_PER_RELAY_CONN for kind, _ in jobs)
    return len(jobs), sessions, errors


async def quiescent(port: int, devnode: DevNode, what: str) -> None:
    """Poll until no session is active in the relay and no node connection is open."""

    async def idle() -> bool:
        m = await metrics(port)
        return (
            metric(m, "ghostcloak_relay_sessions_active") == 0
            and metric(m, "ghostcloak_relay_connections_active", endpoint="relay") == 0
            and metric(m, "ghostcloak_relay_connections_active", endpoint="rpc") == 0
            and devnode.active_connections == 0
        )

    await poll(idle, 20, what)


def error_lines(output: str) -> list[str]:
    lines = []
    for line in output.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            lines.append(line)  # everything the relay prints is a JSON log line
            continue
        if entry.get("level") in ("error", "critical"):
            lines.append(line)
    return lines


async def test_session_churn_leaves_nothing_behind(devnode: DevNode, relay_process: Any) -> None:
    """6 waves of 234 clients (510 sessions) each, 64 at a time, after a warm-up wave.

    Afterwards, once the relay reports no session and no connection and the dev node no
    connection: open fds within +5 and asyncio tasks within +2 of the post-warm-up
    baseline, and RSS within baseline + 30 MB (Python keeps freed arenas and the
    allocator fragments, so RSS is not expected back at the baseline exactly).

    RSS must also level off: the last 3 waves (1,530 sessions, each wave measured once
    the relay is idle) may add at most 5 MB, about 3.3 KB a session. A relay that keeps
    something for every session it has served grows by the same amount every wave."""
    started = time.monotonic()
    relay = relay_process(
        {
            "MIDNIGHT_NODE": devnode.url,
            "RELAY_MAX_CONNECTIONS_PER_CLIENT": "100000",
            "RELAY_MAX_SESSIONS_PER_CONNECTION": "16",
            "RELAY_RATE_LIMIT": "0",
            "RELAY_RATE_LIMIT_PER_CLIENT": "0",
            "RELAY_NODE_PROBE_INTERVAL": "3600",
            "RELAY_LOG_FORMAT": "json",
            "RELAY_LOG_LEVEL": "info",
        }
    )
    await relay.wait_listening()
    port = relay.port
    rng = random.Random(20240601)

    # warm-up: every code path once, imports, allocator pools, the start-up probe gone
    conns, sessions, errors = await run_wave(port, 0, rng)
    assert not errors, errors[:10]
    await quiescent(port, devnode, "quiet after the warm-up wave")
    before = await metrics(port)
    base_fds, base_tasks, base_rss = resources(before)
    node_conns_before = devnode.total_connections
    print(
        f"\n[churn] baseline after warm-up ({conns} connections, {sessions} sessions): "
        f"fds {base_fds:.0f}, asyncio tasks {base_tasks:.0f}, RSS {base_rss / MiB:.1f} MiB"
    )

    total_conns = total_sessions = 0
    rss_by_wave = [base_rss]
    for wave in range(1, WAVES + 1):
        t0 = time.monotonic()
        conns, sessions, errors = await run_wave(port, wave, rng)
        assert not errors, f"wave {wave}: {len(errors)} client(s) failed: {errors[:10]}"
        elapsed = time.monotonic() - t0
        total_conns += conns
        total_sessions += sessions
        await quiescent(port, devnode, f"no session, no connection after wave {wave}")
        fds, tasks, rss = resources(await metrics(port))
        rss_by_wave.append(rss)
        print(
            f"[churn] wave {wave}: {conns} connections, {sessions} sessions in "
            f"{elapsed:.1f} s; idle after it: fds {fds:.0f}, tasks {tasks:.0f}, "
            f"RSS {rss / MiB:.1f} MiB ({(rss - rss_by_wave[-2]) / MiB:+.1f})"
        )

    last: list[tuple[float, float, float]] = []

    async def settled() -> bool:
        last.append(resources(await metrics(port)))
        fds, tasks, _ = last[-1]
        return fds <= base_fds + FD_TOLERANCE and tasks <= base_tasks + TASK_TOLERANCE

    await poll(settled, 10, "fds and tasks back to baseline", fail=False)
    after = await metrics(port)
    fds, tasks, rss = resources(after)
    ended = Counter(
        {
            reason: int(
                metric(after, "ghostcloak_relay_sessions_ended_total", reason=reason)
                - metric(before, "ghostcloak_relay_sessions_ended_total", reason=reason)
            )
            for reason in ("client", "upstream_closed", "upstream_error", "idle")
        }
    )
    started_delta = sum(
        metric(after, "ghostcloak_relay_sessions_started_total", endpoint=ep)
        - metric(before, "ghostcloak_relay_sessions_started_total", endpoint=ep)
        for ep in ("relay", "rpc")
    )
    print(
        f"[churn] {WAVES} waves: {total_conns} connections, {total_sessions} sessions asked "
        f"for, {started_delta:.0f} started by the relay, ended {dict(ended)}, "
        f"{devnode.total_connections - node_conns_before} node connections"
    )
    print(
        f"[churn] after: fds {fds:.0f} (baseline {base_fds:.0f}), asyncio tasks {tasks:.0f} "
        f"(baseline {base_tasks:.0f}), RSS {rss / MiB:.1f} MiB (baseline "
        f"{base_rss / MiB:.1f} MiB, {(rss - base_rss) / MiB:+.1f}); "
        f"total {time.monotonic() - started:.1f} s"
    )
    assert relay.proc.poll() is None
    assert sum(ended.values()) == started_delta, "every session started has ended"
    assert fds <= base_fds + FD_TOLERANCE, f"open fds {fds} vs baseline {base_fds}"
    assert tasks <= base_tasks + TASK_TOLERANCE, f"asyncio tasks {tasks} vs baseline {base_tasks}"
    assert rss <= base_rss + RSS_TOLERANCE, f"RSS {rss / MiB:.1f} MiB vs {base_rss / MiB:.1f}"
    half = WAVES // 2
    late_growth = rss_by_wave[WAVES] - rss_by_wave[half]
    late_sessions = total_sessions * (WAVES - half) // WAVES
    assert late_growth <= PLATEAU_TOLERANCE, (
        f"RSS still grows with every session served: +{late_growth / MiB:.1f} MiB over the "
        f"last {WAVES - half} waves ({late_growth / late_sessions:.0f} bytes per session); "
        f"RSS after each wave: {[round(r / MiB, 1) for r in rss_by_wave]} MiB"
    )
    assert not error_lines(relay.output), error_lines(relay.output)[:10]
