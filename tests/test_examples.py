"""``examples/client_example.py`` runs as documented, against a dev node and a relay.

The relay runs in this process, so the example runs as a child process awaited with
asyncio (a blocking wait would stall the relay's event loop). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator

import pytest

from ghostcloak_relay.devnode import DevNode, start_devnode

from .conftest import ROOT, RelayFactory, free_port, relay_url

EXAMPLE = ROOT / "examples" / "client_example.py"
RUN_TIMEOUT = 60.0


@pytest.fixture
async def fast_devnode() -> AsyncIterator[DevNode]:
    """A dev node that makes a block every 0.2 s, so a subscription gets notified soon."""
    node = await start_devnode("127.0.0.1", 0, block_time=0.2)
    yield node
    await node.aclose()


async def run_example(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"example did not finish within {RUN_TIMEOUT:g} s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_example_makes_a_request_a_subscription_and_ends(
    relay_factory: RelayFactory, fast_devnode: DevNode
) -> None:
    relay = await relay_factory(node=(fast_devnode.url,))
    url = relay_url(relay)
    code, out, err = await run_example(url, "--timeout", "20")
    assert code == 0, f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    lines = out.splitlines()
    assert lines[:5] == [
        f"connected to {url}",
        "session started",
        'system_chain -> "GhostCloak Dev"',
        "author_rotateKeys refused by the relay: -32601 Method not allowed by the relay",
        "subscribed to chain_subscribeNewHeads",
    ]
    assert re.fullmatch(r"new head #\d+", lines[5])
    assert lines[6:] == ["unsubscribed", "session ended"]
    # the session really ended and its upstream connection is closed
    assert relay.manager.active_count() == 0
    assert relay.manager.started_total == 1
    assert fast_devnode.total_connections == 1
    for _ in range(200):
        if fast_devnode.active_connections == 0:
            break
        await asyncio.sleep(0.02)
    assert fast_devnode.active_connections == 0


async def test_example_reports_an_unreachable_node(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(node=(f"ws://127.0.0.1:{free_port()}",))
    code, out, err = await run_example(relay_url(relay), "--timeout", "10")
    assert code == 1
    assert "error: the relay cannot reach a node (upstream_unavailable)" in err
    assert "session started" not in out


async def test_example_reports_no_relay() -> None:
    code, _, err = await run_example(f"ws://127.0.0.1:{free_port()}/relay", "--timeout", "5")
    assert code == 1
    assert err.startswith("error: cannot connect to")


async def test_example_rejects_a_non_websocket_url() -> None:
    code, _, err = await run_example("http://127.0.0.1:1/relay")
    assert code == 2
    assert "url must start with ws:// or wss://" in err
