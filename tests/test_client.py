"""The Python client ``ghostcloak_relay.client`` against a live relay and dev node."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ghostcloak_relay.client import (
    RelayClient,
    RelayProtocolError,
    RequestTimeoutError,
    RpcError,
    SessionEndedError,
    UpstreamUnavailableError,
)
from ghostcloak_relay.devnode import DevNode
from ghostcloak_relay.protocol import EndReason
from ghostcloak_relay.server import RelayServer

from .conftest import RelayFactory, ScriptedUpstream, free_port, relay_url


async def test_first_notification_after_subscribe_is_not_lost(
    relay: RelayServer, devnode: DevNode
) -> None:
    # the dev node, like Substrate, sends the current head right after the answer,
    # usually in the same read: the client must already know the subscription then
    async with RelayClient(relay_url(relay)) as client:
        for _ in range(5):
            async with (
                client.session() as s,
                s.subscribe(
                    "chain_subscribeNewHeads", unsubscribe="chain_unsubscribeNewHeads"
                ) as heads,
            ):
                head: Any = await asyncio.wait_for(anext(heads), 5)
                assert int(head["number"], 16) == devnode.best_block


async def test_several_sessions_share_one_connection(relay: RelayServer, devnode: DevNode) -> None:
    async with RelayClient(relay_url(relay)) as client:
        async with client.session() as a, client.session() as b:
            assert a.session_id != b.session_id
            results = await asyncio.gather(a.request("system_chain"), b.request("system_name"))
            assert results == ["GhostCloak Dev", "ghostcloak-devnode"]
            assert devnode.total_connections == 2
        assert relay.manager.active_count() == 0


async def test_typed_errors(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, devnode: DevNode
) -> None:
    relay = await relay_factory(node=(devnode.url,))
    async with RelayClient(relay_url(relay)) as client, client.session() as s:
        with pytest.raises(RpcError) as refused:
            await s.request("author_rotateKeys")
        assert refused.value.code == -32601
        with pytest.raises(ValueError, match="8-128"):
            await client.start_session("bad id!")
    dead = await relay_factory(node=(f"ws://127.0.0.1:{free_port()}",))
    async with RelayClient(relay_url(dead)) as client:
        with pytest.raises(UpstreamUnavailableError):
            await client.start_session()
    upstream.silent = True
    quiet = await relay_factory(node=(upstream.url,))
    async with RelayClient(relay_url(quiet)) as client, client.session() as s:
        with pytest.raises(RequestTimeoutError):
            await s.request("system_chain", timeout=0.3)


async def test_errors_for_an_open_session_fail_its_requests(
    relay_factory: RelayFactory, upstream: ScriptedUpstream
) -> None:
    upstream.silent = True  # nothing answers: only the relay's error can end the wait
    relay = await relay_factory(node=(upstream.url,))
    async with RelayClient(relay_url(relay)) as client:
        s = await client.start_session()
        waiting = asyncio.create_task(s.request("system_chain", timeout=10))
        await asyncio.sleep(0.1)
        # the relay forgets the session (as if ended elsewhere): its errors reach the waiter
        conn = next(iter(relay.connections))
        for live in list(conn.sessions()):
            live.end(EndReason.CLIENT, notify=False)
        s._client._send(
            {
                "type": "proxy",
                "sessionId": s.session_id,
                "payload": {"jsonrpc": "2.0", "id": 99, "method": "system_chain"},
            }
        )
        with pytest.raises(RelayProtocolError) as info:
            await asyncio.wait_for(waiting, 5)
        assert info.value.code == "unknown_session"
        with pytest.raises(SessionEndedError):
            await s.request("system_chain")
