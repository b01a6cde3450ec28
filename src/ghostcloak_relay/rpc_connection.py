"""``WS /rpc``: plain JSON-RPC through the relay, one client connection = one session.

Stock Substrate clients (polkadot.js ``WsProvider``, ``substrate-interface``, the
Midnight wallet SDK) work by changing only the URL. Each client connection gets its own
fresh upstream connection; frames go both ways unchanged, except where the method
policy answers a refused call itself (the node never sees it) and where the answer to
``rpc_methods`` is filtered. With ``RELAY_RPC_METHODS=off`` nothing is parsed at all:
text and binary messages pass as they are (the conformance-test mode).

Close codes (``docs/protocol.md``): the client's close code goes to the node and the
node's to the client; the relay closes with 1014 (bad gateway) when the node is
unreachable or fails, 1001 on shutdown and session expiry, 1007/1002/1009 for protocol
violations. The close reason is the ``session_ended`` reason of ``/relay``.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from . import protocol
from .frames import FrameError, MessageAssembler
from .logs import ref, safe_exception
from .protocol import EndReason
from .rpc import PARSE_ERROR, RpcSession, error_response
from .sessions import Session
from .upstream import connect

if TYPE_CHECKING:
    import asyncio

    from .server import RelayServer

__all__ = ["RpcConnection"]

log = logging.getLogger("ghostcloak_relay.rpc")

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY

#: Close code the relay uses for each way a session can end (the reason is the text).
CLOSE_CODES: dict[EndReason, WSCloseCode] = {
    EndReason.CLIENT: WSCloseCode.OK,
    EndReason.UPSTREAM_CLOSED: WSCloseCode.OK,
    EndReason.UPSTREAM_ERROR: WSCloseCode.BAD_GATEWAY,
    EndReason.EXPIRED: WSCloseCode.GOING_AWAY,
    EndReason.IDLE: WSCloseCode.GOING_AWAY,
    EndReason.SHUTDOWN: WSCloseCode.GOING_AWAY,
}


class RpcConnection(WSListener):
    """picows listener for one ``/rpc`` client; also the sink of its upstream."""

    def __init__(self, server: RelayServer) -> None:
        super().__init__()
        self.server = server
        settings = server.settings
        self.transport: WSTransport | None = None
        self.upstream: WSTransport | None = None
        self.core: Session | None = None
        self.session_id = protocol.new_session_id()  # internal only: accounting and logs
        self.rpc = (
            RpcSession(
                settings.rpc_methods, settings.max_subscriptions_per_session, settings.max_batch
            )
            if settings.rpc_methods.enabled
            else None
        )
        self._assembler = MessageAssembler(settings.max_message_bytes)
        # client messages waiting for the upstream: (opcode, data)
        self._queue: deque[tuple[WSMsgType, bytes | str]] | None = deque()
        self._connect_task: asyncio.Task[None] | None = None
        self._ended = False

    # -- client side (picows callbacks) ----------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        server = self.server
        server.register(self)
        self.core = server.manager.start(self.session_id, owner=self)
        self._connect_task = server.tasks.spawn(self._connect(), name="rpc-upstream-connect")

    async def _connect(self) -> None:
        settings = self.server.settings
        try:
            await connect(
                self.server.pick_node(),
                self,
                timeout=settings.upstream_connect_timeout,
                max_message_bytes=settings.max_message_bytes,
                ssl_context=self.server.upstream_ssl,
            )
        except Exception as exc:
            if self._ended:
                return
            log.info(
                "upstream connect failed for session %s: %s",
                ref(self.session_id),
                safe_exception(exc),
            )
            self._end(EndReason.UPSTREAM_ERROR, WSCloseCode.BAD_GATEWAY, "upstream_unavailable")

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if transport.is_close_frame_sent:  # see RelayConnection.on_ws_frame
            return
        msg_type = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self._fail(FrameError(1002, "reserved bits set"))
            return
        if msg_type is _TEXT and frame.fin and not self._assembler.in_progress:
            try:
                text = frame.get_payload_as_utf8_text()
            except UnicodeDecodeError:
                self._fail(FrameError(1007, "invalid UTF-8"))
                return
            self._from_client(_TEXT, text)
            return
        if msg_type is WSMsgType.CLOSE:
            code = frame.get_close_code()
            self._end(
                EndReason.CLIENT, code if code is not WSCloseCode.NO_INFO else WSCloseCode.OK, ""
            )
            return
        if msg_type is WSMsgType.PING or msg_type is WSMsgType.PONG:
            return
        try:
            message = self._assembler.feed(msg_type.value, frame.fin, frame.get_payload_as_bytes())
        except FrameError as exc:
            self._fail(exc)
            return
        if message is not None:
            self._from_client(_TEXT if isinstance(message, str) else _BINARY, message)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._end(EndReason.CLIENT, WSCloseCode.OK, "")
        self.server.unregister(self)

    def _from_client(self, opcode: WSMsgType, data: bytes | str) -> None:
        rpc = self.rpc
        if rpc is not None:
            try:
                msg = protocol.loads_exact(data)
            except orjson.JSONDecodeError:
                self._to_client(orjson.dumps(error_response(None, PARSE_ERROR)))
                return
            decision = rpc.client_message(msg)
            if decision.answer is not None:
                self._to_client(orjson.dumps(decision.answer))
            if decision.forward is None:
                return
            if decision.changed:
                data, opcode = orjson.dumps(decision.forward), _TEXT
        upstream = self.upstream
        if upstream is not None:
            upstream.send(opcode, data)
            return
        queue = self._queue
        if queue is None:  # ended
            return
        if len(queue) >= self.server.settings.max_queued_messages:
            self._end(EndReason.CLIENT, WSCloseCode.TRY_AGAIN_LATER, "queue_full")
            return
        queue.append((opcode, data))

    def _to_client(self, data: bytes, opcode: WSMsgType = _TEXT) -> None:
        transport = self.transport
        if transport is not None and not self._ended:
            transport.send(opcode, data)

    # -- upstream side (UpstreamSink) ---------------------------------------------------------

    def on_upstream_open(self, transport: WSTransport) -> None:
        if self._ended:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        self.upstream = transport
        queue, self._queue = self._queue, None
        if queue:
            for opcode, data in queue:
                transport.send(opcode, data)
        log.debug("session %s open", ref(self.session_id))

    def on_upstream_message(self, data: bytes, binary: bool) -> None:
        if self._ended:
            return
        rpc = self.rpc
        if rpc is None:  # policy off: untouched, text stays text and binary stays binary
            self._to_client(data, _BINARY if binary else _TEXT)
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.info("session %s: node sent a message that is not JSON", ref(self.session_id))
            self._end(EndReason.UPSTREAM_ERROR, WSCloseCode.BAD_GATEWAY, "upstream_error")
            return
        replacement = rpc.node_message(msg)
        if replacement is not None:
            self._to_client(orjson.dumps(replacement))
        else:
            self._to_client(data, _BINARY if binary else _TEXT)

    def on_upstream_closed(self, clean: bool) -> None:
        self.upstream = None
        if clean:
            self._end(EndReason.UPSTREAM_CLOSED, WSCloseCode.OK, "upstream_closed")
        else:
            self._end(EndReason.UPSTREAM_ERROR, WSCloseCode.BAD_GATEWAY, "upstream_error")

    # -- ending ---------------------------------------------------------------------------------

    def _fail(self, exc: FrameError) -> None:
        log.info("closing client connection: %s (%d)", exc.reason, exc.code)
        self._end(EndReason.CLIENT, WSCloseCode(exc.code), "")

    def close(self, code: WSCloseCode, reason: EndReason = EndReason.CLIENT) -> None:
        """Server-initiated end (shutdown, expiry): close the client with ``code``."""
        self._end(reason, code, reason.value)

    def end_session(self, reason: EndReason) -> None:
        self._end(reason, CLOSE_CODES[reason], reason.value)

    def _end(self, reason: EndReason, code: WSCloseCode, text: str) -> None:
        """End once: close the upstream (passing the client's code on) and the client."""
        if self._ended:
            return
        self._ended = True
        self._queue = None
        task = self._connect_task
        if task is not None and not task.done():
            task.cancel()
        upstream, self.upstream = self.upstream, None
        if upstream is not None and not upstream.is_disconnected:
            upstream_code = code if reason is EndReason.CLIENT else WSCloseCode.OK
            upstream.send_close(upstream_code)
            upstream.disconnect()
        if self.core is not None:
            self.server.manager.end(self.session_id, reason)
        transport = self.transport
        if transport is not None and not transport.is_disconnected:
            if not transport.is_close_frame_sent:
                transport.send_close(code, text.encode())
            transport.disconnect()
        log.debug("session %s ended: %s", ref(self.session_id), reason.value)
