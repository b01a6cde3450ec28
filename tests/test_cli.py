"""The console script as operators run it: config errors, --help, SIGTERM, check, demo."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from ghostcloak_relay.config import OPTIONS
from ghostcloak_relay.devnode import DevNode

from .conftest import VENV_BIN, Client, RelayFactory, eventually, free_port, relay_url

EXE = str(VENV_BIN / "ghostcloak-relay")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> Any:
    return subprocess.run(
        [EXE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_serve_help_documents_every_option_and_variable() -> None:
    out = run_cli("serve", "--help").stdout
    for opt in OPTIONS:
        assert opt.flag in out
        assert opt.env in out


def test_python_dash_m_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ghostcloak_relay", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert "ghostcloak-relay" in result.stdout


@pytest.mark.parametrize(
    ("env", "args", "variable", "value"),
    [
        ({"PORT": "eighty"}, [], "PORT", "eighty"),
        ({"PORT": "70000"}, [], "PORT", "70000"),
        ({"MIDNIGHT_NODE": "http://node:9944"}, [], "MIDNIGHT_NODE", "http://node:9944"),
        ({"RELAY_SESSION_MAX_AGE": "0"}, [], "RELAY_SESSION_MAX_AGE", "0"),
        ({"RELAY_CLEANUP_INTERVAL": "-1"}, [], "RELAY_CLEANUP_INTERVAL", "-1"),
        ({"RELAY_LOG_LEVEL": "loud"}, [], "RELAY_LOG_LEVEL", "loud"),
        ({}, ["--max-sessions-per-connection", "0"], "RELAY_MAX_SESSIONS_PER_CONNECTION", "0"),
        (
            {"RELAY_SHUTDOWN_TIMEOUT": "5"},
            ["--shutdown-timeout", "soon"],
            "RELAY_SHUTDOWN_TIMEOUT",
            "soon",
        ),
    ],
)
def test_invalid_value_exits_with_one_line(
    env: dict[str, str], args: list[str], variable: str, value: str
) -> None:
    result = run_cli("serve", *args, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert value in lines[0]
    assert "expected" in lines[0]


async def test_sigterm_ends_sessions_closes_1001_and_exits_0(
    relay_process: Callable[..., Any],
    devnode: DevNode,
    client_factory: Callable[..., Awaitable[Client]],
) -> None:
    proc = relay_process({"MIDNIGHT_NODE": devnode.url, "RELAY_SHUTDOWN_TIMEOUT": "5"})
    await proc.wait_listening()
    c = await client_factory(f"ws://127.0.0.1:{proc.port}/relay")
    await c.start("sigterm-session-1")
    await c.start("sigterm-session-2")
    assert (await c.call("sigterm-session-1", "system_chain"))["result"] == "GhostCloak Dev"
    proc.proc.send_signal(signal.SIGTERM)
    ended = {
        (await c.expect(type="session_ended", reason="shutdown"))["sessionId"] for _ in range(2)
    }
    assert ended == {"sigterm-session-1", "sigterm-session-2"}
    with pytest.raises(ConnectionClosed):
        await c.recv()
    assert c.ws.close_code == 1001
    assert await proc.wait_exit(10) == 0
    await eventually(lambda: devnode.active_connections == 0)


async def test_sigint_also_shuts_down_gracefully(
    relay_process: Callable[..., Any], devnode: DevNode
) -> None:
    proc = relay_process({"MIDNIGHT_NODE": devnode.url})
    await proc.wait_listening()
    proc.proc.send_signal(signal.SIGINT)
    assert await proc.wait_exit(10) == 0
    assert "shutdown complete" in proc.output


async def test_check_reports_ok_against_a_live_relay(
    relay_factory: RelayFactory, devnode: DevNode
) -> None:
    relay = await relay_factory(node=(devnode.url,))
    result = await asyncio.to_thread(run_cli, "check", f"ws://127.0.0.1:{relay.port}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"status": "ok"' in result.stdout
    assert "system_health" in result.stdout
    assert result.stdout.strip().endswith("OK")


async def test_check_fails_when_the_relay_cannot_reach_its_node(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(node=(f"ws://127.0.0.1:{free_port()}",))
    result = await asyncio.to_thread(run_cli, "check", relay_url(relay, ""))
    assert result.returncode == 1
    assert "upstream_unavailable" in result.stdout


def test_check_fails_when_nothing_listens() -> None:
    result = run_cli("check", f"ws://127.0.0.1:{free_port()}", "--timeout", "3")
    assert result.returncode == 1
    assert "FAILED" in result.stdout


def test_demo_runs_the_scripted_session() -> None:
    result = run_cli("demo", "--port", "0", "--exit-after-script", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in (
        "session_started",
        "system_chain",
        "'GhostCloak Dev'",
        "chain_subscribeNewHeads",
        "new head #",
        "session_ended (client)",
    ):
        assert expected in out


async def test_devnode_command_serves_until_sigterm(tmp_path: Any) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [EXE, "devnode", "--port", str(port), "--block-time", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        from websockets.asyncio.client import connect

        async def up() -> bool:
            try:
                ws = await connect(f"ws://127.0.0.1:{port}", open_timeout=2)
            except OSError:
                return False
            await ws.send('{"jsonrpc":"2.0","id":1,"method":"system_name"}')
            assert "ghostcloak-devnode" in str(await asyncio.wait_for(ws.recv(), 5))
            await ws.close()
            return True

        await eventually(up, 20, "devnode listening")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
