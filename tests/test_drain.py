"""Drain on SIGTERM without losing an in-flight answer; faults leave nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ghostcloak_relay.devnode import DevNode

from .conftest import (
    TIMEOUT,
    Client,
    RelayFactory,
    ScriptedUpstream,
    eventually,
    free_port,
    relay_url,
)

ClientFactory = Callable[..., Awaitable[Client]]


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


async def test_sigterm_drains_in_flight_answers_then_closes(
    relay_process: Callable[..., Any],
    upstream: ScriptedUpstream,
    client_factory: ClientFactory,
) -> None:
    async def slow(conn: Any, msg: Any) -> None:
        if msg.get("method") == "system_health":  # the relay's own probe
            await conn.ws.send(
                orjson.dumps(
                    {"jsonrpc": "2.0", "id": msg["id"], "result": {"isSyncing": False, "peers": 1}}
                )
            )
            return
        if msg.get("method") == "chain_getHeader":
            await conn.ws.send(
                orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {"number": "0x1"}})
            )
            return
        await asyncio.sleep(1.0)
        await conn.ws.send(
            orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": f"answer-{msg['id']}"})
        )

    upstream.handler = slow
    proc = relay_process(
        {
            "MIDNIGHT_NODE": upstream.url,
            "RELAY_SHUTDOWN_TIMEOUT": "5",
            "RELAY_NODE_PROBE_INTERVAL": "0.2",
        }
    )
    await proc.wait_listening()
    base = f"http://127.0.0.1:{proc.port}"
    await eventually(lambda: _ready(base), what="ready")
    relay_client = await client_factory(f"ws://127.0.0.1:{proc.port}/relay")
    await relay_client.start("drain-session-1")
    rpc = await connect(f"ws://127.0.0.1:{proc.port}/rpc", open_timeout=TIMEOUT)
    await relay_client.send(
        {
            "type": "proxy",
            "sessionId": "drain-session-1",
            "payload": {"jsonrpc": "2.0", "id": 41, "method": "state_call"},
        }
    )
    await rpc.send('{"jsonrpc":"2.0","id":42,"method":"state_call"}')
    await asyncio.sleep(0.2)  # both requests are at the node now
    proc.proc.send_signal(signal.SIGTERM)
    # readiness flips at once, liveness stays, new connections are refused
    await eventually(lambda: _status(base + "/ready", 503), what="/ready 503")
    assert await asyncio.to_thread(status_of, base + "/health") == 200
    with pytest.raises(InvalidStatus) as info:
        await connect(f"ws://127.0.0.1:{proc.port}/relay", open_timeout=TIMEOUT)
    assert info.value.response.status_code == 503
    # the answers already asked for arrive, then the sessions end
    answer = await relay_client.expect(type="proxy", sessionId="drain-session-1")
    assert answer["payload"] == {"jsonrpc": "2.0", "id": 41, "result": "answer-41"}
    assert orjson.loads(await asyncio.wait_for(rpc.recv(), TIMEOUT))["result"] == "answer-42"
    await relay_client.expect(type="session_ended", sessionId="drain-session-1", reason="shutdown")
    with pytest.raises(ConnectionClosed):
        await relay_client.recv()
    assert relay_client.ws.close_code == 1001
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(rpc.recv(), TIMEOUT)
    assert (rpc.close_code, rpc.close_reason) == (1001, "shutdown")
    assert await proc.wait_exit(10) == 0


async def _ready(base: str) -> bool:
    return await asyncio.to_thread(status_of, base + "/ready") == 200


async def _status(url: str, want: int) -> bool:
    return await asyncio.to_thread(status_of, url) == want


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_faults_leave_no_sessions_fds_or_tasks_behind(
    relay_factory: RelayFactory,
    devnode: DevNode,
    upstream: ScriptedUpstream,
    client_factory: ClientFactory,
) -> None:
    dead = f"ws://127.0.0.1:{free_port()}"
    relay = await relay_factory(node=(upstream.url,), request_timeout=0.2)
    dead_relay = await relay_factory(node=(dead,))
    await asyncio.sleep(0.1)
    fds, tasks = _fds(), len(asyncio.all_tasks())

    for round_ in range(3):
        c = await client_factory(relay_url(relay))
        # node closes mid-session, resets, sends garbage, stops answering
        for i, how in enumerate(("close", "abort", "garbage", "silent")):
            sid = f"fault-{round_}-{i}-{how}"
            await c.start(sid)
            conn = upstream.conns[-1]
            if how == "close":
                await conn.ws.close(1000)
            elif how == "abort":
                conn.ws.transport.abort()
            elif how == "garbage":
                await conn.ws.send("not json")
            else:
                upstream.silent = True
                await c.send(
                    {
                        "type": "proxy",
                        "sessionId": sid,
                        "payload": {"jsonrpc": "2.0", "id": 1, "method": "state_call"},
                    }
                )
                answer = (await c.until(type="proxy", sessionId=sid))["payload"]
                assert answer["error"]["code"] == -32008
                upstream.silent = False
                await c.send({"type": "session_end", "sessionId": sid})
            await c.until(type="session_ended", sessionId=sid)
        # unreachable node
        d = await client_factory(relay_url(dead_relay))
        await d.send({"type": "session_start", "sessionId": f"dead-node-{round_}"})
        await d.until(type="error", code="upstream_unavailable")
        # client vanishes with sessions open
        gone = await client_factory(relay_url(relay))
        await gone.start(f"vanish-{round_}")
        gone.ws.transport.abort()
        await c.ws.close()
        await d.ws.close()

    await eventually(lambda: relay.manager.active_count() == 0)
    await eventually(lambda: dead_relay.manager.active_count() == 0)
    await eventually(lambda: not relay.connections and not dead_relay.connections)
    await eventually(lambda: len(upstream.open_conns) == 0, what="upstreams closed")
    # housekeeping, cleanup and monitoring loops are all that is left of each relay
    await eventually(
        lambda: len(relay.tasks) == 3 and len(dead_relay.tasks) == 3,
        what="only the background loops left",
    )
    await eventually(lambda: len(asyncio.all_tasks()) <= tasks, what=f"tasks back to {tasks}")
    await eventually(lambda: _fds() <= fds + 2, what=f"fds back to {fds}")


async def test_second_signal_exits_at_once(
    relay_process: Callable[..., Any],
    upstream: ScriptedUpstream,
    client_factory: ClientFactory,
) -> None:
    upstream.silent = True  # an answer that never comes keeps the drain waiting
    proc = relay_process({"MIDNIGHT_NODE": upstream.url, "RELAY_SHUTDOWN_TIMEOUT": "60"})
    await proc.wait_listening()
    c = await client_factory(f"ws://127.0.0.1:{proc.port}/relay")
    await c.start("second-signal-1")
    await c.send(
        {
            "type": "proxy",
            "sessionId": "second-signal-1",
            "payload": {"jsonrpc": "2.0", "id": 1, "method": "state_call"},
        }
    )
    await eventually(
        lambda: any("state_call" in m for conn in upstream.conns for m in conn.received),
        what="request in flight",
    )
    proc.proc.send_signal(signal.SIGTERM)
    await eventually(lambda: "draining" in proc.output, what="draining")
    assert proc.proc.poll() is None  # still draining, as it should with 60 s to go
    proc.proc.send_signal(signal.SIGINT)
    assert await proc.wait_exit(5) == 1
    assert "second signal" in proc.output
