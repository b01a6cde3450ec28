"""The relay server: ``WS /relay``, ``WS /rpc``, ``GET /health``, ``/ready``, ``/metrics``.

:class:`RelayServer` owns everything that lives longer than one connection: the
listening socket, the :class:`~.sessions.SessionManager`, the node pool and its probes,
the client connections, the counters, and the background tasks (upstream dials, probes,
the housekeeping tick, cleanup, the monitoring line). :func:`run` adds signals.

Shutdown (SIGTERM or SIGINT) is a drain: ``/ready`` turns 503 at once and new
WebSocket connections and sessions are refused, while requests already sent to a node
get their answers delivered if they come within the drain window (the first 80% of
``RELAY_SHUTDOWN_TIMEOUT``); then every session ends with reason ``shutdown``, clients
get 1001, upstreams close, and the process exits 0. A second signal exits at once (1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSListener,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # for RELAY_PROXY_PROTOCOL

from . import NATIVE
from .board import Board
from .config import Settings
from .connection import ClientConnection
from .limits import ClientRegistry
from .logs import SILENT, safe_exception
from .memory import read_memory, status_line
from .metrics import CONTENT_TYPE, make_registry, render
from .pool import NodePool
from .probe import probe_node
from .protocol import EndReason
from .proxyproto import ProxyHeaderShim
from .relay_connection import RelayConnection
from .rpc_connection import RpcConnection
from .sessions import SessionManager
from .stats import Stats
from .tasks import TaskOwner

__all__ = ["RelayServer", "run"]

log = logging.getLogger("ghostcloak_relay.server")

#: Initial picows read buffer per client connection (grows for large messages).
READ_BUFFER_INIT = 1024
_JSON = {"Content-Type": "application/json", "Cache-Control": "no-store"}
DRAIN_SHARE = 0.8  # of RELAY_SHUTDOWN_TIMEOUT spent waiting for in-flight answers


def make_server_ssl(cert: str, key: str) -> ssl.SSLContext:
    """TLS for clients: 1.2 or newer, the standard library's secure defaults."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _cert_not_after(path: str) -> float | None:
    """The certificate's expiry as a Unix time (for the metric), if it can be read."""
    try:
        decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
        return float(ssl.cert_time_to_seconds(decoded["notAfter"]))
    except Exception:
        return None


class RelayServer:
    """Routes, connections, sessions, nodes and background tasks of one relay process."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        upstream_ssl: ssl.SSLContext | None = None,
        probe_nodes: bool = True,
        board: Board | None = None,
        worker: int = 0,
    ) -> None:
        self.settings = settings
        self.probe_nodes = probe_nodes  # tests that count node connections turn probes off
        self.clock = clock
        self.now = clock()  # coarse clock, refreshed by the housekeeping tick
        self.board = board  # shared figures when several workers serve the port
        self.worker = worker
        on_change = None if board is None else (lambda n: board.set_active(worker, n))
        self.manager = SessionManager(clock, on_change)
        self.pool = NodePool(settings.node, settings.node_stale_after, clock)
        self.stats = Stats(len(settings.node))
        self.clients = ClientRegistry(
            settings.max_connections_per_client, settings.rate_limit_per_client, clock
        )
        self.tasks = TaskOwner()
        self.upstream_ssl = upstream_ssl
        self.server_ssl: ssl.SSLContext | None = None
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.port = 0
        self.registry = make_registry(self)
        self._server: asyncio.Server | None = None
        self._admin: asyncio.Server | None = None  # RELAY_METRICS_PORT, when set
        #: RELAY_PROXY_PROTOCOL: transport -> the client address its header gave (weakly
        #: held, so a connection that never completes its handshake leaves nothing)
        self.proxied_sources: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self.metrics_port: int | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._stopped = False
        self._tls_stamp: tuple[float, float] | None = None
        self.tls_reloads = {"ok": 0, "failed": 0}
        self.tls_not_after: float | None = None

    # -- lifecycle -----------

    async def start(self) -> None:
        """Bind and listen; start probes, housekeeping, cleanup and monitoring."""
        settings = self.settings
        if settings.tls_cert is not None and settings.tls_key is not None:
            self.server_ssl = make_server_ssl(settings.tls_cert, settings.tls_key)
            self._tls_stamp = self._tls_mtimes()
            self.tls_not_after = _cert_not_after(settings.tls_cert)
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
        if settings.proxy_protocol == "on":
            self._server = await self._proxy_protocol_server()
        else:
            self._server = await ws_create_server(
                self._route,
                settings.host,
                settings.port,
                ssl=self.server_ssl,
                logger_name=SILENT,
                enable_auto_pong=True,
                enable_auto_ping=True,
                auto_ping_idle_timeout=settings.ping_interval,
                auto_ping_reply_timeout=settings.ping_interval,
                max_frame_size=settings.max_message_bytes,
                read_buffer_init_size=READ_BUFFER_INIT,
                websocket_handshake_timeout=10,
                reuse_port=True if self.board is not None else None,  # workers share the port
            )
        self.port = self._server.sockets[0].getsockname()[1]
        if settings.metrics_port is not None:
            self._admin = await ws_create_server(
                self._admin_route,
                settings.metrics_host,
                settings.metrics_port,
                logger_name=SILENT,
                websocket_handshake_timeout=10,
                reuse_port=True if self.board is not None else None,
            )
            self.metrics_port = self._admin.sockets[0].getsockname()[1]
        tick = min(
            1.0,
            settings.idle_timeout / 4,
            settings.request_timeout / 4,
            settings.slow_client_timeout / 4,
        )
        self.tasks.spawn(self._every(tick, self.housekeeping), name="housekeeping")
        self.tasks.spawn(self._every(settings.cleanup_interval, self.cleanup), name="cleanup")
        self.tasks.spawn(self._every(settings.log_interval, self.log_status), name="monitor")
        if self.probe_nodes:
            self.tasks.spawn(self._probe_loop(), name="probes")
        scheme = "wss" if self.server_ssl is not None else "ws"
        log.info(
            "relay listening on %s://%s:%d (/relay, /rpc; %d node(s) configured; %s)",
            scheme,
            settings.host,
            self.port,
            len(settings.node),
            "compiled data plane" if NATIVE else "pure-Python data plane",
        )

    async def shutdown(self) -> None:
        """Drain, then end every session with ``shutdown`` and close clients with 1001."""
        if self._stopped:
            return
        self._stopped = True
        self.draining = True
        timeout = self.settings.shutdown_timeout
        deadline = self.clock() + timeout
        log.info(
            "draining: %d connection(s), %d session(s), %d request(s) in flight",
            len(self.connections),
            self.manager.active_count(),
            self.in_flight(),
        )
        drain_until = self.clock() + timeout * DRAIN_SHARE
        while self.in_flight() and self.clock() < drain_until:  # noqa: ASYNC110 - polled
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close(WSCloseCode.GOING_AWAY, EndReason.SHUTDOWN)
        try:
            async with asyncio.timeout(max(0.0, deadline - self.clock())):
                await self._all_closed.wait()
        except TimeoutError:
            log.warning("shutdown timeout: aborting %d connection(s)", len(self.connections))
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.disconnect(graceful=False)
        for listener in (self._server, self._admin):
            if listener is not None:
                listener.close()
        await self.tasks.aclose()
        for listener in (self._server, self._admin):
            if listener is not None:
                await listener.wait_closed()
        log.info("shutdown complete")

    async def _proxy_protocol_server(self) -> asyncio.Server:
        """The listener when ``RELAY_PROXY_PROTOCOL=on``: each connection first goes
        through :class:`~.proxyproto.ProxyHeaderShim`, then to picows as usual."""
        settings = self.settings

        def websocket() -> Any:
            return WSProtocol(
                None,
                None,
                False,
                self._route,
                SILENT,
                True,
                10,
                True,
                settings.ping_interval,
                settings.ping_interval,
                WSAutoPingStrategy.PING_WHEN_IDLE,
                True,
                settings.max_message_bytes,
                None,
                READ_BUFFER_INIT,
            )

        def record(transport: Any, source: str | None) -> None:
            if source is not None:
                self.proxied_sources[transport] = source

        return await asyncio.get_running_loop().create_server(
            lambda: ProxyHeaderShim(websocket, record),
            settings.host,
            settings.port,
            reuse_port=True if self.board is not None else None,
        )

    def in_flight(self) -> int:
        return sum(s.in_flight for conn in self.connections for s in conn.sessions())

    # -- routing -----------

    def _route(
        self, request: WSUpgradeRequest
    ) -> WSListener | WSUpgradeResponseWithListener | None:
        path = request.path.split(b"?", 1)[0]
        if request.method != b"GET":
            return None
        if path == b"/relay" or path == b"/rpc":
            refusal = self._admission()
            if refusal is not None:
                return refusal
            return RelayConnection(self) if path == b"/relay" else RpcConnection(self)
        return self._status_route(path, metrics=self.settings.metrics_port is None)

    def _admin_route(
        self, request: WSUpgradeRequest
    ) -> WSListener | WSUpgradeResponseWithListener | None:
        """``RELAY_METRICS_PORT``: /metrics, /health and /ready only; no WebSocket."""
        if request.method != b"GET" or request.headers.get("Upgrade"):
            return None
        return self._status_route(request.path.split(b"?", 1)[0], metrics=True)

    def _status_route(self, path: bytes, *, metrics: bool) -> WSUpgradeResponseWithListener | None:
        if path == b"/health":
            return _respond(200, orjson.dumps(self.health()))
        if path == b"/ready":
            ready = self.ready()
            body = orjson.dumps(
                {
                    "status": "ready" if ready else "unavailable",
                    "draining": self.draining,
                    "healthyNodes": sum(1 for n in self.pool.nodes if n.healthy),
                }
            )
            return _respond(200 if ready else 503, body)
        if path == b"/metrics" and metrics:
            return _respond(200, render(self.registry), {"Content-Type": CONTENT_TYPE})
        return None  # picows answers 404, for plain GETs and upgrades alike

    def _admission(self) -> WSUpgradeResponseWithListener | None:
        if self.draining:
            self.stats.refused["shutting_down"] += 1
            return _respond(503, b'{"error":"shutting_down"}')
        if len(self.connections) >= self.settings.max_connections:
            self.stats.refused["too_many_connections"] += 1
            return _respond(503, b'{"error":"too_many_connections"}')
        return None

    def health(self) -> dict[str, Any]:
        """Liveness: the original design's answer, for the whole server."""
        return {"status": "ok", "activeSessions": self.active_sessions()}

    def active_sessions(self) -> int:
        if self.board is not None:
            return self.board.active_total()
        return self.manager.active_count()

    def server_stats(self) -> Stats:
        """Counters of the whole server: this process, plus the other workers' snapshots."""
        if self.board is None:
            return self.stats
        return self.stats.merged(self.board.snapshots(skip=self.worker))

    def ready(self) -> bool:
        """Readiness: serving, not draining, and at least one node healthy."""
        return not self.draining and self.pool.any_healthy

    # -- connections -----------

    def register(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self.stats.connections[conn.endpoint] += 1
        self.stats.open_connections[conn.endpoint] += 1
        self._all_closed.clear()

    def unregister(self, conn: ClientConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.stats.open_connections[conn.endpoint] -= 1
        if not self.connections:
            self._all_closed.set()

    # -- background -----------

    def housekeeping(self) -> None:
        """About once a second: the coarse clock, request timeouts, idle and slow peers,
        and a changed certificate file."""
        self.now = now = self.clock()
        for conn in list(self.connections):
            conn.tick(now)
        if self.board is not None:
            self.board.publish(self.worker, self.stats.snapshot())
        if self._tls_stamp is not None and self._tls_mtimes() != self._tls_stamp:
            self.reload_tls()

    # -- TLS certificate reload ------------------------------------------------------

    def _tls_mtimes(self) -> tuple[float, float]:
        try:
            return (
                os.stat(self.settings.tls_cert or "").st_mtime,
                os.stat(self.settings.tls_key or "").st_mtime,
            )
        except OSError:
            return (0.0, 0.0)

    def reload_tls(self) -> bool:
        """Load ``RELAY_TLS_CERT``/``RELAY_TLS_KEY`` again (SIGHUP or a changed file).

        New connections get the new certificate; open ones are untouched. The files are
        read once and checked in a scratch context first, so a bad pair is refused with a
        log line and the old certificate keeps serving.
        """
        cert, key, live = self.settings.tls_cert, self.settings.tls_key, self.server_ssl
        if cert is None or key is None or live is None:
            return False
        self._tls_stamp = self._tls_mtimes()
        try:
            with tempfile.TemporaryDirectory() as scratch:
                pair = Path(scratch) / "pair.pem"
                pair.write_bytes(Path(key).read_bytes() + b"\n" + Path(cert).read_bytes())
                pair.chmod(0o600)
                make_server_ssl(str(pair), str(pair))  # refuses a bad or mismatched pair
                live.load_cert_chain(str(pair), str(pair))
                not_after = _cert_not_after(str(pair))
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.tls_reloads["failed"] += 1
            log.error(
                "TLS reload refused (%s): the previous certificate keeps serving",
                type(exc).__name__,
            )
            return False
        self.tls_reloads["ok"] += 1
        self.tls_not_after = not_after
        log.info("TLS certificate reloaded")
        return True

    def cleanup(self) -> None:
        """End sessions older than ``RELAY_SESSION_MAX_AGE`` (reason ``expired``)."""
        expired = self.manager.cleanup(self.settings.session_max_age)
        for session in expired:
            owner = session.owner
            session.owner = None  # the ended record must not keep its connection alive
            if isinstance(owner, ClientConnection):
                for live in list(owner.sessions()):
                    if live.session_id == session.session_id:
                        live.end(EndReason.EXPIRED)
        if expired:
            log.info("cleanup: %d session(s) expired", len(expired))

    def log_status(self) -> None:
        log.info(status_line(self.manager.active_count(), read_memory()))

    async def _probe_loop(self) -> None:
        settings = self.settings
        while True:
            await asyncio.gather(*(self._probe(node) for node in self.pool.nodes))
            await asyncio.sleep(settings.node_probe_interval)

    async def _probe(self, node: Any) -> None:
        was = node.healthy
        try:
            best = await probe_node(
                node.url,
                timeout=self.settings.upstream_connect_timeout,
                ssl_context=self.upstream_ssl,
            )
        except Exception as exc:
            self.pool.failed(node)
            if was is not False:
                log.warning("node %s unhealthy: %s", node.name, safe_exception(exc))
            return
        self.pool.probe_ok(node, best)
        if node.healthy and was is not True:
            log.info("node %s healthy (best block %d)", node.name, best)
        elif not node.healthy and was is not False:
            log.warning("node %s unhealthy: best block has not advanced", node.name)

    async def _every(self, interval: float, fn: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                fn()
            except Exception as exc:  # a periodic failure must not stop the loop
                log.error("periodic task failed: %s", safe_exception(exc))


def _respond(
    status: int, body: bytes, headers: dict[str, str] | None = None
) -> WSUpgradeResponseWithListener:
    headers = headers or _JSON
    if status < 400:
        response = WSUpgradeResponse.create_ok_response(body, headers)
    else:
        response = WSUpgradeResponse.create_error_response(status, body, headers)
    return WSUpgradeResponseWithListener(response, None)


def _loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's default handler prints exception text; this one prints type and place."""
    exc = context.get("exception")
    if isinstance(exc, BaseException):
        log.warning("event loop error: %s", safe_exception(exc))
    else:  # e.g. a client's failed TLS handshake: routine, and the context names peers
        log.debug("event loop notice without exception")


async def run(
    settings: Settings,
    *,
    ready: Callable[[RelayServer], None] | None = None,
    board: Board | None = None,
    worker: int = 0,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain and shut down; return the exit status."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_exception_handler)
    server = RelayServer(settings, board=board, worker=worker)
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("received %s", signal.Signals(signum).name)
        server.draining = True  # /ready turns 503 at once
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):  # before listening: no signal is missed
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    # a worker is forked with these blocked (see workers.py); pending ones arrive now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    await server.start()
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        await server.shutdown()  # the handlers stay: a second signal still exits at once
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0
