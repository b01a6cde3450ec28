"""Every kind of subscription a wallet uses, routed through both endpoints to a real
runtime: new heads, finalized heads, runtime version, storage, and an extrinsic's status.
Closing the session closes its upstream connection, so the node drops the subscriptions."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import connect

from ghostcloak_relay.client import RelayClient

from .conftest import _jsonrpc

# System.Number (the current block number), a storage key every Substrate runtime has
SYSTEM_NUMBER = "0x26aa394eea5630e07c48ae0c9558cef702a5c1b19ab7a04f536c519aca4983ac"
SUBSCRIPTIONS = [
    ("chain_subscribeNewHeads", [], "chain_newHead"),
    ("chain_subscribeFinalizedHeads", [], "chain_finalizedHead"),
    ("state_subscribeRuntimeVersion", [], "state_runtimeVersion"),
    ("state_subscribeStorage", [[SYSTEM_NUMBER]], "state_storage"),
]


async def test_subscriptions_through_rpc(solochain_rpc_url: str, solochain_node_url: str) -> None:
    async with connect(solochain_rpc_url, open_timeout=20, max_size=2**24) as ws:
        subs: dict[str, str] = {}
        for i, (method, params, _note) in enumerate(SUBSCRIPTIONS):
            await ws.send(
                json.dumps({"jsonrpc": "2.0", "id": i, "method": method, "params": params})
            )
        seen: dict[str, Any] = {}
        async with asyncio.timeout(30):
            while len(subs) < len(SUBSCRIPTIONS):
                msg = json.loads(await ws.recv())
                if "id" in msg:
                    assert "result" in msg, msg
                    subs[SUBSCRIPTIONS[msg["id"]][2]] = msg["result"]
                else:
                    seen.setdefault(msg["method"], msg)
            await asyncio.to_thread(_jsonrpc, solochain_node_url, "dev_newBlock")
            while len(seen) < len(SUBSCRIPTIONS):
                msg = json.loads(await ws.recv())
                seen.setdefault(msg.get("method"), msg)
        for note, sub_id in subs.items():
            assert seen[note]["params"]["subscription"] == sub_id  # routed to its subscription
        assert seen["state_runtimeVersion"]["params"]["result"]["specName"] == (
            "solochain-template-runtime"
        )
        changes = seen["state_storage"]["params"]["result"]["changes"]
        assert changes[0][0] == SYSTEM_NUMBER


async def test_subscriptions_and_extrinsic_status_through_relay(
    solochain_relay_url: str, solochain_node_url: str
) -> None:
    async with RelayClient(solochain_relay_url) as relay, relay.session() as s:
        version = s.subscribe(
            "state_subscribeRuntimeVersion", unsubscribe="state_unsubscribeRuntimeVersion"
        )
        storage = s.subscribe(
            "state_subscribeStorage", [[SYSTEM_NUMBER]], unsubscribe="state_unsubscribeStorage"
        )
        finalized = s.subscribe(
            "chain_subscribeFinalizedHeads", unsubscribe="chain_unsubscribeFinalizedHeads"
        )
        async with version, storage, finalized:
            first_version: Any = await asyncio.wait_for(anext(version), 30)
            assert first_version["specName"] == "solochain-template-runtime"
            first_storage: Any = await asyncio.wait_for(anext(storage), 30)
            assert first_storage["changes"][0][0] == SYSTEM_NUMBER
            await asyncio.to_thread(_jsonrpc, solochain_node_url, "dev_newBlock")
            head: Any = await asyncio.wait_for(anext(finalized), 30)
            assert int(head["number"], 16) >= 0
    # an extrinsic's status, through /relay: a transfer signed by //Dave (no other test
    # uses that account, so its nonce is ours) goes ready -> inBlock -> finalized
    xt_hex = await asyncio.to_thread(_signed_transfer_hex, solochain_node_url)
    async with RelayClient(solochain_relay_url) as relay, relay.session() as s:
        watch = s.subscribe(
            "author_submitAndWatchExtrinsic", [xt_hex], unsubscribe="author_unwatchExtrinsic"
        )
        seen: list[Any] = []
        async with watch, asyncio.timeout(60):
            async for status in watch:
                seen.append(status)
                if isinstance(status, dict) and "finalized" in status:
                    break
        assert any(isinstance(x, dict) and "inBlock" in x for x in seen), seen
        assert "finalized" in seen[-1], seen


def _signed_transfer_hex(node_url: str) -> str:
    from substrateinterface import Keypair, SubstrateInterface

    substrate = SubstrateInterface(url=node_url, auto_reconnect=False)
    try:
        dave, eve = Keypair.create_from_uri("//Dave"), Keypair.create_from_uri("//Eve")
        call = substrate.compose_call(
            "Balances", "transfer_keep_alive", {"dest": eve.ss58_address, "value": 10**12}
        )
        extrinsic = substrate.create_signed_extrinsic(call=call, keypair=dave)
        return str(extrinsic.data.to_hex())
    finally:
        substrate.close()
