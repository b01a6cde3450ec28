"""The method policy over real sockets: what the node receives and what the client gets."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from ghostcloak_relay.devnode import DevNode
from ghostcloak_relay.policy import OFF_POLICY, UNSAFE_METHODS, load_policy
from ghostcloak_relay.rpc import BATCH_TOO_LARGE, METHOD_NOT_ALLOWED, TOO_MANY_SUBSCRIPTIONS

from .conftest import Client, RelayFactory, ScriptedUpstream, eventually, relay_url

ClientFactory = Callable[..., Awaitable[Client]]
SID = "policy-session-1"


def req(i: int, method: str, params: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": i, "method": method, "params": params or []}


async def proxy(c: Client, payload: Any) -> Any:
    """Send a request or batch; return the answer, skipping subscription notifications."""
    await c.send({"type": "proxy", "sessionId": SID, "payload": payload})
    while True:
        answer = (await c.expect(type="proxy", sessionId=SID))["payload"]
        if not (isinstance(answer, dict) and "method" in answer and "id" not in answer):
            return answer


async def scripted_client(
    relay_factory: RelayFactory,
    up: ScriptedUpstream,
    client_factory: ClientFactory,
    **settings: Any,
) -> Client:
    relay = await relay_factory(node=(up.url,), **settings)
    c = await client_factory(relay_url(relay))
    await c.start(SID)
    return c


@pytest.mark.parametrize("method", sorted(UNSAFE_METHODS))
async def test_unsafe_methods_never_reach_the_node(
    relay_factory: RelayFactory,
    upstream: ScriptedUpstream,
    client_factory: ClientFactory,
    method: str,
) -> None:
    c = await scripted_client(relay_factory, upstream, client_factory)
    answer = await proxy(c, req(7, method))
    assert answer["id"] == 7
    assert answer["error"]["code"] == METHOD_NOT_ALLOWED
    assert (await proxy(c, req(8, "system_chain")))["result"] == "ok:system_chain"
    assert [m for conn in upstream.conns for m in conn.received] == [
        '{"jsonrpc":"2.0","id":8,"method":"system_chain","params":[]}'
    ]


async def test_devnode_unsafe_methods_are_blocked_and_rpc_methods_is_filtered(
    relay_factory: RelayFactory, devnode: DevNode, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(devnode.url,))
    c = await client_factory(relay_url(relay))
    await c.start(SID)
    for i, method in enumerate(["author_rotateKeys", "author_insertKey", "system_addReservedPeer"]):
        assert (await proxy(c, req(i, method, ["x"])))["error"]["code"] == METHOD_NOT_ALLOWED
    methods = (await proxy(c, req(10, "rpc_methods")))["result"]["methods"]
    assert "system_chain" in methods
    assert "chain_subscribeNewHeads" in methods
    assert not UNSAFE_METHODS & set(methods)


async def test_unknown_methods_are_refused_by_default(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    c = await scripted_client(relay_factory, upstream, client_factory)
    for i, method in enumerate(
        [
            "babe_epochAuthorship",
            "sudo_anything",
            "author_pendingExtrinsics",
            "system_localListenAddresses",
            "state_getPairs",
        ]
    ):
        assert (await proxy(c, req(i, method)))["error"]["code"] == METHOD_NOT_ALLOWED
    for i, method in enumerate(
        [
            "midnight_ledgerVersion",
            "payment_queryInfo",
            "chainHead_v1_follow",
            "transaction_v1_broadcast",
            "state_getMetadata",
            "author_submitExtrinsic",
        ]
    ):
        assert (await proxy(c, req(i, method)))["result"] == f"ok:{method}"
    assert not any('"id":0,"method":"babe' in m for conn in upstream.conns for m in conn.received)


async def test_batch_is_checked_element_by_element_and_answered_once(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    c = await scripted_client(relay_factory, upstream, client_factory)
    batch = [
        req(1, "system_chain"),
        req(2, "author_rotateKeys"),
        req(3, "system_name"),
        {"jsonrpc": "2.0", "method": "author_insertKey", "params": []},  # notification
        "not a request",
    ]
    answer = await proxy(c, batch)
    by_id = {item["id"]: item for item in answer}
    assert len(answer) == 4
    assert by_id[1]["result"] == "ok:system_chain"
    assert by_id[3]["result"] == "ok:system_name"
    assert by_id[2]["error"]["code"] == METHOD_NOT_ALLOWED
    assert by_id[None]["error"]["code"] == -32600
    # the node got only the allowed elements, under ids of the relay's own (so that its
    # answer can be told apart from any other batch), and the client got its ids back
    sent = orjson.loads(upstream.conns[0].received[0])
    assert [(e["method"], e["id"]) for e in sent] == [
        ("system_chain", "ghostcloak-relay/1.0"),
        ("system_name", "ghostcloak-relay/1.1"),
    ]
    await c.no_message()


async def test_fully_refused_batch_and_refused_notification(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    c = await scripted_client(relay_factory, upstream, client_factory)
    answer = await proxy(c, [req(1, "author_rotateKeys"), req(2, "system_peers")])
    assert sorted(a["id"] for a in answer) == [1, 2]
    await c.send(
        {
            "type": "proxy",
            "sessionId": SID,
            "payload": {"jsonrpc": "2.0", "method": "author_rotateKeys"},
        }
    )
    await c.no_message()
    assert upstream.conns[0].received == []


async def test_batch_length_is_capped(
    relay_factory: RelayFactory, upstream: ScriptedUpstream, client_factory: ClientFactory
) -> None:
    c = await scripted_client(relay_factory, upstream, client_factory, max_batch=3)
    ok = await proxy(c, [req(i, "system_chain") for i in range(3)])
    assert len(ok) == 3
    refused = await proxy(c, [req(i, "system_chain") for i in range(4)])
    assert refused["error"]["code"] == BATCH_TOO_LARGE
    assert len(upstream.conns[0].received) == 1


async def test_subscription_cap_per_session(
    relay_factory: RelayFactory, devnode: DevNode, client_factory: ClientFactory
) -> None:
    relay = await relay_factory(node=(devnode.url,), max_subscriptions_per_session=2)
    c = await client_factory(relay_url(relay))
    await c.start(SID)
    subs = [(await proxy(c, req(i, "chain_subscribeNewHeads")))["result"] for i in range(2)]
    over = await proxy(c, req(5, "chain_subscribeFinalizedHeads"))
    assert over["error"]["code"] == TOO_MANY_SUBSCRIPTIONS
    assert devnode.active_subscriptions == 2
    assert (await proxy(c, req(6, "chain_unsubscribeNewHeads", [subs[0]])))["result"] is True
    again = await proxy(c, req(7, "chain_subscribeFinalizedHeads"))
    assert isinstance(again["result"], str)
    await eventually(lambda: devnode.active_subscriptions == 2)


async def test_allowlist_file_cannot_enable_unsafe_methods(
    relay_factory: RelayFactory,
    upstream: ScriptedUpstream,
    client_factory: ClientFactory,
    tmp_path: Path,
) -> None:
    allow = tmp_path / "allow.txt"
    allow.write_text("# wallet minimum\nsystem_chain\nmidnight_*\nauthor_rotateKeys\n")
    c = await scripted_client(
        relay_factory, upstream, client_factory, rpc_methods=load_policy(str(allow))
    )
    assert (await proxy(c, req(1, "system_chain")))["result"] == "ok:system_chain"
    assert (await proxy(c, req(2, "midnight_x")))["result"] == "ok:midnight_x"
    assert (await proxy(c, req(3, "system_name")))["error"]["code"] == METHOD_NOT_ALLOWED
    assert (await proxy(c, req(4, "author_rotateKeys")))["error"]["code"] == METHOD_NOT_ALLOWED


async def test_off_passes_everything_and_warns(
    relay_factory: RelayFactory,
    devnode: DevNode,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ghostcloak_relay")
    relay = await relay_factory(node=(devnode.url,), rpc_methods=OFF_POLICY)
    assert any("RELAY_RPC_METHODS=off" in r.message for r in caplog.records)
    c = await client_factory(relay_url(relay))
    await c.start(SID)
    answer = await proxy(c, req(1, "author_rotateKeys"))
    assert answer["result"].startswith("0x")
