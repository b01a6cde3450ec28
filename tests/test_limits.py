"""Every limit of docs/operations.md, each with its documented outcome, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ghostcloak_relay.devnode import DevNode
from ghostcloak_relay.rpc import RATE_LIMITED

from .conftest import (
    TIMEOUT,
    Client,
    RelayFactory,
    ScriptedUpstream,
    eventually,
    relay_url,
)

ClientFactory = Callable[..., Awaitable[Client]]


def req(i: int, method: str = "system_chain") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": i, "method": method, "params": []}


async def closed_with(ws: Any) -> tuple[int | None, str | None]:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    return ws.close_code, ws.close_reason


async def test_max_connections_refuses_upgrades_with_503(
    relay_factory: RelayFactory, devnode: DevNode
) -> None:
    relay = await relay_factory(node=(devnode.url,), max_connections=2)
    a = await connect(relay_url(relay), open_timeout=TIMEOUT)
    b = await connect(relay_url(relay, "/rpc"), open_timeout=TIMEOUT)
    await eventually(lambda: len(relay.connections) == 2)
    for path in ("/relay", "/rpc"):
        with pytest.raises(InvalidStatus) as info:
            await connect(relay_url(relay, path), open_timeout=TIMEOUT)
        assert info.value.response.status_code == 503
    await a.close()
    await eventually(lambda: len(relay.connections) == 1)
    c = await connect(relay_url(relay), open_timeout=TIMEOUT)
    await c.close()
    await b.close()


async def test_max_sessions_is_server_wide(
    relay_factory: RelayFactory, devnode: DevNode, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(devnode.url,), max_sessions=2)
    a = await client_factory(relay_url(relay))
    await a.start("limit-session-1")
    rpc = await connect(relay_url(relay, "/rpc"), open_timeout=TIMEOUT)  # the second session
    await eventually(lambda: relay.manager.active_count() == 2)
    await a.send({"type": "session_start", "sessionId": "limit-session-3"})
    await a.expect(type="error", code="relay_full", sessionId="limit-session-3")
    late = await connect(relay_url(relay, "/rpc"), open_timeout=TIMEOUT)
    assert await closed_with(late) == (1013, "relay_full")
    await rpc.close()
    await eventually(lambda: relay.manager.active_count() == 1)
    await a.start("limit-session-3")


async def test_max_connections_per_client_address(
    relay_factory: RelayFactory, devnode: DevNode
) -> None:
    relay = await relay_factory(node=(devnode.url,), max_connections_per_client=2)
    mine = [await connect(relay_url(relay), open_timeout=TIMEOUT) for _ in range(2)]
    third = await connect(relay_url(relay, "/rpc"), open_timeout=TIMEOUT)
    assert await closed_with(third) == (1013, "too_many_connections")
    # another address is another client
    other = await connect(relay_url(relay), open_timeout=TIMEOUT, local_addr=("127.0.0.2", 0))
    await other.send('{"type":"session_start","sessionId":"other-address-1"}')
    assert orjson.loads(await asyncio.wait_for(other.recv(), TIMEOUT))["type"] == (
        "session_started"
    )
    await mine[0].close()
    await eventually(lambda: len(relay.connections) == 2)
    again = await connect(relay_url(relay), open_timeout=TIMEOUT)
    await again.send('{"type":"session_start","sessionId":"same-address-2"}')
    assert orjson.loads(await asyncio.wait_for(again.recv(), TIMEOUT))["type"] == (
        "session_started"
    )
    # the address is held only as a keyed hash, in memory
    assert all("127.0.0" not in key for key in relay.clients._clients)
    for ws in (mine[1], other, again):
        await ws.close()
    await eventually(lambda: len(relay.clients) == 0)


async def test_rate_limit_per_session_answers_with_the_request_id(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(upstream.url,), rate_limit=0.5)  # burst 1 token
    c = await client_factory(relay_url(relay))
    await c.start("rate-session-1")
    await c.send(
        {"type": "proxy", "sessionId": "rate-session-1", "payload": [req(i) for i in range(4)]}
    )  # cheap: 0.25 each -> all pass
    answer = (await c.expect(type="proxy"))["payload"]
    assert sorted(a["id"] for a in answer if "result" in a) == [0, 1, 2, 3]
    for i in range(10, 16):
        await c.send(
            {"type": "proxy", "sessionId": "rate-session-1", "payload": req(i, "state_getStorage")}
        )
    answers = [(await c.expect(type="proxy"))["payload"] for _ in range(6)]
    refused = [a["id"] for a in answers if a.get("error", {}).get("code") == RATE_LIMITED]
    passed = [a["id"] for a in answers if "result" in a]
    assert len(refused) >= 4  # at most ~1 token was left, refilling at 0.5/s
    assert sorted(refused + passed) == list(range(10, 16))
    sent_to_node = [orjson.loads(m) for m in upstream.conns[0].received]
    node_ids = {r["id"] for m in sent_to_node for r in (m if isinstance(m, list) else [m])}
    assert not node_ids & set(refused)  # refused calls never reach the node


async def test_rate_limit_per_client_spans_connections(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(upstream.url,), rate_limit=0, rate_limit_per_client=0.5)
    a = await client_factory(relay_url(relay))
    b = await client_factory(relay_url(relay))
    await a.start("per-client-a")
    await b.start("per-client-b")
    results = []
    for i in range(4):
        for c, sid in ((a, "per-client-a"), (b, "per-client-b")):
            await c.send({"type": "proxy", "sessionId": sid, "payload": req(i, "state_getStorage")})
            results.append((await c.expect(type="proxy"))["payload"])
    passed = [r for r in results if "result" in r]
    assert 1 <= len(passed) <= 2  # one shared bucket of 1 token for both connections
    assert all(r["error"]["code"] == RATE_LIMITED for r in results if "error" in r)


async def test_idle_sessions_end_on_both_endpoints(
    relay_factory: RelayFactory, devnode: DevNode, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(devnode.url,), idle_timeout=0.6)
    c = await client_factory(relay_url(relay))
    await c.start("idle-session-1")
    await c.start("busy-session-1")
    rpc = await connect(relay_url(relay, "/rpc"), open_timeout=TIMEOUT)
    for i in range(12):  # keep one session busy for well over the timeout
        await c.send({"type": "proxy", "sessionId": "busy-session-1", "payload": req(i)})
        await asyncio.sleep(0.1)
    ended = await c.until(type="session_ended", sessionId="idle-session-1")
    assert ended["reason"] == "idle"
    assert await closed_with(rpc) == (1001, "idle")
    assert relay.manager.get("busy-session-1") is not None
    assert relay.manager.get("busy-session-1").active  # type: ignore[union-attr]


async def _raw_websocket(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that completes the handshake and then never answers anything."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


def _masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


async def test_half_open_client_is_closed_by_keepalive(
    relay_factory: RelayFactory, devnode: DevNode
) -> None:
    relay = await relay_factory(node=(devnode.url,), ping_interval=0.3)
    _reader, writer = await _raw_websocket(relay.port, "/relay")
    writer.write(_masked_text(b'{"type":"session_start","sessionId":"half-open-1"}'))
    await eventually(lambda: relay.manager.active_count() == 1)
    # never answer the relay's pings: it gives up after about two intervals
    await eventually(lambda: relay.manager.active_count() == 0, what="keepalive ended it")
    await eventually(lambda: devnode.active_connections == 0)
    writer.close()


async def test_node_that_stops_answering_pings_ends_the_session(
    relay_factory: RelayFactory, client_factory: ClientFactory
) -> None:
    frozen: list[asyncio.StreamWriter] = []

    async def accept_then_freeze(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        import hashlib

        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        ).decode()
        writer.write(
            (
                f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        frozen.append(writer)  # and then nothing, ever

    server = await asyncio.start_server(accept_then_freeze, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        relay = await relay_factory(node=(f"ws://127.0.0.1:{port}",), ping_interval=0.3)
        c = await client_factory(relay_url(relay))
        await c.start("frozen-node-1")
        ended = await c.until(type="session_ended", sessionId="frozen-node-1")
        assert ended["reason"] == "upstream_error"
        assert relay.manager.active_count() == 0
    finally:
        for w in frozen:
            w.close()
        server.close()


async def test_handshake_that_never_completes_times_out(
    relay_factory: RelayFactory, client_factory: ClientFactory
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        relay = await relay_factory(node=(f"ws://127.0.0.1:{port}",), upstream_connect_timeout=0.3)
        c = await client_factory(relay_url(relay))
        await c.send({"type": "session_start", "sessionId": "never-handshake"})
        await c.expect(type="error", code="upstream_unavailable", sessionId="never-handshake")
        assert relay.manager.active_count() == 0
        rpc = await connect(relay_url(relay, "/rpc"), open_timeout=TIMEOUT)
        assert await closed_with(rpc) == (1014, "upstream_unavailable")
    finally:
        for w in held:
            w.close()
        server.close()


async def test_oversized_message_from_the_node_ends_only_that_session(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    async def huge(conn: Any, msg: Any) -> None:
        size = 4096 if msg.get("method") == "state_getMetadata" else 10
        await conn.ws.send(
            orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": "x" * size}).decode()
        )

    upstream.handler = huge
    relay = await relay_factory(node=(upstream.url,), max_message_bytes=1024)
    c = await client_factory(relay_url(relay))
    await c.start("big-answer-1")
    await c.start("small-answer-1")
    await c.send(
        {"type": "proxy", "sessionId": "big-answer-1", "payload": req(1, "state_getMetadata")}
    )
    ended = await c.until(type="session_ended", sessionId="big-answer-1")
    assert ended["reason"] == "upstream_error"
    assert (await c.call("small-answer-1", "system_chain", req_id=2))["result"] == "x" * 10


async def test_request_timeout_answers_once_and_never_retries(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    async def late(conn: Any, msg: Any) -> None:
        await asyncio.sleep(1.0)  # well after the relay's timeout
        await conn.ws.send(
            orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": "late"}).decode()
        )

    upstream.handler = late
    relay = await relay_factory(node=(upstream.url,), request_timeout=0.3)
    c = await client_factory(relay_url(relay))
    await c.start("timeout-session")
    await c.send(
        {
            "type": "proxy",
            "sessionId": "timeout-session",
            "payload": req(7, "author_submitExtrinsic"),
        }
    )
    answer = (await c.expect(type="proxy", sessionId="timeout-session"))["payload"]
    assert answer["id"] == 7
    assert answer["error"]["code"] == -32008
    await c.no_message(within=1.5)  # the node's late answer is dropped
    assert len(upstream.conns[0].received) == 1  # submitted exactly once
    # the session itself is fine
    upstream.handler = None
    assert (await c.call("timeout-session", "system_chain", req_id=8))["result"] == (
        "ok:system_chain"
    )
