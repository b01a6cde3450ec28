"""``@polkadot/api`` (npm, 16.5.6) against both runtimes, through Node scripts in js/."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

UNIT = 10**12

NodeScript = Callable[..., dict[str, Any]]


def test_solochain_heads_and_finalized_transfer(
    node_script: NodeScript, solochain_rpc_url: str
) -> None:
    result = node_script("polkadot_transfer.mjs", solochain_rpc_url)

    assert result["specName"] == "solochain-template-runtime"
    assert len(result["heads"]) >= 1
    assert all(h["hash"].startswith("0x") for h in result["heads"])
    # the subscription also saw the block that took the transfer
    assert result["blockHash"] in {h["hash"] for h in result["heads"]}
    assert result["inBlockHash"] == result["blockHash"]
    assert result["blockNumber"] >= 1
    assert "balances.Transfer" in result["events"]
    assert "system.ExtrinsicSuccess" in result["events"]
    assert int(result["amount"]) == 2 * UNIT
    assert int(result["bobAfter"]) - int(result["bobBefore"]) == int(result["amount"])


def test_midnight_runtime_and_metadata(node_script: NodeScript, midnight_rpc_url: str) -> None:
    result = node_script("midnight_metadata.mjs", midnight_rpc_url)

    assert result["specName"] == "midnight"
    assert result["specVersion"] == 18000
    assert result["chain"] == "midnight_node-dev-01"
    assert result["metadataVersion"] >= 14
    assert result["palletCount"] == len(result["pallets"]) == 27
    assert {"Midnight", "MidnightSystem", "Aura", "Grandpa"} <= set(result["pallets"])
    assert result["hasMidnightTx"] is True
    assert result["headNumber"] == 0  # read-only: chopsticks cannot build Midnight blocks
