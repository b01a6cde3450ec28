"""The project's own ``RelayClient`` through ``/relay`` against a real Substrate runtime."""

from __future__ import annotations

import asyncio
from typing import Any

from ghostcloak_relay.client import RelayClient

from .conftest import _jsonrpc

# System.Account of //Alice: twox128("System") ++ twox128("Account") ++ blake2_128_concat(alice)
SYSTEM_ACCOUNT_PREFIX = "0x26aa394eea5630e07c48ae0c9558cef7b99d880ec681799c0cf30e8886371da9"


async def test_storage_read_and_subscription_through_relay(
    solochain_relay_url: str, solochain_node_url: str
) -> None:
    async with RelayClient(solochain_relay_url) as relay, relay.session() as s:
        version = await s.request("state_getRuntimeVersion")
        assert version["specName"] == "solochain-template-runtime"
        keys = await s.request("state_getKeysPaged", [SYSTEM_ACCOUNT_PREFIX, 10])
        assert keys, "dev accounts exist in System.Account"
        account = await s.request("state_getStorage", [keys[0]])
        assert isinstance(account, str)
        assert len(account) > 2 + 2 * 16
        async with s.subscribe(
            "chain_subscribeNewHeads", unsubscribe="chain_unsubscribeNewHeads"
        ) as heads:
            first: Any = await asyncio.wait_for(anext(heads), 30)
            # a new block, made on the node directly (Instant mode makes none while idle)
            await asyncio.to_thread(_jsonrpc, solochain_node_url, "dev_newBlock")
            while True:
                header: Any = await asyncio.wait_for(anext(heads), 30)
                if int(header["number"], 16) > int(first["number"], 16):
                    break
        unsafe = await s.request("rpc_methods")
        assert "author_rotateKeys" not in unsafe["methods"]
        assert "state_getStorage" in unsafe["methods"]
