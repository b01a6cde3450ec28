"""The relay server: one port for ``WS /relay``, ``WS /rpc``, ``GET /health``; 404 else.

:class:`RelayServer` owns everything that lives longer than one connection: the
listening socket, the :class:`~.sessions.SessionManager`, the client connections, the
background tasks (upstream dials, cleanup, the monitoring line) and the shutdown.
:func:`run` adds signal handling for the CLI.

Shutdown (SIGTERM or SIGINT): stop accepting, tell every session ``session_ended`` with
reason ``shutdown``, close client connections with 1001 and every upstream, wait for the
connections to go (at most ``RELAY_SHUTDOWN_TIMEOUT``), exit 0. A second signal exits at
once with status 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import ssl
import time
from collections.abc import Callable
from typing import Any

import orjson
from picows import (
    WSCloseCode,
    WSListener,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from .config import Settings
from .logs import SILENT, safe_exception
from .memory import read_memory, status_line
from .protocol import EndReason
from .relay_connection import RelayConnection
from .rpc_connection import RpcConnection
from .sessions import SessionManager
from .tasks import TaskOwner

__all__ = ["RelayServer", "run"]

log = logging.getLogger("ghostcloak_relay.server")

#: Initial picows read buffer per client connection (grows for large messages).
READ_BUFFER_INIT = 1024
_JSON_HEADERS = {"Content-Type": "application/json", "Cache-Control": "no-store"}


def make_server_ssl(cert: str, key: str) -> ssl.SSLContext:
    """TLS for clients: 1.2 or newer, the standard library's secure defaults."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class RelayServer:
    """Routes, connections, sessions and background tasks of one relay process."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        upstream_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.manager = SessionManager(clock)
        self.tasks = TaskOwner()
        self.upstream_ssl = upstream_ssl
        self.connections: set[RelayConnection | RpcConnection] = set()
        self.draining = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and listen; start the cleanup and monitoring loops."""
        settings = self.settings
        ssl_ctx = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            ssl_ctx = make_server_ssl(settings.tls_cert, settings.tls_key)
        else:
            log.warning(
                "TLS is off (RELAY_TLS_CERT/RELAY_TLS_KEY not set): serving plain ws://; "
                "terminate TLS in front of the relay"
            )
        if not settings.rpc_methods.enabled:
            log.warning(
                "RELAY_RPC_METHODS=off: no method policy, every frame reaches the node "
                "unchecked; use only for non-JSON-RPC upstreams and conformance tests"
            )
        self._server = await ws_create_server(
            self._route,
            settings.host,
            settings.port,
            ssl=ssl_ctx,
            logger_name=SILENT,
            enable_auto_pong=True,
            max_frame_size=settings.max_message_bytes,
            read_buffer_init_size=READ_BUFFER_INIT,
            websocket_handshake_timeout=10,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.tasks.spawn(self._every(settings.cleanup_interval, self.cleanup), name="cleanup")
        self.tasks.spawn(self._every(settings.log_interval, self.log_status), name="monitor")
        scheme = "wss" if ssl_ctx is not None else "ws"
        log.info(
            "relay listening on %s://%s:%d/relay (%d node(s) configured)",
            scheme,
            settings.host,
            self.port,
            len(settings.node),
        )

    async def shutdown(self) -> None:
        """Graceful stop: sessions end with ``shutdown``, clients get 1001."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "shutting down: %d connection(s), %d session(s)",
            len(self.connections),
            self.manager.active_count(),
        )
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close(WSCloseCode.GOING_AWAY, EndReason.SHUTDOWN)
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout):
                await self._all_closed.wait()
        except TimeoutError:
            log.warning("shutdown timeout: aborting %d connection(s)", len(self.connections))
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.disconnect(graceful=False)
        await self.tasks.aclose()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        log.info("shutdown complete")

    # -- routing ------------------------------------------------------------------------------

    def _route(
        self, request: WSUpgradeRequest
    ) -> WSListener | WSUpgradeResponseWithListener | None:
        path = request.path.split(b"?", 1)[0]
        if path == b"/relay" and request.method == b"GET":
            if self.draining:
                return _plain(503, b'{"error":"shutting down"}')
            return RelayConnection(self)
        if path == b"/rpc" and request.method == b"GET":
            if self.draining:
                return _plain(503, b'{"error":"shutting down"}')
            return RpcConnection(self)
        if path == b"/health" and request.method == b"GET":
            return _plain(200, orjson.dumps(self.health()))
        return None  # picows answers 404, for plain GETs and upgrades alike

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "activeSessions": self.manager.active_count()}

    # -- connections --------------------------------------------------------------------------

    def register(self, conn: RelayConnection | RpcConnection) -> None:
        self.connections.add(conn)
        self._all_closed.clear()

    def unregister(self, conn: RelayConnection | RpcConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._all_closed.set()

    def pick_node(self) -> str:
        """A node for a new session, at random so no node sees every session."""
        return random.choice(self.settings.node)

    # -- monitoring ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        """End sessions older than ``RELAY_SESSION_MAX_AGE`` (reason ``expired``)."""
        expired = self.manager.cleanup(self.settings.session_max_age)
        for session in expired:
            owner = session.owner
            if isinstance(owner, RelayConnection):
                live = owner.sessions.get(session.session_id)
                if live is not None:
                    live.end(EndReason.EXPIRED)
            elif isinstance(owner, RpcConnection):
                owner.end_session(EndReason.EXPIRED)
        if expired:
            log.info("cleanup: %d session(s) expired", len(expired))

    def log_status(self) -> None:
        log.info(status_line(self.manager.active_count(), read_memory()))

    async def _every(self, interval: float, fn: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                fn()
            except Exception as exc:  # a monitoring failure must not stop the loop
                log.error("periodic task failed: %s", safe_exception(exc))


def _plain(status: int, body: bytes) -> WSUpgradeResponseWithListener:
    if status < 400:
        response = WSUpgradeResponse.create_ok_response(body, _JSON_HEADERS)
    else:
        response = WSUpgradeResponse.create_error_response(status, body, _JSON_HEADERS)
    return WSUpgradeResponseWithListener(response, None)


def _loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's default handler prints exception text; this one prints type and place."""
    exc = context.get("exception")
    what = safe_exception(exc) if isinstance(exc, BaseException) else "no exception"
    log.error("event loop error: %s", what)


async def run(settings: Settings, *, ready: Callable[[RelayServer], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully; return the exit status."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_exception_handler)
    server = RelayServer(settings)
    await server.start()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        await server.shutdown()  # the handlers stay: a second signal still exits at once
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
