"""``WS /relay``: one client connection carrying many envelope sessions.

The listener decodes envelopes with :mod:`.protocol`, keeps this connection's sessions
(each with its own upstream connection, see :mod:`.upstream`) and moves messages both
ways. Bad input never closes the connection and never touches another session: it is
answered with an ``error`` envelope. Only WebSocket protocol violations (invalid UTF-8,
bad framing, oversized messages) close the connection, with the RFC close code.

Ownership: the connection owns its sessions; a session owns its upstream transport and
its connect task (spawned in the server's :class:`~.tasks.TaskOwner`, cancelled when the
session ends). Ending is idempotent and always goes through :meth:`RelaySession.end`.
"""

from __future__ import annotations

import logging
from collections import deque
from enum import Enum
from typing import TYPE_CHECKING, Any

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from . import protocol
from .frames import FrameError, MessageAssembler
from .logs import ref, safe_exception
from .protocol import EndReason, EnvelopeError, ErrorCode
from .rpc import RpcSession
from .sessions import Session, SessionExistsError
from .upstream import connect

if TYPE_CHECKING:
    import asyncio

    from .server import RelayServer

__all__ = ["RelayConnection", "RelaySession"]

log = logging.getLogger("ghostcloak_relay.relay")

_TEXT = WSMsgType.TEXT


class State(Enum):
    CONNECTING = 1
    OPEN = 2
    CLOSED = 3


class RelaySession:
    """One envelope session: its upstream transport and the messages queued for it."""

    __slots__ = (
        "_conn",
        "_prefix",
        "_queue",
        "connect_task",
        "core",
        "rpc",
        "session_id",
        "state",
        "upstream",
    )

    def __init__(self, conn: RelayConnection, core: Session) -> None:
        self._conn = conn
        self.core = core
        self.session_id = core.session_id
        self._prefix = protocol.proxy_prefix(core.session_id)
        # while connecting: (to_node, data) in arrival order; None once open or closed
        self._queue: deque[tuple[bool, bytes]] | None = deque()
        settings = conn.server.settings
        self.rpc = (
            RpcSession(
                settings.rpc_methods, settings.max_subscriptions_per_session, settings.max_batch
            )
            if settings.rpc_methods.enabled
            else None
        )
        self.state = State.CONNECTING
        self.upstream: WSTransport | None = None
        self.connect_task: asyncio.Task[None] | None = None

    # -- upstream events (UpstreamSink) -------------------------------------------------

    def on_upstream_open(self, transport: WSTransport) -> None:
        if self.state is not State.CONNECTING:  # ended while the handshake was finishing
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        self.upstream = transport
        self.state = State.OPEN
        self._conn.send(protocol.encode_session_started(self.session_id))
        queue, self._queue = self._queue, None
        if queue:
            for to_node, data in queue:
                if to_node:
                    transport.send(_TEXT, data)
                else:
                    self._conn.send(data)
        log.debug("session %s open", ref(self.session_id))

    def on_upstream_message(self, raw: bytes, binary: bool) -> None:
        if self.state is not State.OPEN:
            return
        try:
            msg = orjson.loads(raw)  # exactly one JSON value: safe to splice into the envelope
        except orjson.JSONDecodeError:
            log.info("session %s: node sent a message that is not JSON", ref(self.session_id))
            self.end(EndReason.UPSTREAM_ERROR)
            return
        if self.rpc is not None and (replacement := self.rpc.node_message(msg)) is not None:
            raw = orjson.dumps(replacement)
        self._conn.send(self._prefix + raw + b"}")

    def on_upstream_closed(self, clean: bool) -> None:
        if self.state is State.CLOSED:
            return
        self.upstream = None
        self.end(EndReason.UPSTREAM_CLOSED if clean else EndReason.UPSTREAM_ERROR)

    # -- client side --------------------------------------------------------------------

    def send_to_node(self, payload: dict[str, Any] | list[Any]) -> ErrorCode | None:
        """Apply the method policy, then send or queue what may reach the node."""
        answer = None
        if self.rpc is not None:
            decision = self.rpc.client_message(payload)
            if decision.answer is not None:
                answer = self._prefix + orjson.dumps(decision.answer) + b"}"
            payload = decision.forward
        if self.state is State.OPEN:
            assert self.upstream is not None
            if answer is not None:
                self._conn.send(answer)
            if payload is not None:
                self.upstream.send(_TEXT, orjson.dumps(payload))
            return None
        queue = self._queue
        assert queue is not None
        if len(queue) >= self._conn.server.settings.max_queued_messages:
            return ErrorCode.QUEUE_FULL
        if answer is not None:
            queue.append((False, answer))
        if payload is not None:
            queue.append((True, orjson.dumps(payload)))
        return None

    def end(self, reason: EndReason, *, notify: bool = True) -> None:
        """End the session once: close the upstream, tell the client, forget it."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._queue = None
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        upstream, self.upstream = self.upstream, None
        if upstream is not None and not upstream.is_disconnected:
            upstream.send_close(WSCloseCode.OK)
            upstream.disconnect()
        self._conn.server.manager.end(self.session_id, reason)
        self._conn.forget(self)
        if notify:
            self._conn.send(protocol.encode_session_ended(self.session_id, reason))
        log.debug("session %s ended: %s", ref(self.session_id), reason.value)


class RelayConnection(WSListener):
    """picows listener for one client connection on ``/relay``."""

    def __init__(self, server: RelayServer) -> None:
        super().__init__()
        self.server = server
        self.transport: WSTransport | None = None
        self.sessions: dict[str, RelaySession] = {}
        self._assembler = MessageAssembler(server.settings.max_message_bytes)
        self._closing = False

    # -- picows callbacks ---------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.server.register(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if transport.is_close_frame_sent:
            # closing: picows 2.3 keeps delivering frames after it has refused one (for
            # example an oversized frame, closed with 1009); nothing more is acted on.
            return
        msg_type = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self.fail(FrameError(1002, "reserved bits set"))
            return
        if msg_type is _TEXT and frame.fin and not self._assembler.in_progress:
            try:
                text = frame.get_payload_as_utf8_text()
            except UnicodeDecodeError:
                self.fail(FrameError(1007, "invalid UTF-8"))
                return
            self.on_message(text)
            return
        if msg_type is WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.close(code if code is not WSCloseCode.NO_INFO else WSCloseCode.OK)
            return
        if msg_type is WSMsgType.PING or msg_type is WSMsgType.PONG:
            return
        try:
            message = self._assembler.feed(msg_type.value, frame.fin, frame.get_payload_as_bytes())
        except FrameError as exc:
            self.fail(exc)
            return
        if message is None:
            return
        if isinstance(message, bytes):
            self.send(protocol.encode_error(ErrorCode.BINARY_NOT_SUPPORTED))
            return
        self.on_message(message)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._closing = True
        for session in list(self.sessions.values()):
            session.end(EndReason.CLIENT, notify=False)
        self.server.unregister(self)

    # -- envelopes ----------------------------------------------------------------------

    def on_message(self, text: str) -> None:
        try:
            msg = protocol.decode_client_message(text)
            if isinstance(msg, protocol.Proxy):
                self._proxy(msg)
            elif isinstance(msg, protocol.SessionStart):
                self._start(msg.session_id)
            else:
                self._end(msg.session_id)
        except EnvelopeError as exc:
            log.debug("client message refused: %s", exc.code.value)
            self.send(protocol.encode_error(exc.code, exc.session_id))

    def _proxy(self, msg: protocol.Proxy) -> None:
        session = self.sessions.get(msg.session_id)
        if session is None:
            raise EnvelopeError(ErrorCode.UNKNOWN_SESSION, msg.session_id)
        error = session.send_to_node(msg.payload)
        if error is not None:
            raise EnvelopeError(error, msg.session_id)

    def _start(self, requested: str | None) -> None:
        server = self.server
        if server.draining:
            raise EnvelopeError(ErrorCode.SHUTTING_DOWN, requested)
        if len(self.sessions) >= server.settings.max_sessions_per_connection:
            raise EnvelopeError(ErrorCode.TOO_MANY_SESSIONS, requested)
        session_id = requested if requested is not None else protocol.new_session_id()
        try:
            core = server.manager.start(session_id, owner=self)
        except SessionExistsError:
            raise EnvelopeError(ErrorCode.SESSION_EXISTS, requested) from None
        session = RelaySession(self, core)
        self.sessions[session_id] = session
        session.connect_task = server.tasks.spawn(
            self._connect(session), name="relay-upstream-connect"
        )

    async def _connect(self, session: RelaySession) -> None:
        server = self.server
        settings = server.settings
        try:
            await connect(
                server.pick_node(),
                session,
                timeout=settings.upstream_connect_timeout,
                max_message_bytes=settings.max_message_bytes,
                ssl_context=server.upstream_ssl,
            )
        except Exception as exc:  # any failure to reach the node is the same to the client
            if session.state is not State.CONNECTING:
                return
            log.info(
                "upstream connect failed for session %s: %s",
                ref(session.session_id),
                safe_exception(exc),
            )
            session.state = State.CLOSED
            server.manager.discard(session.session_id)
            self.forget(session)
            self.send(protocol.encode_error(ErrorCode.UPSTREAM_UNAVAILABLE, session.session_id))

    def _end(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            raise EnvelopeError(ErrorCode.UNKNOWN_SESSION, session_id)
        session.end(EndReason.CLIENT)

    # -- helpers --------------------------------------------------------------------------

    def forget(self, session: RelaySession) -> None:
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self._closing:
            transport.send(_TEXT, data)

    def fail(self, exc: FrameError) -> None:
        """Close for a WebSocket protocol violation (the only thing that closes)."""
        log.info("closing client connection: %s (%d)", exc.reason, exc.code)
        self.close(WSCloseCode(exc.code))

    def close(self, code: WSCloseCode, reason: EndReason = EndReason.CLIENT) -> None:
        """End every session (telling the client ``reason``) and close with ``code``."""
        transport = self.transport
        if transport is None or self._closing:
            return
        for session in list(self.sessions.values()):
            session.end(reason, notify=reason is not EndReason.CLIENT)
        self._closing = True
        transport.send_close(code)
        transport.disconnect()
