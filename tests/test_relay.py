"""Integration tests of ``WS /relay`` and the HTTP routes, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ghostcloak_relay.devnode import DevNode
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

ClientFactory = Callable[..., Awaitable[Client]]
SID = "session-0001"
SID2 = "session-0002"


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


async def health(server: RelayServer) -> dict[str, Any]:
    status, body = await asyncio.to_thread(http_get, relay_url(server, "/health", "http"))
    assert status == 200
    result = orjson.loads(body)
    assert isinstance(result, dict)
    return result


# -- routes --------------------------------------------------------------------------------


async def test_health_counts_sessions_of_the_whole_server(
    relay: RelayServer, client_factory: ClientFactory
) -> None:
    assert await health(relay) == {"status": "ok", "activeSessions": 0}
    a = await client_factory(relay_url(relay))
    b = await client_factory(relay_url(relay))
    await a.start(SID)
    await b.start(SID2)
    assert await health(relay) == {"status": "ok", "activeSessions": 2}
    await a.send({"type": "session_end", "sessionId": SID})
    await a.expect(type="session_ended", reason="client")
    assert (await health(relay))["activeSessions"] == 1


@pytest.mark.parametrize("path", ["/", "/nope", "/relay/extra", "/healthz"])
async def test_unknown_paths_are_404_for_get_and_upgrade(relay: RelayServer, path: str) -> None:
    status, _ = await asyncio.to_thread(http_get, relay_url(relay, path, "http"))
    assert status == 404
    with pytest.raises(InvalidStatus) as info:
        await connect(relay_url(relay, path), open_timeout=TIMEOUT)
    assert info.value.response.status_code == 404


# -- sessions ------------------------------------------------------------------------------


async def test_round_trip_through_a_fresh_upstream(client: Client, devnode: DevNode) -> None:
    await client.start(SID)
    assert devnode.total_connections == 1
    reply = await client.call(SID, "system_chain")
    assert reply == {"jsonrpc": "2.0", "id": 1, "result": "GhostCloak Dev"}


async def test_relay_generates_a_128_bit_session_id(client: Client) -> None:
    await client.send({"type": "session_start"})
    msg = await client.expect(type="session_started")
    assert re.fullmatch(r"[0-9a-f]{32}", msg["sessionId"])
    reply = await client.call(msg["sessionId"], "system_name")
    assert reply["result"] == "ghostcloak-devnode"


async def test_several_sessions_per_connection_each_with_its_own_upstream(
    client: Client, devnode: DevNode
) -> None:
    sids = [f"multi-session-{i}" for i in range(5)]
    for sid in sids:
        await client.start(sid)
    assert devnode.total_connections == 5
    for i, sid in enumerate(sids):
        await client.send(
            {
                "type": "proxy",
                "sessionId": sid,
                "payload": {"jsonrpc": "2.0", "id": 100 + i, "method": "system_health"},
            }
        )
    got = {}
    for _ in sids:
        msg = await client.expect(type="proxy")
        got[msg["sessionId"]] = msg["payload"]["id"]
    assert got == {sid: 100 + i for i, sid in enumerate(sids)}


async def test_messages_before_session_started_are_queued_in_order(
    relay_factory: RelayFactory, devnode: DevNode, client_factory: ClientFactory
) -> None:
    slow = await DelayProxy(int(devnode.url.rsplit(":", 1)[1]), delay=0.5).start()
    try:
        relay = await relay_factory(node=(slow.url,))
        c = await client_factory(relay_url(relay))
        await c.send({"type": "session_start", "sessionId": SID})
        for i in range(5):
            await c.send(
                {
                    "type": "proxy",
                    "sessionId": SID,
                    "payload": {"jsonrpc": "2.0", "id": i, "method": "system_chain"},
                }
            )
        first = await c.recv()
        assert first == {"type": "session_started", "sessionId": SID}
        ids = [(await c.expect(type="proxy", sessionId=SID))["payload"]["id"] for _ in range(5)]
        assert ids == [0, 1, 2, 3, 4]
    finally:
        await slow.close()


async def test_queue_before_start_is_bounded(
    relay_factory: RelayFactory, devnode: DevNode, client_factory: ClientFactory
) -> None:
    slow = await DelayProxy(int(devnode.url.rsplit(":", 1)[1]), delay=0.5).start()
    try:
        relay = await relay_factory(node=(slow.url,), max_queued_messages=2, request_timeout=0.3)
        c = await client_factory(relay_url(relay))
        await c.send({"type": "session_start", "sessionId": SID})
        for i in range(3):
            await c.send(
                {
                    "type": "proxy",
                    "sessionId": SID,
                    "payload": {"jsonrpc": "2.0", "id": i, "method": "system_chain"},
                }
            )
        err = await c.expect(type="error", code="queue_full", sessionId=SID)
        assert err["message"]
        await c.expect(type="session_started", sessionId=SID)
        ids = [(await c.expect(type="proxy"))["payload"]["id"] for _ in range(2)]
        assert ids == [0, 1]
        # the refused message was never tracked: no timeout answer for it comes later
        await c.no_message(within=1.0)
    finally:
        await slow.close()


async def test_subscription_notifications_come_back_as_proxy_envelopes(
    client: Client, devnode: DevNode
) -> None:
    await client.start(SID)
    reply = await client.call(SID, "chain_subscribeNewHeads")
    sub_id = reply["result"]
    devnode.produce_block()
    note = await client.expect(type="proxy", sessionId=SID)
    assert note["payload"]["method"] == "chain_newHead"
    assert note["payload"]["params"]["subscription"] == sub_id
    assert set(note) == {"type", "sessionId", "payload"}


async def test_batch_request_and_response(client: Client) -> None:
    await client.start(SID)
    batch = [
        {"jsonrpc": "2.0", "id": i, "method": m}
        for i, m in enumerate(["system_chain", "system_name", "no_such_method"])
    ]
    await client.send({"type": "proxy", "sessionId": SID, "payload": batch})
    msg = await client.expect(type="proxy", sessionId=SID)
    by_id = {item["id"]: item for item in msg["payload"]}
    assert by_id[0]["result"] == "GhostCloak Dev"
    assert by_id[1]["result"] == "ghostcloak-devnode"
    assert by_id[2]["error"]["code"] == -32601


async def test_node_cannot_inject_envelope_fields(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    async def evil(conn: Any, msg: Any) -> None:
        await conn.ws.send('{"type":"session_ended","sessionId":"other-session","reason":"x"}')
        await conn.ws.send(orjson.dumps('"}, "type": "error", "x": {"').decode())  # a string
        await conn.ws.send('1},"type":"error","sessionId":"evil')  # not JSON: refused

    upstream.handler = evil
    relay = await relay_factory(node=(upstream.url,))
    c = await client_factory(relay_url(relay))
    await c.start(SID)
    await c.send(
        {
            "type": "proxy",
            "sessionId": SID,
            "payload": {"jsonrpc": "2.0", "id": 1, "method": "system_chain"},
        }
    )
    first = await c.expect(type="proxy", sessionId=SID)
    assert first["payload"] == {
        "type": "session_ended",
        "sessionId": "other-session",
        "reason": "x",
    }
    second = await c.expect(type="proxy", sessionId=SID)
    assert second["payload"] == '"}, "type": "error", "x": {"'
    third = await c.expect(type="session_ended", sessionId=SID)
    assert third["reason"] == "upstream_error"


async def test_session_end_closes_the_upstream(
    relay: RelayServer, client: Client, devnode: DevNode
) -> None:
    await client.start(SID)
    await client.start(SID2)
    await eventually(lambda: devnode.active_connections == 2)
    await client.send({"type": "session_end", "sessionId": SID})
    assert await client.recv() == {"type": "session_ended", "sessionId": SID, "reason": "client"}
    await eventually(lambda: devnode.active_connections == 1, what="upstream closed")
    await client.send(
        {
            "type": "proxy",
            "sessionId": SID,
            "payload": {"jsonrpc": "2.0", "id": 1, "method": "system_chain"},
        }
    )
    await client.expect(type="error", code="unknown_session", sessionId=SID)
    assert (await client.call(SID2, "system_chain"))["result"] == "GhostCloak Dev"
    assert relay.manager.active_count() == 1


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("close1000", "upstream_closed"),
        ("close1001", "upstream_closed"),
        ("close1011", "upstream_error"),
        ("abort", "upstream_error"),
    ],
)
async def test_upstream_closing_mid_session_ends_only_that_session(
    relay_factory: RelayFactory,
    upstream: ScriptedUpstream,
    client_factory: ClientFactory,
    how: str,
    reason: str,
) -> None:
    relay = await relay_factory(node=(upstream.url,))
    c = await client_factory(relay_url(relay))
    await c.start(SID)
    await c.start(SID2)
    await eventually(lambda: len(upstream.open_conns) == 2)
    victim = upstream.conns[0]
    if how == "abort":
        victim.ws.transport.abort()
    else:
        await victim.ws.close(int(how[5:]))
    msg = await c.expect(type="session_ended")
    # which upstream belongs to which session is the relay's secret; find out by elimination
    ended = msg["sessionId"]
    assert msg["reason"] == reason
    survivor = SID2 if ended == SID else SID
    assert (await c.call(survivor, "system_chain"))["result"] == "ok:system_chain"
    assert relay.manager.active_count() == 1


async def test_unreachable_upstream_gives_error_and_leaves_no_session(
    relay_factory: RelayFactory, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(f"ws://127.0.0.1:{free_port()}",))
    c = await client_factory(relay_url(relay))
    await c.send({"type": "session_start", "sessionId": SID})
    err = await c.expect(type="error", code="upstream_unavailable", sessionId=SID)
    assert "127.0.0.1" not in err["message"]
    assert relay.manager.active_count() == 0
    assert (await health(relay))["activeSessions"] == 0
    await c.send(
        {
            "type": "proxy",
            "sessionId": SID,
            "payload": {"jsonrpc": "2.0", "id": 1, "method": "system_chain"},
        }
    )
    await c.expect(type="error", code="unknown_session")
    # the id is free again
    await c.send({"type": "session_start", "sessionId": SID})
    await c.expect(type="error", code="upstream_unavailable", sessionId=SID)


async def test_client_disconnect_ends_all_its_sessions(
    relay: RelayServer, client_factory: ClientFactory, devnode: DevNode
) -> None:
    c = await client_factory(relay_url(relay))
    other = await client_factory(relay_url(relay))
    await other.start("other-conn-session")
    for i in range(3):
        await c.start(f"leaving-{i:04d}")
    await eventually(lambda: devnode.active_connections == 4)
    await c.ws.close()
    await eventually(lambda: devnode.active_connections == 1, what="upstreams closed")
    await eventually(lambda: relay.manager.active_count() == 1)
    assert (await other.call("other-conn-session", "system_chain"))["result"] == "GhostCloak Dev"


async def test_abrupt_client_disconnect_ends_all_its_sessions(
    relay: RelayServer, client_factory: ClientFactory, devnode: DevNode
) -> None:
    c = await client_factory(relay_url(relay))
    await c.start(SID)
    await c.start(SID2)
    c.ws.transport.abort()
    await eventually(lambda: devnode.active_connections == 0, what="upstreams closed")
    await eventually(lambda: relay.manager.active_count() == 0)


# -- bad input -----------------------------------------------------------------------------

BAD_INPUTS: list[tuple[str, str, str | None]] = [
    ("{not json", "bad_json", None),
    ("[1, 2, 3]", "bad_message", None),
    ('"just a string"', "bad_message", None),
    ('{"sessionId": "abcdefgh"}', "bad_message", None),
    ('{"type": 7}', "bad_message", None),
    ('{"type": "teleport", "sessionId": "abcdefgh"}', "unknown_type", None),
    ('{"type": "proxy", "payload": {"id": 1}}', "bad_session_id", None),
    ('{"type": "proxy", "sessionId": "short", "payload": {"id": 1}}', "bad_session_id", None),
    ('{"type": "proxy", "sessionId": "has spaces in it", "payload": {}}', "bad_session_id", None),
    ('{"type": "session_start", "sessionId": 12345678}', "bad_session_id", None),
    ('{"type": "session_end"}', "bad_session_id", None),
    (
        '{"type": "proxy", "sessionId": "nosuchsession", "payload": {"id": 1}}',
        "unknown_session",
        "nosuchsession",
    ),
    ('{"type": "session_end", "sessionId": "nosuchsession"}', "unknown_session", "nosuchsession"),
    ('{"type": "proxy", "sessionId": "session-0001", "payload": 5}', "bad_message", SID),
]


@pytest.mark.parametrize(("raw", "code", "echo"), BAD_INPUTS)
async def test_bad_input_gets_an_error_and_changes_nothing(
    client: Client, raw: str, code: str, echo: str | None
) -> None:
    await client.start(SID)
    await client.ws.send(raw)
    err = await client.expect(type="error", code=code)
    assert isinstance(err["message"], str)
    assert err["message"]
    assert err.get("sessionId") == echo
    assert set(err) <= {"type", "code", "message", "sessionId"}
    assert (await client.call(SID, "system_chain"))["result"] == "GhostCloak Dev"


async def test_session_id_in_use_on_this_or_another_connection(
    relay: RelayServer, client_factory: ClientFactory
) -> None:
    owner = await client_factory(relay_url(relay))
    intruder = await client_factory(relay_url(relay))
    await owner.start(SID)
    await owner.send({"type": "session_start", "sessionId": SID})
    await owner.expect(type="error", code="session_exists", sessionId=SID)
    await intruder.send({"type": "session_start", "sessionId": SID})
    await intruder.expect(type="error", code="session_exists", sessionId=SID)
    assert relay.manager.active_count() == 1
    assert (await owner.call(SID, "system_chain"))["result"] == "GhostCloak Dev"


async def test_another_connection_cannot_use_or_end_a_session(
    relay: RelayServer, client_factory: ClientFactory, devnode: DevNode
) -> None:
    owner = await client_factory(relay_url(relay))
    intruder = await client_factory(relay_url(relay))
    await owner.start(SID)
    await intruder.send(
        {
            "type": "proxy",
            "sessionId": SID,
            "payload": {"jsonrpc": "2.0", "id": 9, "method": "system_chain"},
        }
    )
    await intruder.expect(type="error", code="unknown_session", sessionId=SID)
    await intruder.send({"type": "session_end", "sessionId": SID})
    await intruder.expect(type="error", code="unknown_session", sessionId=SID)
    await owner.no_message()
    assert (await owner.call(SID, "system_chain"))["result"] == "GhostCloak Dev"
    assert devnode.active_connections == 1


async def test_too_many_sessions_per_connection(
    relay_factory: RelayFactory, devnode: DevNode, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(devnode.url,), max_sessions_per_connection=2)
    c = await client_factory(relay_url(relay))
    await c.start(SID)
    await c.start(SID2)
    await c.send({"type": "session_start", "sessionId": "session-0003"})
    await c.expect(type="error", code="too_many_sessions", sessionId="session-0003")
    other = await client_factory(relay_url(relay))  # the limit is per connection
    await other.start("session-0003")
    await c.send({"type": "session_end", "sessionId": SID})
    await c.expect(type="session_ended", sessionId=SID)
    await c.start("session-0004")
    assert relay.manager.active_count() == 3


# -- WebSocket framing ---------------------------------------------------------------------


async def test_fragmented_message_is_reassembled(client: Client) -> None:
    await client.start(SID)
    text = orjson.dumps(
        {
            "type": "proxy",
            "sessionId": SID,
            "payload": {"jsonrpc": "2.0", "id": 5, "method": "system_chain"},
        }
    ).decode()
    await client.ws.send([text[:10], text[10:25], text[25:]])
    msg = await client.expect(type="proxy", sessionId=SID)
    assert msg["payload"]["result"] == "GhostCloak Dev"


async def test_ping_is_answered(client: Client) -> None:
    pong = await client.ws.ping(b"are-you-there")
    latency = await asyncio.wait_for(pong, TIMEOUT)
    assert latency >= 0


async def test_client_close_code_is_echoed(relay: RelayServer, client: Client) -> None:
    await client.start(SID)
    await client.ws.close(1000, "bye")
    assert client.ws.close_code == 1000
    await eventually(lambda: relay.manager.active_count() == 0)


async def test_invalid_utf8_closes_with_1007(relay: RelayServer, client: Client) -> None:
    await client.start(SID)
    await client.ws.send(b'{"type":"\xff\xfe"}', text=True)
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.ws.close_code == 1007
    await eventually(lambda: relay.manager.active_count() == 0)


async def test_binary_frame_gets_an_error_and_connection_stays(client: Client) -> None:
    await client.start(SID)
    await client.ws.send(b'{"type":"session_start"}')
    await client.expect(type="error", code="binary_not_supported")
    assert (await client.call(SID, "system_chain"))["result"] == "GhostCloak Dev"


async def test_oversized_message_closes_with_1009_and_is_not_acted_on(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(upstream.url,), max_message_bytes=1024)
    c = await client_factory(relay_url(relay))
    await c.start(SID)
    big = orjson.dumps(
        {
            "type": "proxy",
            "sessionId": SID,
            "payload": {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "system_chain",
                "params": ["x" * 2000],
            },
        }
    ).decode()
    await c.ws.send(big)
    with pytest.raises(ConnectionClosed):
        await c.recv()  # no answer of any kind, only the close
    assert c.ws.close_code == 1009
    await eventually(lambda: relay.manager.active_count() == 0)
    assert upstream.conns[0].received == []


# -- cleanup, monitoring, shutdown ------------------------------------------------------------


async def test_cleanup_expires_old_sessions(
    relay_factory: RelayFactory, devnode: DevNode, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(devnode.url,), session_max_age=0.5, cleanup_interval=0.1)
    c = await client_factory(relay_url(relay))
    await c.start(SID)
    msg = await c.expect(type="session_ended", sessionId=SID)
    assert msg["reason"] == "expired"
    await eventually(lambda: devnode.active_connections == 0, what="expired upstream closed")
    assert relay.manager.active_count() == 0
    # the connection itself stays usable
    await c.start(SID2)


async def test_monitoring_line_is_logged_every_interval(
    relay_factory: RelayFactory,
    devnode: DevNode,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ghostcloak_relay")
    relay = await relay_factory(node=(devnode.url,), log_interval=0.1)
    c = await client_factory(relay_url(relay))
    await c.start(SID)
    pattern = re.compile(r"^Active sessions: 1, RSS: \d+MB, Heap: \d+MB/\d+MB$")
    await eventually(
        lambda: any(pattern.match(r.getMessage()) for r in caplog.records), what="monitoring line"
    )


async def test_plain_mode_warns_once_about_tls(
    relay_factory: RelayFactory, devnode: DevNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ghostcloak_relay")
    await relay_factory(node=(devnode.url,))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "TLS" in r.message]
    assert len(warnings) == 1


async def test_shutdown_tells_every_session_and_closes_1001(
    relay_factory: RelayFactory, devnode: DevNode, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(devnode.url,))
    a = await client_factory(relay_url(relay))
    b = await client_factory(relay_url(relay))
    await a.start(SID)
    await a.start(SID2)
    await b.start("session-b-001")
    shutdown = asyncio.create_task(relay.shutdown())
    ended_a = {
        (await a.expect(type="session_ended", reason="shutdown"))["sessionId"] for _ in range(2)
    }
    assert ended_a == {SID, SID2}
    await b.expect(type="session_ended", sessionId="session-b-001", reason="shutdown")
    for c in (a, b):
        with pytest.raises(ConnectionClosed):
            await c.recv()
        assert c.ws.close_code == 1001
    await asyncio.wait_for(shutdown, TIMEOUT)
    await eventually(lambda: devnode.active_connections == 0)
    with pytest.raises(OSError):
        await connect(relay_url(relay), open_timeout=2)
