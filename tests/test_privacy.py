"""Privacy, tested like correctness: what the node receives, what the logs hold, what
errors say, and what other clients can do. See docs/privacy.md for the threat model."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ghostcloak_relay.devnode import DevNode
from ghostcloak_relay.protocol import ERROR_MESSAGES
from ghostcloak_relay.upstream import USER_AGENT

from .conftest import (
    TIMEOUT,
    Client,
    RelayFactory,
    ScriptedUpstream,
    free_port,
    relay_url,
)

ClientFactory = Callable[..., Awaitable[Client]]

CLIENT_IP = "127.0.0.77"  # a distinctive loopback address for the wallet
NEEDED_HEADERS = {
    "host",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "user-agent",
}


def loopback_77_available() -> bool:
    try:
        with socket.socket() as s:
            s.bind((CLIENT_IP, 0))
    except OSError:
        return False
    return True


needs_77 = pytest.mark.skipif(
    not loopback_77_available(), reason=f"cannot bind {CLIENT_IP} on this machine"
)

IDENTIFYING = {
    "X-Forwarded-For": "198.51.100.23",
    "Forwarded": "for=198.51.100.23;proto=https",
    "X-Real-IP": "198.51.100.23",
    "Via": "1.1 wallet-proxy",
    "Cookie": "wallet=COOKIEMARKER",
    "Authorization": "Bearer AUTHMARKER",
}


async def test_upstream_handshake_carries_nothing_from_the_client(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(upstream.url,))
    c = await client_factory(
        relay_url(relay),
        additional_headers=IDENTIFYING,
        user_agent_header="WalletApp/9.9 UAMARKER",
        origin="https://wallet.example",
        subprotocols=["wallet-proto"],
    )
    assert c.ws.subprotocol is None  # the relay does not pretend to speak it
    await c.start("privacy-headers-1")
    assert len(upstream.conns) == 1
    headers = upstream.conns[0].headers
    names = [name.lower() for name, _ in headers]
    assert sorted(names) == sorted(NEEDED_HEADERS)  # exact set, no duplicates
    values = {name.lower(): value for name, value in headers}
    assert values["user-agent"] == USER_AGENT
    assert values["host"] == upstream.url.removeprefix("ws://")
    assert values["sec-websocket-version"] == "13"
    joined = repr(headers)
    for marker in (
        "198.51.100.23",
        "COOKIEMARKER",
        "AUTHMARKER",
        "UAMARKER",
        "wallet.example",
        "wallet-proto",
        "permessage-deflate",
        CLIENT_IP,
    ):
        assert marker not in joined


async def test_every_session_gets_its_own_fresh_upstream_connection(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(upstream.url,))
    a = await client_factory(relay_url(relay))
    b = await client_factory(relay_url(relay))
    for i in range(3):
        await a.start(f"fresh-a-{i:04d}")
        await b.start(f"fresh-b-{i:04d}")
    # end one and start another with the SAME id: still a new connection
    await a.send({"type": "session_end", "sessionId": "fresh-a-0000"})
    await a.expect(type="session_ended")
    await a.start("fresh-a-0000")
    assert len(upstream.conns) == 7
    peers = {conn.ws.remote_address for conn in upstream.conns}
    assert len(peers) == 7  # seven distinct TCP connections (distinct source ports)
    for i in range(3):  # and a request goes only down its own session's connection
        await a.call(f"fresh-b-{i:04d}".replace("b", "a"), "system_chain", req_id=40 + i)
    per_conn = [len(conn.received) for conn in upstream.conns]
    assert sorted(per_conn) == [0, 0, 0, 0, 1, 1, 1]


async def test_intruder_cannot_touch_a_session_and_node_sees_nothing(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(upstream.url,))
    owner = await client_factory(relay_url(relay))
    intruder = await client_factory(relay_url(relay))
    sid = "owned-by-someone-else"
    await owner.start(sid)
    for envelope in (
        {
            "type": "proxy",
            "sessionId": sid,
            "payload": {"jsonrpc": "2.0", "id": 1, "method": "system_chain"},
        },
        {"type": "session_end", "sessionId": sid},
        {"type": "session_start", "sessionId": sid},
    ):
        await intruder.send(envelope)
        err = await intruder.expect(type="error")
        assert err["code"] in ("unknown_session", "session_exists")
    await owner.no_message()
    assert upstream.conns[0].received == []
    assert len(upstream.conns) == 1  # the intruder's start made no connection
    assert (await owner.call(sid, "system_chain"))["result"] == "ok:system_chain"


async def test_errors_use_fixed_messages_without_addresses(
    relay_factory: RelayFactory, client_factory: ClientFactory
) -> None:
    dead_port = free_port()
    relay = await relay_factory(node=(f"ws://127.0.0.1:{dead_port}",))
    c = await client_factory(relay_url(relay))
    seen = []
    for raw in (
        '{"type":"session_start","sessionId":"dead-upstream-1"}',
        "{",
        "[]",
        '{"type":"x"}',
        '{"type":"proxy","sessionId":"nope-nope","payload":{"a":1}}',
    ):
        await c.ws.send(raw)
        seen.append(await c.expect(type="error"))
    for err in seen:
        assert err["message"] in ERROR_MESSAGES.values()
        text = orjson.dumps(err).decode()
        assert str(dead_port) not in text
        assert "Traceback" not in text
        assert "Error" not in text.replace("error", "")


# -- logs -----------------------------------------------------------------------------------


@needs_77
async def test_no_log_line_identifies_a_wallet(
    relay_process: Callable[..., Any], devnode: DevNode, upstream: ScriptedUpstream
) -> None:
    """Drive every path at debug level from 127.0.0.77 and search all relay output."""
    markers = [
        "PRIVSESSION0001",
        "PRIVSESSION0002",
        "PAYLOADMARKER",
        "UAMARKER",
        "COOKIEMARKER",
        "AUTHMARKER",
        "198.51.100.23",
        "PATHMARKER",
        "wallet.example",
        "BADIDMARKER",
        "system_chain",
        "author_rotateKeys",
        "chain_subscribeNewHeads",
        "state_getStorage",
        CLIENT_IP,
    ]
    client_ports: list[int] = []
    common = {
        "RELAY_LOG_LEVEL": "debug",
        "RELAY_LOG_INTERVAL": "0.2",
        "RELAY_CLEANUP_INTERVAL": "0.2",
        "RELAY_SESSION_MAX_AGE": "1.5",
        "RELAY_MAX_SESSIONS_PER_CONNECTION": "3",
        "RELAY_MAX_MESSAGE_BYTES": "4096",
    }
    main = relay_process({**common, "MIDNIGHT_NODE": devnode.url})
    flaky = relay_process({**common, "MIDNIGHT_NODE": upstream.url})
    dead = relay_process({**common, "MIDNIGHT_NODE": f"ws://127.0.0.1:{free_port()}"})
    for proc in (main, flaky, dead):
        await proc.wait_listening()

    async def open_client(port: int, path: str = "/relay") -> Client:
        ws = await connect(
            f"ws://127.0.0.1:{port}{path}",
            open_timeout=TIMEOUT,
            local_addr=(CLIENT_IP, 0),
            additional_headers=IDENTIFYING,
            user_agent_header="Wallet UAMARKER",
            origin="https://wallet.example",
        )
        client_ports.append(ws.local_address[1])
        return Client(ws)

    def proxy(sid: str, method: str, i: int = 1, extra: str = "PAYLOADMARKER") -> dict[str, Any]:
        return {
            "type": "proxy",
            "sessionId": sid,
            "payload": {"jsonrpc": "2.0", "id": i, "method": method, "params": [extra]},
        }

    # normal flow: sessions, requests, subscription, batch, refused method, session end
    c = await open_client(main.port)
    await c.start("PRIVSESSION0001")
    await c.send(proxy("PRIVSESSION0001", "system_chain"))
    await c.expect(type="proxy")
    await c.send(proxy("PRIVSESSION0001", "chain_subscribeNewHeads", 2))
    await c.expect(type="proxy")
    devnode.produce_block()
    await c.send(proxy("PRIVSESSION0001", "author_rotateKeys", 3))
    await c.send(
        {
            "type": "proxy",
            "sessionId": "PRIVSESSION0001",
            "payload": [
                {
                    "jsonrpc": "2.0",
                    "id": 4,
                    "method": "state_getStorage",
                    "params": ["PAYLOADMARKER"],
                },
                {"jsonrpc": "2.0", "id": 5, "method": "author_rotateKeys"},
            ],
        }
    )
    # every envelope error
    for raw in [
        "{PAYLOADMARKER",
        '["PAYLOADMARKER"]',
        '{"type":"PAYLOADMARKER"}',
        '{"type":"proxy","sessionId":"BADIDMARKER !","payload":{}}',
        '{"type":"proxy","sessionId":"BADIDMARKER-unknown","payload":{"id":1}}',
        '{"type":"session_end","sessionId":"BADIDMARKER-unknown"}',
        '{"type":"session_start","sessionId":"PRIVSESSION0001"}',
    ]:
        await c.ws.send(raw)
    await c.send({"type": "session_start", "sessionId": "PRIVSESSION0002"})
    await c.until(type="session_started", sessionId="PRIVSESSION0002")
    await c.send({"type": "session_start", "sessionId": "BADIDMARKER-3"})
    await c.send({"type": "session_start", "sessionId": "BADIDMARKER-4"})  # too many
    await c.ws.send(b"PAYLOADMARKER binary")
    await c.send({"type": "session_end", "sessionId": "PRIVSESSION0002"})
    # protocol violations on their own connections: invalid UTF-8, oversized message
    for bad in (b'{"PAYLOADMARKER\xff"}', "PAYLOADMARKER" * 400):
        v = await open_client(main.port)
        await v.ws.send(bad, text=True) if isinstance(bad, bytes) else await v.ws.send(bad)
        with pytest.raises(ConnectionClosed):
            while True:
                await v.recv()
    # abrupt disconnect with an open session; expiry of another
    gone = await open_client(main.port)
    await gone.start("PRIVSESSION0003")
    gone.ws.transport.abort()
    await c.send({"type": "session_start", "sessionId": "PRIVSESSION0004"})
    await c.until(type="session_ended", sessionId="PRIVSESSION0004", reason="expired")
    # HTTP routes, 404s
    for path in ("/health", "/PATHMARKER"):
        r, w = await asyncio.open_connection("127.0.0.1", main.port, local_addr=(CLIENT_IP, 0))
        client_ports.append(w.get_extra_info("sockname")[1])
        w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: UAMARKER\r\n\r\n".encode())
        await asyncio.wait_for(r.read(), TIMEOUT)
        w.close()

    # upstream that sends garbage, and one that dies
    async def garbage(conn: Any, msg: Any) -> None:
        await conn.ws.send("PAYLOADMARKER not json")

    upstream.handler = garbage
    f = await open_client(flaky.port)
    await f.start("PRIVSESSION0005")
    await f.send(proxy("PRIVSESSION0005", "system_chain"))
    await f.expect(type="session_ended", reason="upstream_error")
    await f.start("PRIVSESSION0006")
    upstream.conns[-1].ws.transport.abort()
    await f.expect(type="session_ended", reason="upstream_error")
    # dead upstream
    d = await open_client(dead.port)
    await d.send({"type": "session_start", "sessionId": "PRIVSESSION0007"})
    await d.expect(type="error", code="upstream_unavailable")

    # shutdown with sessions open
    await c.send({"type": "session_start", "sessionId": "PRIVSESSION0008"})
    await c.until(type="session_started", sessionId="PRIVSESSION0008")
    await asyncio.sleep(0.5)  # let at least one monitoring line pass
    for proc in (main, flaky, dead):
        proc.proc.send_signal(signal.SIGTERM)
    for proc in (main, flaky, dead):
        assert await proc.wait_exit(15) == 0

    output = main.output + flaky.output + dead.output
    assert "DEBUG" in main.output  # debug level really was on
    assert "session " in main.output  # and sessions were logged (by keyed hash)
    for marker in markers:
        assert marker not in output, f"{marker!r} leaked into the relay's logs"
    for port in client_ports:
        assert not re.search(rf"\b{port}\b", output), f"client port {port} in logs"
