"""A wallet's session through GhostCloak Relay, with the Python client.

Usage::

    python examples/client_example.py ws://127.0.0.1:8443/relay
    python examples/client_example.py wss://relay.example:8443/relay --cafile ca.pem

It opens one connection to the relay's ``/relay`` endpoint, starts one session (the
relay dials a fresh connection to a node for it), makes one request, shows a call the
relay's method policy refuses, takes one notification of a new-heads subscription
(bounded by ``--timeout``), unsubscribes and ends the session. See ``docs/client.md``.

Exit status: 0 on success, 1 when the relay, the node or the wait fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys

from ghostcloak_relay.client import (
    RelayClient,
    RelayConnectionError,
    RelayError,
    RpcError,
    SessionEndedError,
    UpstreamUnavailableError,
)


async def run(url: str, ssl_context: ssl.SSLContext | None, timeout: float) -> None:
    async with RelayClient(url, ssl_context=ssl_context, timeout=timeout) as relay:
        print(f"connected to {url}")
        # One session = one fresh upstream connection at the relay. The client picks a
        # random 128-bit sessionId itself; it is ended when the block exits.
        async with relay.session() as session:
            print("session started")

            chain = await session.request("system_chain", timeout=timeout)
            print(f"system_chain -> {json.dumps(chain)}")

            # The relay answers refused methods itself, as a JSON-RPC error.
            try:
                await session.request("author_rotateKeys", timeout=timeout)
            except RpcError as err:
                print(f"author_rotateKeys refused by the relay: {err.code} {err.message}")

            async with session.subscribe(
                "chain_subscribeNewHeads", unsubscribe="chain_unsubscribeNewHeads"
            ) as heads:
                print("subscribed to chain_subscribeNewHeads")
                header = await asyncio.wait_for(anext(heads), timeout)
                print(f"new head #{int(header['number'], 16)}")
            print("unsubscribed")
        print("session ended")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the relay's /relay URL, e.g. ws://127.0.0.1:8443/relay")
    parser.add_argument("--cafile", help="CA bundle to verify a wss:// relay's certificate")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per step")
    args = parser.parse_args(argv)
    if not args.url.startswith(("ws://", "wss://")):
        parser.error("url must start with ws:// or wss://")
    ctx = ssl.create_default_context(cafile=args.cafile) if args.url.startswith("wss") else None
    try:
        asyncio.run(run(args.url, ctx, args.timeout))
    except UpstreamUnavailableError as err:
        print(f"error: the relay cannot reach a node ({err.code})", file=sys.stderr)
        return 1
    except SessionEndedError as err:
        print(f"error: the session ended early (reason {err.reason})", file=sys.stderr)
        return 1
    except RpcError as err:
        print(f"error: JSON-RPC error {err.code}: {err.message}", file=sys.stderr)
        return 1
    except RelayConnectionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RelayError as err:  # any other error envelope (RelayProtocolError)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"error: no answer within {args.timeout:g} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
