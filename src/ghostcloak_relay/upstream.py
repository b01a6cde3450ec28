"""Dial the node: one fresh WebSocket connection per session, carrying nothing of the client.

The handshake the node sees is exactly what picows writes for a client (``Host`` of the
node, ``Upgrade``, ``Connection``, ``Sec-WebSocket-Key``, ``Sec-WebSocket-Version``) plus
the fixed ``User-Agent`` below. No client header, subprotocol or extension is ever
forwarded: :func:`connect` takes no headers from its caller. Connections are never
pooled or reused between sessions.

Frames from the node are assembled into messages and handed to an
:class:`UpstreamSink` (the session at the edge), synchronously from picows' callback,
so ordering is the node's order.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Final, Protocol

from mypy_extensions import mypyc_attr
from picows import WSCloseCode, WSMsgType, WSTransport, ws_connect

from .frame_gate import FrameGate
from .frames import FrameError, MessageAssembler, close_reply_code
from .logs import SILENT

__all__ = ["USER_AGENT", "UpstreamListener", "UpstreamSink", "connect"]

_TEXT: Final = WSMsgType.TEXT  # Final: a C static when compiled

#: The only header the relay adds to the upstream handshake: generic, the same for all.
USER_AGENT = "ghostcloak-relay"

#: Initial picows read buffer per upstream connection; it grows for big messages.
READ_BUFFER_INIT = 1024


class UpstreamSink(Protocol):
    """What an upstream connection reports to (implemented by the session)."""

    def on_upstream_open(self, transport: WSTransport) -> None: ...
    def on_upstream_message(self, data: bytes, binary: bool = False) -> None: ...
    def on_upstream_closed(self, clean: bool) -> None: ...
    def on_upstream_pause(self, stuck: bool) -> None: ...


@mypyc_attr(native_class=False)  # a picows listener: see native.py
class UpstreamListener(FrameGate):
    """picows listener for one upstream connection."""

    __slots__ = ("_assembler", "_clean_close", "_failed", "_sink")

    def __init__(self, sink: UpstreamSink, max_message_bytes: int) -> None:
        super().__init__()
        self._sink = sink
        self._assembler = MessageAssembler(max_message_bytes)
        self._clean_close = False
        self._failed = False
        # whole text messages go to the sink as bytes, unchecked (it parses them as JSON)
        self.whole_text = sink.on_upstream_message
        self.text_as_bytes = True

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._sink.on_upstream_open(transport)

    def on_frame(self, transport: WSTransport, frame: Any) -> None:
        # frame: a picows WSFrame, typed Any because its fin/rsv bits are ints where
        # picows' stub says bool, and compiled code (native.py) checks declared types.
        # Whole text frames reach this only from the plain Python gate (frame_gate.py).
        if transport.is_close_frame_sent:  # see RelayConnection.on_ws_frame
            return
        msg_type = frame.msg_type
        if msg_type is _TEXT and frame.fin and not self._assembler.in_progress:
            # hot path: a whole message in one frame; the sink validates it as JSON.
            self._sink.on_upstream_message(frame.get_payload_as_bytes(), False)
            return
        if msg_type is WSMsgType.CLOSE:
            code = frame.get_close_code()
            self._clean_close = code in (WSCloseCode.OK, WSCloseCode.GOING_AWAY)
            try:
                reply = close_reply_code(frame.payload_size, code.value)
            except FrameError as exc:  # the node sent 0, 1005, 1006 or 5000+: don't echo it
                self._failed = True
                reply = exc.code
            transport.send_close(WSCloseCode(reply))
            transport.disconnect()
            return
        if msg_type in (WSMsgType.PING, WSMsgType.PONG):
            return
        try:
            message = self._assembler.feed(
                frame.msg_type.value, frame.fin, frame.get_payload_as_bytes()
            )
        except FrameError as exc:
            self._failed = True
            transport.send_close(WSCloseCode(exc.code))
            transport.disconnect()
            return
        self.fragmented = self._assembler.in_progress  # the gate's fast path waits for the end
        if isinstance(message, str):
            self._sink.on_upstream_message(message.encode(), False)
        elif message is not None:
            self._sink.on_upstream_message(message, True)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.whole_text = None  # the sink's bound method: a cycle through the session
        self._sink.on_upstream_closed(self._clean_close and not self._failed)

    def pause_writing(self) -> None:  # the node is not reading what we send
        self._sink.on_upstream_pause(True)

    def resume_writing(self) -> None:
        self._sink.on_upstream_pause(False)


async def connect(
    url: str,
    sink: UpstreamSink,
    *,
    timeout: float,
    max_message_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
    ping_interval: float | None = None,
    write_buffer_bytes: int = 1024 * 1024,
) -> WSTransport:
    """Open a fresh connection to ``url``; ``sink.on_upstream_open`` runs before return.

    Raises ``OSError``, ``TimeoutError`` or a picows error when the node cannot be
    reached within ``timeout`` seconds (TCP connect plus WebSocket handshake). With
    ``ping_interval``, the node is pinged after that much silence and the connection
    dropped if it does not answer within the same time.
    """
    async with asyncio.timeout(timeout):
        transport, _ = await ws_connect(
            lambda: UpstreamListener(sink, max_message_bytes),
            url,
            ssl_context=ssl_context,
            websocket_handshake_timeout=timeout,
            logger_name=SILENT,
            enable_auto_pong=True,
            max_frame_size=max_message_bytes,
            read_buffer_init_size=READ_BUFFER_INIT,
            extra_headers={"User-Agent": USER_AGENT},
            max_redirects=0,
            enable_auto_ping=ping_interval is not None,
            auto_ping_idle_timeout=ping_interval or 30.0,
            auto_ping_reply_timeout=ping_interval or 30.0,
        )
    transport.underlying_transport.set_write_buffer_limits(
        high=write_buffer_bytes, low=write_buffer_bytes // 4
    )
    return transport
