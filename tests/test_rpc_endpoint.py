"""``WS /rpc``: the drop-in plain JSON-RPC endpoint, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ghostcloak_relay.devnode import DevNode
from ghostcloak_relay.policy import OFF_POLICY
from ghostcloak_relay.rpc import METHOD_NOT_ALLOWED, PARSE_ERROR, TOO_MANY_SUBSCRIPTIONS
from ghostcloak_relay.server import RelayServer

from .conftest import (
    TIMEOUT,
    Client,
    DelayProxy,
    RelayFactory,
    ScriptedUpstream,
    eventually,
    free_port,
    relay_url,
)


async def open_rpc(relay: RelayServer, **kwargs: Any) -> ClientConnection:
    return await connect(relay_url(relay, "/rpc"), open_timeout=TIMEOUT, **kwargs)


async def call(ws: ClientConnection, req_id: int, method: str, params: Any = None) -> Any:
    """Send a request; return its answer, skipping notifications."""
    await ws.send(
        orjson.dumps(
            {"jsonrpc": "2.0", "id": req_id, "method": method, "params": params or []}
        ).decode()
    )
    while True:
        msg = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        if isinstance(msg, list) or msg.get("id") == req_id:
            return msg


async def notification(ws: ClientConnection, method: str) -> dict[str, Any]:
    while True:
        msg = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        if isinstance(msg, dict) and msg.get("method") == method:
            return msg


async def closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    return ws.close_code, ws.close_reason


async def test_round_trip_and_session_accounting(relay: RelayServer, devnode: DevNode) -> None:
    a = await open_rpc(relay)
    b = await open_rpc(relay)
    assert (await call(a, 1, "system_chain"))["result"] == "GhostCloak Dev"
    assert (await call(b, 1, "system_name"))["result"] == "ghostcloak-devnode"
    assert devnode.total_connections == 2  # one fresh upstream per client connection
    assert relay.health()["activeSessions"] == 2
    await a.close()
    await eventually(lambda: relay.manager.active_count() == 1)
    await eventually(lambda: devnode.active_connections == 1)


async def test_frames_are_forwarded_unchanged(
    relay_factory: RelayFactory, upstream: ScriptedUpstream
) -> None:
    relay = await relay_factory(node=(upstream.url,))
    ws = await open_rpc(relay)
    text = '{ "jsonrpc" : "2.0", "id" : "a-string-id", "method" : "system_chain" }'
    await ws.send(text)
    answer = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert answer == {"jsonrpc": "2.0", "id": "a-string-id", "result": "ok:system_chain"}
    assert upstream.conns[0].received == [text]  # byte for byte, whitespace and all
    big = '{"jsonrpc":"2.0","id":18446744073709551617,"method":"state_call","params":[1.50]}'
    await ws.send(big)
    await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert upstream.conns[0].received[1] == big


async def test_subscriptions_route_and_end_with_the_session(
    relay: RelayServer, devnode: DevNode
) -> None:
    ws = await open_rpc(relay)
    heads = (await call(ws, 1, "chain_subscribeNewHeads"))["result"]
    finalized = (await call(ws, 2, "chain_subscribeFinalizedHeads"))["result"]
    assert devnode.active_subscriptions == 2
    for _ in range(3):
        devnode.produce_block()
    note = await notification(ws, "chain_newHead")
    assert note["params"]["subscription"] == heads
    note = await notification(ws, "chain_finalizedHead")
    assert note["params"]["subscription"] == finalized
    await ws.close()
    await eventually(lambda: devnode.active_subscriptions == 0, what="node dropped the subs")


async def test_submit_and_watch_on_both_endpoints(
    relay: RelayServer, devnode: DevNode, client: Client
) -> None:
    ws = await open_rpc(relay)
    sub = (await call(ws, 1, "author_submitAndWatchExtrinsic", ["0x0102"]))["result"]
    await client.start("watch-session-1")
    payload = await client.call("watch-session-1", "author_submitAndWatchExtrinsic", ["0x0304"])
    relay_sub = payload["result"]
    states: dict[str, list[Any]] = {"rpc": [], "relay": []}
    for _ in range(4):
        devnode.produce_block()
    while len(states["rpc"]) < 3:
        note = await notification(ws, "author_extrinsicUpdate")
        assert note["params"]["subscription"] == sub
        states["rpc"].append(note["params"]["result"])
    while len(states["relay"]) < 3:
        msg = await client.until(type="proxy", sessionId="watch-session-1")
        note = msg["payload"]
        if note.get("method") == "author_extrinsicUpdate":
            assert note["params"]["subscription"] == relay_sub
            states["relay"].append(note["params"]["result"])
    for seen in states.values():
        assert seen[0] == "ready"
        assert "inBlock" in seen[1]
        assert "finalized" in seen[2]


async def test_relay_session_end_makes_the_node_drop_subscriptions(
    devnode: DevNode, client: Client
) -> None:
    await client.start("drop-subs-0001")
    for i, method in enumerate(["chain_subscribeNewHeads", "chain_subscribeFinalizedHeads"]):
        await client.send(
            {
                "type": "proxy",
                "sessionId": "drop-subs-0001",
                "payload": {"jsonrpc": "2.0", "id": i, "method": method},
            }
        )
    await eventually(lambda: devnode.active_subscriptions == 2)
    await client.send({"type": "session_end", "sessionId": "drop-subs-0001"})
    await client.until(type="session_ended", sessionId="drop-subs-0001")
    await eventually(lambda: devnode.active_subscriptions == 0)


async def test_policy_applies_on_rpc(
    relay_factory: RelayFactory, upstream: ScriptedUpstream
) -> None:
    relay = await relay_factory(node=(upstream.url,), max_subscriptions_per_session=1)
    ws = await open_rpc(relay)
    refused = await call(ws, 1, "author_rotateKeys")
    assert refused["error"]["code"] == METHOD_NOT_ALLOWED
    assert refused["id"] == 1
    await ws.send("{not json")
    bad = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert bad["error"]["code"] == PARSE_ERROR
    assert bad["id"] is None
    assert (await call(ws, 2, "chain_subscribeNewHeads"))["result"] == "ok:chain_subscribeNewHeads"
    over = await call(ws, 3, "chain_subscribeNewHeads")
    assert over["error"]["code"] == TOO_MANY_SUBSCRIPTIONS
    batch = [
        {"jsonrpc": "2.0", "id": 10, "method": "system_chain"},
        {"jsonrpc": "2.0", "id": 11, "method": "system_addReservedPeer"},
    ]
    await ws.send(orjson.dumps(batch).decode())
    answer = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert sorted(a["id"] for a in answer) == [10, 11]
    received = upstream.conns[0].received
    assert len(received) == 2
    assert all("author_rotateKeys" not in m and "ReservedPeer" not in m for m in received)


async def test_rpc_methods_answer_is_filtered(relay: RelayServer) -> None:
    ws = await open_rpc(relay)
    methods = (await call(ws, 1, "rpc_methods"))["result"]["methods"]
    assert "author_rotateKeys" not in methods
    assert "system_addReservedPeer" not in methods
    assert "chain_getBlock" in methods


async def test_client_close_code_reaches_the_node(
    relay_factory: RelayFactory, upstream: ScriptedUpstream
) -> None:
    relay = await relay_factory(node=(upstream.url,))
    ws = await open_rpc(relay)
    await call(ws, 1, "system_chain")
    await ws.close(4000, "wallet going to sleep")
    assert ws.close_code == 4000
    await eventually(lambda: upstream.conns[0].ws.close_code == 4000)


@pytest.mark.parametrize(
    ("how", "code", "reason"),
    [
        ("close1000", 1000, "upstream_closed"),
        ("close1001", 1000, "upstream_closed"),
        ("close1011", 1014, "upstream_error"),
        ("abort", 1014, "upstream_error"),
    ],
)
async def test_upstream_end_closes_the_client(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, how: str, code: int, reason: str
) -> None:
    relay = await relay_factory(node=(upstream.url,))
    ws = await open_rpc(relay)
    other = await open_rpc(relay)
    await call(ws, 1, "system_chain")
    await call(other, 1, "system_chain")
    victim = upstream.conns[0]
    if how == "abort":
        victim.ws.transport.abort()
    else:
        await victim.ws.close(int(how[5:]))
    assert await closed(ws) == (code, reason)
    assert (await call(other, 2, "system_name"))["result"] == "ok:system_name"
    await eventually(lambda: relay.manager.active_count() == 1)


async def test_unreachable_node_closes_with_1014(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(node=(f"ws://127.0.0.1:{free_port()}",))
    ws = await open_rpc(relay)
    assert await closed(ws) == (1014, "upstream_unavailable")
    await eventually(lambda: relay.manager.active_count() == 0)


async def test_requests_before_the_upstream_opens_are_queued(
    relay_factory: RelayFactory, devnode: DevNode
) -> None:
    slow = await DelayProxy(int(devnode.url.rsplit(":", 1)[1]), delay=0.4).start()
    try:
        relay = await relay_factory(node=(slow.url,))
        ws = await open_rpc(relay)
        for i in range(5):
            await ws.send(
                orjson.dumps({"jsonrpc": "2.0", "id": i, "method": "system_chain"}).decode()
            )
        ids = [orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["id"] for _ in range(5)]
        assert ids == [0, 1, 2, 3, 4]
    finally:
        await slow.close()


async def test_off_mode_passes_text_and_binary_untouched(
    relay_factory: RelayFactory,
) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(conn: ServerConnection) -> None:
        async for message in conn:
            await conn.send(message)

    async with serve(echo, "127.0.0.1", 0) as echo_server:
        port = echo_server.sockets[0].getsockname()[1]
        relay = await relay_factory(node=(f"ws://127.0.0.1:{port}",), rpc_methods=OFF_POLICY)
        ws = await open_rpc(relay)
        for message in (
            "not json at all",
            b"\x00\x01binary\xff",
            "é" * 1000,
            '{"method":"author_rotateKeys"}',
        ):
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == message
        await ws.send(["frag", "mented ", "text"])
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "fragmented text"


async def test_expiry_and_shutdown_close_with_1001(
    relay_factory: RelayFactory, devnode: DevNode
) -> None:
    relay = await relay_factory(node=(devnode.url,), session_max_age=0.5, cleanup_interval=0.1)
    ws = await open_rpc(relay)
    await call(ws, 1, "system_chain")
    assert await closed(ws) == (1001, "expired")
    await eventually(lambda: devnode.active_connections == 0)
    ws2 = await open_rpc(relay)
    await call(ws2, 1, "system_chain")
    shutdown = asyncio.create_task(relay.shutdown())
    assert await closed(ws2) == (1001, "shutdown")
    await asyncio.wait_for(shutdown, TIMEOUT)


async def test_full_queue_closes_1013_queue_full_and_the_node_gets_1000(
    relay_factory: RelayFactory, upstream: ScriptedUpstream
) -> None:
    slow = await DelayProxy(int(upstream.url.rsplit(":", 1)[1]), delay=0.5).start()
    try:
        relay = await relay_factory(node=(slow.url,), max_queued_messages=2)
        ws = await open_rpc(relay)
        for i in range(3):
            await ws.send(
                orjson.dumps({"jsonrpc": "2.0", "id": i, "method": "system_chain"}).decode()
            )
        assert await closed(ws) == (1013, "queue_full")
        await eventually(lambda: relay.manager.active_count() == 0)
        await eventually(lambda: all(c.ws.close_code is not None for c in upstream.conns))
        assert all(c.ws.close_code in (1000, 1006) for c in upstream.conns)
    finally:
        await slow.close()


@pytest.mark.parametrize(
    "payload",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"system_chain","params":["\xff"]}',
        b'{"jsonrpc":"2.0","id":1,"method":"system_\xed\xa0\x80"}',  # a UTF-16 surrogate
        b"\xc0\xaf",  # overlong, and not JSON either
    ],
)
@pytest.mark.parametrize("fragmented", [False, True])
async def test_invalid_utf8_closes_1007_and_the_node_never_sees_it(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, payload: bytes, fragmented: bool
) -> None:
    """With the policy on, a whole text frame is parsed as bytes (the hot path): invalid
    UTF-8 must still close with 1007, as in a fragmented message, not be answered as a
    parse error or reach the node; the node's connection is closed too."""
    relay = await relay_factory(node=(upstream.url,))
    ws = await open_rpc(relay)
    assert (await call(ws, 1, "system_chain"))["result"] == "ok:system_chain"
    if fragmented:
        await ws.send([payload[:3], payload[3:]], text=True)
    else:
        await ws.send(payload, text=True)
    assert (await closed(ws))[0] == 1007
    assert len(upstream.conns[0].received) == 1
    await eventually(lambda: not upstream.open_conns)
