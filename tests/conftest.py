"""Shared fixtures: a dev node, relays on 127.0.0.1, independent clients, test upstreams.

Clients in these tests use the ``websockets`` library, not the relay's own picows code, so
a bug in one WebSocket stack cannot hide in the other. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve

from ghostcloak_relay.config import Settings
from ghostcloak_relay.devnode import DevNode, start_devnode
from ghostcloak_relay.server import RelayServer

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

TIMEOUT = 10.0


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = TIMEOUT, what: str = ""
) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {what or condition}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    """An envelope-protocol test client on top of a ``websockets`` connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, obj: Any) -> None:
        await self.ws.send(orjson.dumps(obj).decode())

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        msg = orjson.loads(raw)
        assert isinstance(msg, dict)
        return msg

    async def expect(self, **fields: Any) -> dict[str, Any]:
        msg = await self.recv()
        for key, value in fields.items():
            assert msg.get(key) == value, f"expected {key}={value!r} in {msg}"
        return msg

    async def until(self, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        """Read messages until one matches ``fields`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - time.monotonic()))
            if all(msg.get(k) == v for k, v in fields.items()):
                return msg

    async def start(self, sid: str) -> None:
        await self.send({"type": "session_start", "sessionId": sid})
        await self.expect(type="session_started", sessionId=sid)

    async def call(self, sid: str, method: str, params: Any = None, req_id: int = 1) -> Any:
        await self.send(
            {
                "type": "proxy",
                "sessionId": sid,
                "payload": {
                    "jsonrpc": "2.0",
                    "id": req_id,
                    "method": method,
                    "params": params or [],
                },
            }
        )
        msg = await self.expect(type="proxy", sessionId=sid)
        assert msg["payload"]["id"] == req_id
        return msg["payload"]

    async def no_message(self, within: float = 0.2) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.ws.recv(), within)


@pytest.fixture
async def devnode() -> AsyncIterator[DevNode]:
    node = await start_devnode("127.0.0.1", 0, block_time=3600)  # blocks only on demand
    yield node
    await node.aclose()


RelayFactory = Callable[..., Awaitable[RelayServer]]


@pytest.fixture
async def relay_factory() -> AsyncIterator[RelayFactory]:
    servers: list[RelayServer] = []

    async def make(*, probe_nodes: bool = False, **overrides: Any) -> RelayServer:
        """A relay on 127.0.0.1; node probes are off unless asked for, so that tests can
        count exactly the connections their sessions make."""
        settings = replace(Settings(host="127.0.0.1", port=0), **overrides)
        server = RelayServer(settings, probe_nodes=probe_nodes)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.shutdown()


@pytest.fixture
async def relay(relay_factory: RelayFactory, devnode: DevNode) -> RelayServer:
    return await relay_factory(node=(devnode.url,))


def relay_url(server: RelayServer, path: str = "/relay", scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{server.port}{path}"


@pytest.fixture
async def client_factory() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    opened: list[ClientConnection] = []

    async def make(url: str, **kwargs: Any) -> Client:
        ws = await connect(url, open_timeout=TIMEOUT, **kwargs)
        opened.append(ws)
        return Client(ws)

    yield make
    for ws in opened:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2)


@pytest.fixture
async def client(relay: RelayServer, client_factory: Callable[..., Awaitable[Client]]) -> Client:
    return await client_factory(relay_url(relay))


# -- scripted upstreams -----------------------------------------------------------------


@dataclass
class UpstreamConn:
    ws: ServerConnection
    headers: list[tuple[str, str]]
    received: list[str] = field(default_factory=list)


class ScriptedUpstream:
    """A JSON-RPC-ish upstream the test controls: records handshakes and messages,
    answers each request with ``{"id":..,"result":"ok:<method>"}`` (or runs ``handler``),
    and can close or abort any of its connections."""

    def __init__(self) -> None:
        self.conns: list[UpstreamConn] = []
        self.server: Server | None = None
        self.handler: Callable[[UpstreamConn, Any], Awaitable[None]] | None = None
        self.silent = False  # when True, never answers

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    @property
    def open_conns(self) -> list[UpstreamConn]:
        return [c for c in self.conns if c.ws.close_code is None]

    async def _serve(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        conn = UpstreamConn(ws, list(ws.request.headers.raw_items()))
        self.conns.append(conn)
        try:
            async for raw in ws:
                text = raw if isinstance(raw, str) else raw.decode()
                conn.received.append(text)
                msg = orjson.loads(text)
                if self.handler is not None:
                    await self.handler(conn, msg)
                elif not self.silent:
                    await ws.send(_answer(msg))
        except Exception:  # connection errors end the handler; the test inspects state
            pass

    async def start(self) -> ScriptedUpstream:
        self.server = await serve(self._serve, "127.0.0.1", 0, max_size=64 * 2**20)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _answer(msg: Any) -> bytes:
    if isinstance(msg, list):
        return orjson.dumps([_one(m) for m in msg])
    return orjson.dumps(_one(msg))


def _one(msg: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg.get("id"), "result": f"ok:{msg.get('method')}"}


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    up = await ScriptedUpstream().start()
    yield up
    await up.close()


class DelayProxy:
    """A TCP forwarder that waits ``delay`` seconds before connecting through: an
    upstream whose handshake is slow, so messages pile up before ``session_started``."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> DelayProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.delay)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


# -- TLS ----------------------------------------------------------------------------------


@dataclass
class TlsFiles:
    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return TlsFiles(ca, cert, key)


# -- subprocesses ----------------------------------------------------------------------------


class RelayProcess:
    """``ghostcloak-relay serve`` as a child process; output captured to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, args: list[str] | None = None):
        self.log_path = log_path
        self.port = int(env.get("PORT", "0"))
        full_env = {**os.environ, **env}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "ghostcloak-relay"), "serve", *(args or [])],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_listening(self) -> None:
        async def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"relay exited early ({self.proc.returncode}):\n{self.output}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            w.close()
            return True

        await eventually(ready, 20, "relay subprocess listening")

    async def wait_exit(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("relay subprocess did not exit in time")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@pytest.fixture
def relay_process(tmp_path: Path) -> Any:
    procs: list[RelayProcess] = []

    def make(env: dict[str, str], args: list[str] | None = None) -> RelayProcess:
        env = {"RELAY_HOST": "127.0.0.1", "PORT": str(free_port()), **env}
        proc = RelayProcess(env, tmp_path / f"relay-{len(procs)}.log", args)
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        proc.stop()
