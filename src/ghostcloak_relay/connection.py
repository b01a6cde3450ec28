"""What every client connection does, whichever endpoint: framing, limits, backpressure.

:class:`ClientConnection` is the picows listener base of ``/relay`` and ``/rpc``. It
turns frames into messages (RFC 6455: fragments joined, UTF-8 checked, valid close
codes echoed, invalid ones answered with 1002), counts the connection against
``RELAY_MAX_CONNECTIONS_PER_CLIENT`` under a keyed hash of the client address, and
applies backpressure both ways:

* the client does not read (its outbound buffer passes ``RELAY_CLIENT_BUFFER_BYTES``):
  stop reading from the client and from every node of its sessions, so TCP pushes back
  on the node; if that lasts ``RELAY_SLOW_CLIENT_TIMEOUT``, close with 1013;
* a node does not read (its connection's write buffer is full): stop reading from the
  client until it drains; the session ends if that lasts ``RELAY_SLOW_CLIENT_TIMEOUT``.

Memory per connection is therefore bounded by the write buffer limit plus one message
(``RELAY_MAX_MESSAGE_BYTES``) in flight on each leg.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Final

from mypy_extensions import mypyc_attr
from picows import WSCloseCode, WSMsgType, WSTransport

from .frame_gate import FrameGate
from .frames import FrameError, MessageAssembler, close_reply_code
from .limits import TokenBucket
from .logs import ref
from .protocol import EndReason

if TYPE_CHECKING:
    from .server import RelayServer
    from .session import UpstreamSession

__all__ = ["ClientConnection"]

log = logging.getLogger("ghostcloak_relay.connection")

_TEXT: Final = WSMsgType.TEXT  # Final: a C static when compiled


@mypyc_attr(native_class=False)  # a picows listener: see native.py
class ClientConnection(FrameGate):
    """Base listener for one client WebSocket connection."""

    endpoint: ClassVar[str] = ""

    def __init__(self, server: RelayServer) -> None:
        super().__init__()
        self.server = server
        self.transport: WSTransport | None = None
        self.closing = False
        self.client_key: str | None = None
        self.client_bucket: TokenBucket | None = None
        self.paused_since: float | None = None  # our outbound buffer is over its limit
        self._nodes_not_reading = 0
        self._assembler = MessageAssembler(server.settings.max_message_bytes)
        # whole text messages (FrameGate): decoded, to on_text; an endpoint may route them
        # elsewhere (/rpc: to its session, undecoded)
        self.whole_text = self.on_text

    # -- to be provided by the endpoint -----------

    def sessions(self) -> Iterable[UpstreamSession]:
        raise NotImplementedError

    def opened(self) -> None:
        """The connection is accepted and within every limit."""

    def on_text(self, text: str) -> None:
        raise NotImplementedError

    def on_binary(self, data: bytes) -> None:
        raise NotImplementedError

    def on_close_frame(self, code: WSCloseCode) -> None:
        """The client sent CLOSE with ``code``; end everything and echo it."""
        self.close(code, EndReason.CLIENT)

    def gone(self) -> None:
        """The TCP connection is gone; end every session without telling anyone."""
        for session in list(self.sessions()):
            session.end(EndReason.CLIENT, notify=False)

    def close(self, code: WSCloseCode, reason: EndReason) -> None:
        raise NotImplementedError

    # -- picows callbacks -----------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        server = self.server
        server.register(self)
        raw = transport.underlying_transport
        source = server.proxied_sources.pop(raw, None)  # RELAY_PROXY_PROTOCOL
        if source is None:
            peer = raw.get_extra_info("peername")
            source = str(peer[0]) if peer else "unknown"
        key = ref(source)
        bucket = server.clients.acquire(key)
        if bucket is None:
            server.stats.refused["too_many_connections_per_client"] += 1
            self.refuse(WSCloseCode.TRY_AGAIN_LATER, "too_many_connections")
            return
        self.client_key = key
        self.client_bucket = bucket if bucket.rate > 0 else None
        limit = server.settings.client_buffer_bytes
        raw.set_write_buffer_limits(high=limit, low=limit // 4)
        self.opened()

    def on_frame(self, transport: WSTransport, frame: Any) -> None:
        # frame: a picows WSFrame, typed Any because its fin/rsv bits are ints where
        # picows' stub says bool, and compiled code (native.py) checks declared types.
        # Whole text frames reach this only from the plain Python gate (frame_gate.py).
        if transport.is_close_frame_sent:
            # closing: picows 2.3 keeps delivering frames after it has refused one (for
            # example an oversized frame, closed with 1009); nothing more is acted on.
            return
        msg_type = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self.fail(FrameError(1002, "reserved bits set"))
            return
        if msg_type is _TEXT and frame.fin and not self._assembler.in_progress:
            handler = self.whole_text
            if handler is None:  # disconnected
                return
            if self.text_as_bytes:  # the endpoint parses it as JSON, which checks UTF-8 too
                handler(frame.get_payload_as_bytes())
                return
            try:
                text = frame.get_payload_as_utf8_text()
            except UnicodeDecodeError:
                self.fail(FrameError(1007, "invalid UTF-8"))
                return
            handler(text)
            return
        if msg_type is WSMsgType.CLOSE:
            try:
                code = close_reply_code(frame.payload_size, frame.get_close_code().value)
            except FrameError as exc:  # 0, 1005, 1006, 5000+: never echoed (RFC 6455 7.4)
                self.fail(exc)
                return
            self.on_close_frame(WSCloseCode(code))
            return
        if msg_type is WSMsgType.PING or msg_type is WSMsgType.PONG:
            return
        try:
            message = self._assembler.feed(msg_type.value, frame.fin, frame.get_payload_as_bytes())
        except FrameError as exc:
            self.fail(exc)
            return
        self.fragmented = self._assembler.in_progress  # the gate's fast path waits for the end
        if isinstance(message, str):
            self.on_text(message)
        elif message is not None:
            self.on_binary(message)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        self.whole_text = None  # a bound method of this connection or its session: a cycle
        self.gone()
        if self.client_key is not None:
            self.server.clients.release(self.client_key)
            self.client_key = None
        self.server.unregister(self)

    # -- backpressure -----------

    def pause_writing(self) -> None:
        """The client is not reading: stop reading it and its nodes."""
        self.paused_since = self.server.now
        self._set_reading(False)
        for session in self.sessions():
            session.pause_node_reading(True)

    def resume_writing(self) -> None:
        self.paused_since = None
        if self._nodes_not_reading == 0:
            self._set_reading(True)
        for session in self.sessions():
            session.pause_node_reading(False)

    def node_not_reading(self, stuck: bool) -> None:
        """One of our sessions' nodes stopped (or resumed) reading what we send it."""
        self._nodes_not_reading += 1 if stuck else -1
        if self.paused_since is None:
            self._set_reading(self._nodes_not_reading == 0)

    def _set_reading(self, on: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        raw = transport.underlying_transport
        if on:
            raw.resume_reading()
        else:
            raw.pause_reading()

    # -- helpers -----------

    def tick(self, now: float) -> None:
        """Housekeeping, about once a second: slow reader, then each session's timers."""
        if (
            self.paused_since is not None
            and now - self.paused_since >= self.server.settings.slow_client_timeout
        ):
            log.info("closing a %s connection: client not reading", self.endpoint)
            self.server.stats.refused["slow_client"] += 1
            self.close(WSCloseCode.TRY_AGAIN_LATER, EndReason.CLIENT)
            if self.transport is not None:
                self.transport.disconnect(graceful=False)
            return
        for session in list(self.sessions()):
            session.tick(now)

    def send(self, data: bytes | str, opcode: WSMsgType = _TEXT) -> None:
        transport = self.transport
        if transport is not None and not self.closing:
            transport.send(opcode, data)

    def refuse(self, code: WSCloseCode, reason: str) -> None:
        """Close before any session exists (a limit was reached)."""
        self.closing = True
        transport = self.transport
        if transport is not None:
            transport.send_close(code, reason.encode())
            transport.disconnect()

    def fail(self, exc: FrameError) -> None:
        """Close for a WebSocket protocol violation."""
        log.info("closing a %s connection: %s (%d)", self.endpoint, exc.reason, exc.code)
        self.close(WSCloseCode(exc.code), EndReason.CLIENT)

    def close_transport(self, code: WSCloseCode, reason: bytes = b"") -> None:
        self.closing = True
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        if not transport.is_close_frame_sent:
            transport.send_close(code, reason)
        transport.disconnect()
