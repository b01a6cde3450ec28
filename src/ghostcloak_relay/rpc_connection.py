"""``WS /rpc``: plain JSON-RPC through the relay, one client connection = one session.

Stock Substrate clients (polkadot.js ``WsProvider``, ``substrate-interface``, the
Midnight wallet SDK) work by changing only the URL. Each client connection gets its own
fresh upstream connection; frames go both ways unchanged, except where the method
policy answers a refused call itself (the node never sees it) and where the answer to
``rpc_methods`` is filtered. With ``RELAY_RPC_METHODS=off`` nothing is parsed at all:
text and binary messages pass as they are (the conformance-test mode).

Close codes (``docs/protocol.md``): the client's close code goes to the node and the
node's 1000/1001 to the client as 1000; the relay closes with 1014 (bad gateway) when
the node is unreachable or fails, 1001 on shutdown, expiry and idleness, 1013 when a
limit is reached, 1007/1002/1009 for protocol violations. The close reason is the
``session_ended`` reason of ``/relay`` (or the limit's name).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import orjson
from mypy_extensions import mypyc_attr
from picows import WSCloseCode, WSMsgType

from . import protocol
from .connection import ClientConnection
from .frames import FrameError
from .protocol import EndReason
from .rpc import PARSE_ERROR, error_response
from .session import UpstreamSession
from .sessions import Session

if TYPE_CHECKING:
    from .server import RelayServer

__all__ = ["CLOSE_CODES", "PlainSession", "RpcConnection"]

_TEXT: Final = WSMsgType.TEXT  # Final: C statics when compiled
_BINARY: Final = WSMsgType.BINARY

#: Close code the relay uses for each way a session can end (the reason is the text).
CLOSE_CODES: dict[EndReason, WSCloseCode] = {
    EndReason.CLIENT: WSCloseCode.OK,
    EndReason.UPSTREAM_CLOSED: WSCloseCode.OK,
    EndReason.UPSTREAM_ERROR: WSCloseCode.BAD_GATEWAY,
    EndReason.EXPIRED: WSCloseCode.GOING_AWAY,
    EndReason.IDLE: WSCloseCode.GOING_AWAY,
    EndReason.SHUTDOWN: WSCloseCode.GOING_AWAY,
}


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


class PlainSession(UpstreamSession):
    """The one session of an ``/rpc`` connection."""

    __slots__ = ("client_code", "rpc_conn")

    def __init__(self, conn: RpcConnection, core: Session) -> None:
        super().__init__(conn, core)
        self.rpc_conn = conn
        self.client_code: WSCloseCode | None = None  # the client's own close code

    def from_client_message(self, data: str | bytes, opcode: WSMsgType = _TEXT) -> None:
        """A whole message from the client. Whole text frames come here straight from the
        frame gate (``RpcConnection.whole_text``): as bytes with the method policy on,
        parsed as they are and forwarded as they came."""
        conn = self.rpc_conn
        if self.rpc is None:  # policy off: untouched
            error = self.to_node(opcode, data)
        else:
            try:
                msg = protocol.loads_request(data)
            except orjson.JSONDecodeError:
                # text not yet checked for UTF-8 (text_as_bytes) that does not parse may be
                # invalid UTF-8: close 1007 as for any text message; else a parse error
                if opcode is _TEXT and isinstance(data, bytes) and not _is_utf8(data):
                    conn.fail(FrameError(1007, "invalid UTF-8"))
                    return
                self.reply(error_response(None, PARSE_ERROR))
                return
            error = self.from_client(msg, data, opcode)
        if error is not None:  # the queue before the node's connection opened is full
            conn.close_transport(WSCloseCode.TRY_AGAIN_LATER, b"queue_full")
            self.end(EndReason.CLIENT)

    def deliver(self, data: bytes, binary: bool) -> None:
        conn = self.rpc_conn
        if not conn.closing and conn.transport is not None:
            conn.transport.send(_BINARY if binary else _TEXT, data)

    def ended(self, reason: EndReason, notify: bool) -> None:
        if reason is EndReason.CLIENT:
            code = self.client_code or WSCloseCode.OK
            self.rpc_conn.close_transport(code)
        else:
            self.rpc_conn.close_transport(CLOSE_CODES[reason], reason.value.encode())

    def unavailable(self) -> None:
        self.rpc_conn.server.manager.discard(self.session_id)
        self.rpc_conn.close_transport(WSCloseCode.BAD_GATEWAY, b"upstream_unavailable")

    def upstream_close_code(self, reason: EndReason) -> WSCloseCode:
        # the client's close code is the node's business too (RFC 6455 7.4)
        return self.client_code or WSCloseCode.OK


@mypyc_attr(native_class=False)  # a picows listener: see native.py
class RpcConnection(ClientConnection):
    """picows listener for one ``/rpc`` client."""

    endpoint = "rpc"

    def __init__(self, server: RelayServer) -> None:
        super().__init__(server)
        self.session: PlainSession | None = None

    def sessions(self) -> Iterable[PlainSession]:
        return () if self.session is None else (self.session,)

    def opened(self) -> None:
        server = self.server
        if server.draining:
            self.refuse(WSCloseCode.GOING_AWAY, "shutdown")
            return
        if server.manager.active_count() >= server.settings.max_sessions:
            server.stats.refused["relay_full"] += 1
            self.refuse(WSCloseCode.TRY_AGAIN_LATER, "relay_full")
            return
        core = server.manager.start(protocol.new_session_id(), owner=self)
        self.session = session = PlainSession(self, core)
        # whole text frames straight to the session; undecoded when it parses them as JSON
        self.whole_text = session.from_client_message
        self.text_as_bytes = session.rpc is not None
        session.begin()

    def on_text(self, text: str) -> None:
        if self.session is not None:
            self.session.from_client_message(text, _TEXT)

    def on_binary(self, data: bytes) -> None:
        if self.session is not None:
            self.session.from_client_message(data, _BINARY)

    def on_close_frame(self, code: WSCloseCode) -> None:
        if self.session is not None:
            self.session.client_code = code
        self.close(code, EndReason.CLIENT)

    def close(self, code: WSCloseCode, reason: EndReason) -> None:
        """Close the client with ``code``, then end the session (the node gets 1000 unless
        the client itself sent a CLOSE, whose code it then gets: see on_close_frame)."""
        self.close_transport(
            code if reason is EndReason.CLIENT else CLOSE_CODES[reason],
            b"" if reason is EndReason.CLIENT else reason.value.encode(),
        )
        if self.session is not None:
            self.session.end(reason)
