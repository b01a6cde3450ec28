"""The Midnight wallet SDK node client (npm ``@midnight-ntwrk/wallet-sdk-node-client`` 1.1.2).

Read-only against the Midnight runtime: initialise the client (it loads the
metadata) and fetch the genesis transactions. Submitting a transaction cannot
work under chopsticks, which lacks the runtime's ledger host functions; see
js/midnight_wallet_sdk.mjs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def test_initialises_and_reads_genesis(
    node_script: Callable[..., dict[str, Any]],
    midnight_rpc_url: str,
    jsonrpc: Callable[..., Any],
) -> None:
    result = node_script("midnight_wallet_sdk.mjs", midnight_rpc_url)

    assert result["specName"] == "midnight"
    assert result["specVersion"] == 18000
    assert result["hasMidnightTx"] is True
    # the SDK's genesis is the node's block #0, and it holds no Midnight transactions
    assert result["genesisHash"] == jsonrpc(midnight_rpc_url, "chain_getBlockHash", [0])
    assert result["genesisTransactions"] == 0
    assert result["genesisTransactionBytes"] == []
