"""``substrate-interface`` (PyPI, 1.8.1) against the solochain template runtime.

The library is synchronous, so these tests are plain functions. Each client
gets a socket timeout (every ``recv`` is bounded) and no auto-reconnect, so a
dropped connection fails the test instead of being papered over.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

UNIT = 10**12  # tokenDecimals 12
SOCKET_TIMEOUT_S = 20


@pytest.fixture
def substrate(substrateinterface: ModuleType, solochain_rpc_url: str) -> Iterator[Any]:
    client = substrateinterface.SubstrateInterface(
        url=solochain_rpc_url,
        ws_options={"timeout": SOCKET_TIMEOUT_S},
        auto_reconnect=False,
    )
    try:
        yield client
    finally:
        client.close()


def free_balance(substrate: Any, address: str) -> int:
    account = substrate.query("System", "Account", [address]).value
    return int(account["data"]["free"])


def test_reads_storage(substrate: Any, substrateinterface: ModuleType) -> None:
    alice = substrateinterface.Keypair.create_from_uri("//Alice")

    account = substrate.query("System", "Account", [alice.ss58_address]).value

    assert substrate.runtime_version == 100
    assert substrate.token_symbol == "UNIT"
    assert account["data"]["free"] > 0
    assert account["providers"] >= 1


def test_reads_a_block(substrate: Any) -> None:
    head = substrate.get_chain_head()

    block = substrate.get_block(block_hash=head)

    assert block["header"]["hash"] == head
    assert isinstance(block["header"]["number"], int)
    assert block["header"]["number"] >= 0
    assert block["header"]["parentHash"].startswith("0x")
    # chopsticks has built at least #1 on start-up, whose first extrinsic sets the time
    assert any(xt.value["call"]["call_module"] == "Timestamp" for xt in block["extrinsics"])


def test_subscribes_to_new_heads(
    substrate: Any, solochain_node_url: str, jsonrpc: Callable[..., Any]
) -> None:
    # Instant mode builds a block only for an extrinsic, so the test asks the
    # node itself (a control channel, not the path under test) for one block
    # once the subscription has delivered its first header, or after 5 s.
    first_seen = threading.Event()
    made: list[str] = []

    def make_block() -> None:
        first_seen.wait(5)
        made.append(jsonrpc(solochain_node_url, "dev_newBlock"))

    numbers: list[int] = []

    def on_header(obj: dict[str, Any], update_nr: int, subscription_id: str) -> list[int] | None:
        numbers.append(obj["header"]["number"])
        first_seen.set()
        return numbers if len(numbers) >= 2 else None

    trigger = threading.Thread(target=make_block, daemon=True)
    trigger.start()
    try:
        result = substrate.subscribe_block_headers(on_header)
    finally:
        first_seen.set()
        trigger.join(SOCKET_TIMEOUT_S)

    assert result == numbers
    assert len(numbers) == 2
    assert numbers[1] == numbers[0] + 1
    assert len(made) == 1
    assert made[0].startswith("0x")


def test_submits_a_signed_transfer(substrate: Any, substrateinterface: ModuleType) -> None:
    keypair = substrateinterface.Keypair
    alice = keypair.create_from_uri("//Alice")
    bob = keypair.create_from_uri("//Bob")
    amount = 3 * UNIT
    bob_before = free_balance(substrate, bob.ss58_address)

    call = substrate.compose_call(
        call_module="Balances",
        call_function="transfer_keep_alive",
        call_params={"dest": bob.ss58_address, "value": amount},
    )
    extrinsic = substrate.create_signed_extrinsic(call=call, keypair=alice)
    receipt = substrate.submit_extrinsic(extrinsic, wait_for_inclusion=True)

    assert receipt.is_success, receipt.error_message
    assert receipt.block_hash.startswith("0x")
    events = [(e.value["module_id"], e.value["event_id"]) for e in receipt.triggered_events]
    assert ("Balances", "Transfer") in events
    assert ("System", "ExtrinsicSuccess") in events
    assert free_balance(substrate, bob.ss58_address) == bob_before + amount
