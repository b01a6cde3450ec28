"""Which JSON-RPC methods may reach the node: default-deny, pure functions.

A Substrate node on localhost with default settings serves its *unsafe* methods (key
management, peer control, log filters, heavy storage scans) to every local client, the
relay included. The relay must not put them on the internet, so it passes only an
allowlist of what a wallet needs (:data:`SAFE_METHODS`, :data:`SAFE_PREFIXES`) and
refuses :data:`UNSAFE_METHODS` whatever the configuration.

``RELAY_RPC_METHODS``:

* ``safe`` (default): the built-in allowlist;
* a path: a file with one method per line (``#`` comments; a trailing ``*`` makes a
  prefix, e.g. ``midnight_*``); unsafe methods stay denied even if listed;
* ``off``: no inspection at all; frames pass untouched (for non-JSON-RPC upstreams and
  conformance testing). The server logs a warning at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "SAFE_METHODS",
    "SAFE_PREFIXES",
    "UNSAFE_METHODS",
    "MethodPolicy",
    "PolicyError",
    "load_policy",
]

#: Denied always, whatever the configuration (Substrate's ``--rpc-methods unsafe`` set).
UNSAFE_METHODS: Final = frozenset(
    {
        "author_insertKey",
        "author_rotateKeys",
        "author_hasSessionKeys",
        "author_hasKey",
        "author_removeExtrinsic",
        "system_peers",
        "system_unstable_networkState",
        "system_addReservedPeer",
        "system_removeReservedPeer",
        "system_addLogFilter",
        "system_resetLogFilter",
        "state_getPairs",
        "state_queryStorage",
        "state_traceBlock",
        "offchain_localStorageSet",
        "offchain_localStorageGet",
        "dev_getBlockStats",
    }
)

#: Substrate's safe read and subscription methods a wallet needs, by exact name.
SAFE_METHODS: Final = frozenset(
    {
        "rpc_methods",
        # system_*: chain facts and the account nonce; nothing about the node's peers
        "system_name",
        "system_version",
        "system_chain",
        "system_chainType",
        "system_properties",
        "system_health",
        "system_syncState",
        "system_accountNextIndex",
        "account_nextIndex",
        # chain_*
        "chain_getBlock",
        "chain_getBlockHash",
        "chain_getHead",
        "chain_getHeader",
        "chain_getFinalizedHead",
        "chain_getFinalisedHead",
        "chain_getRuntimeVersion",
        "chain_subscribeNewHeads",
        "chain_unsubscribeNewHeads",
        "chain_subscribeNewHead",
        "chain_unsubscribeNewHead",
        "chain_subscribeFinalizedHeads",
        "chain_unsubscribeFinalizedHeads",
        "chain_subscribeFinalisedHeads",
        "chain_unsubscribeFinalisedHeads",
        "chain_subscribeAllHeads",
        "chain_unsubscribeAllHeads",
        "chain_subscribeRuntimeVersion",
        "chain_unsubscribeRuntimeVersion",
        # state_*: reads and subscriptions (not the unsafe scans above)
        "state_call",
        "state_callAt",
        "state_getMetadata",
        "state_getRuntimeVersion",
        "state_getStorage",
        "state_getStorageAt",
        "state_getStorageHash",
        "state_getStorageHashAt",
        "state_getStorageSize",
        "state_getStorageSizeAt",
        "state_getKeysPaged",
        "state_getKeysPagedAt",
        "state_queryStorageAt",
        "state_getReadProof",
        "state_subscribeRuntimeVersion",
        "state_unsubscribeRuntimeVersion",
        "state_subscribeStorage",
        "state_unsubscribeStorage",
        # author_*: submitting and watching one's own transactions only
        "author_submitExtrinsic",
        "author_submitAndWatchExtrinsic",
        "author_unwatchExtrinsic",
    }
)

#: Method families allowed whole: fees, Midnight's own API, and the new-style JSON-RPC
#: spec (chainHead, chainSpec, transaction and its watch group).
SAFE_PREFIXES: Final = (
    "payment_",
    "midnight_",
    "chainHead_v1_",
    "chainSpec_v1_",
    "transaction_v1_",
    "transactionWatch_v1_",
)


class PolicyError(ValueError):
    """The ``RELAY_RPC_METHODS`` value or its file is not usable."""


@dataclass(frozen=True, slots=True)
class MethodPolicy:
    """An allowlist; ``enabled=False`` is ``off`` (no inspection at all)."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    enabled: bool = True
    name: str = "safe"

    def allows(self, method: str) -> bool:
        if method in UNSAFE_METHODS:
            return False
        return method in self.exact or method.startswith(self.prefixes)


SAFE_POLICY: Final = MethodPolicy(SAFE_METHODS, SAFE_PREFIXES)
OFF_POLICY: Final = MethodPolicy(frozenset(), (), enabled=False, name="off")


def parse_allowlist(text: str) -> MethodPolicy:
    """Parse an allowlist file: one method per line, ``#`` comments, ``prefix_*``."""
    exact: set[str] = set()
    prefixes: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        name = item[:-1] if item.endswith("*") else item
        if not name or not all(c.isalnum() or c == "_" for c in name):
            raise PolicyError(f"line {number}: not a method name or prefix")
        if item.endswith("*"):
            prefixes.append(name)
        else:
            exact.add(name)
    return MethodPolicy(frozenset(exact), tuple(prefixes), name="file")


def load_policy(value: str) -> MethodPolicy:
    """``safe``, ``off`` or a path to an allowlist file."""
    if value == "safe":
        return SAFE_POLICY
    if value == "off":
        return OFF_POLICY
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read allowlist file ({type(exc).__name__})") from None
    return parse_allowlist(text)
