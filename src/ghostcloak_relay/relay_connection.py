"""``WS /relay``: one client connection carrying many envelope sessions.

The connection decodes envelopes with :mod:`.protocol` and keeps this connection's
sessions, each with its own upstream connection (:class:`RelaySession`). Bad input never
closes the connection and never touches another session: it is answered with an
``error`` envelope. Only WebSocket protocol violations (invalid UTF-8, bad framing,
oversized messages) close the connection, with the RFC close code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import orjson
from mypy_extensions import mypyc_attr
from picows import WSCloseCode, WSMsgType

from . import protocol
from .connection import ClientConnection
from .protocol import EndReason, EnvelopeError, ErrorCode
from .session import UpstreamSession
from .sessions import Session, SessionExistsError

if TYPE_CHECKING:
    from .server import RelayServer

__all__ = ["RelayConnection", "RelaySession"]

log = logging.getLogger("ghostcloak_relay.relay")

# Final: constants, kept in C statics when compiled (no module-dict lookup per message)
_TEXT: Final = WSMsgType.TEXT
_PROXY_HEAD: Final = '{"type":"proxy","sessionId":"'
_SID_START: Final = len(_PROXY_HEAD)
_PAYLOAD_SEP: Final = '","payload":'
_PAYLOAD_AT: Final = len(_PAYLOAD_SEP)


class RelaySession(UpstreamSession):
    """An envelope session: node messages go out as ``proxy`` envelopes."""

    needs_json = True
    __slots__ = ("_prefix", "relay_conn")

    def __init__(self, conn: RelayConnection, core: Session) -> None:
        super().__init__(conn, core)
        self.relay_conn = conn
        self._prefix = protocol.proxy_prefix(core.session_id)

    def deliver(self, data: bytes, binary: bool) -> None:
        # data is exactly one JSON value (checked in on_upstream_message or made by us)
        conn = self.relay_conn
        if not conn.closing and conn.transport is not None:
            conn.transport.send(_TEXT, self._prefix + data + b"}")

    def opened(self) -> None:
        self.relay_conn.send(protocol.encode_session_started(self.session_id))

    def ended(self, reason: EndReason, notify: bool) -> None:
        self.relay_conn.forget(self)
        if notify:
            self.relay_conn.send(protocol.encode_session_ended(self.session_id, reason))

    def unavailable(self) -> None:
        conn = self.relay_conn
        conn.server.manager.discard(self.session_id)
        conn.forget(self)
        conn.send(protocol.encode_error(ErrorCode.UPSTREAM_UNAVAILABLE, self.session_id))


@mypyc_attr(native_class=False)  # a picows listener: see native.py
class RelayConnection(ClientConnection):
    """picows listener for one client connection on ``/relay``."""

    endpoint = "relay"

    def __init__(self, server: RelayServer) -> None:
        super().__init__(server)
        self.by_id: dict[str, RelaySession] = {}

    def sessions(self) -> Iterable[RelaySession]:
        return self.by_id.values()

    def on_text(self, text: str) -> None:
        # Fast path for the canonical form of a proxy envelope, which this project's client
        # and most encoders write: {"type":"proxy","sessionId":"<id>","payload":<P>}. When
        # <P> parses as exactly one JSON value the text is that envelope, and <P>'s own text
        # is what the node gets, unless the policy changes it: no envelope decode, no
        # re-encoding. Anything else takes the full decoder below.
        if text.startswith(_PROXY_HEAD) and text.endswith("}"):
            end = text.find('"', _SID_START)
            if end > 0 and text.startswith(_PAYLOAD_SEP, end):
                session = self.by_id.get(text[_SID_START:end])
                if session is not None:
                    raw = text[end + _PAYLOAD_AT : -1]
                    try:
                        payload = protocol.loads_request(raw)
                    except orjson.JSONDecodeError:
                        payload = None
                    if payload and isinstance(payload, dict | list):
                        error = session.from_client(payload, raw)
                        if error is not None:
                            self._refused(EnvelopeError(error, session.session_id))
                        return
        try:
            msg = protocol.decode_client_message(text)
            if isinstance(msg, protocol.Proxy):
                session = self.by_id.get(msg.session_id)
                if session is None:
                    raise EnvelopeError(ErrorCode.UNKNOWN_SESSION, msg.session_id)
                error = session.from_client(msg.payload, None)
                if error is not None:
                    raise EnvelopeError(error, msg.session_id)
            elif isinstance(msg, protocol.SessionStart):
                self._start(msg.session_id)
            else:
                session = self.by_id.get(msg.session_id)
                if session is None:
                    raise EnvelopeError(ErrorCode.UNKNOWN_SESSION, msg.session_id)
                session.end(EndReason.CLIENT)
        except EnvelopeError as exc:
            self._refused(exc)

    def _refused(self, exc: EnvelopeError) -> None:
        log.debug("client message refused: %s", exc.code.value)
        self.server.stats.refused[exc.code.value] += 1
        self.send(protocol.encode_error(exc.code, exc.session_id))

    def on_binary(self, data: bytes) -> None:
        self.server.stats.refused[ErrorCode.BINARY_NOT_SUPPORTED.value] += 1
        self.send(protocol.encode_error(ErrorCode.BINARY_NOT_SUPPORTED))

    def _start(self, requested: str | None) -> None:
        server = self.server
        if server.draining:
            raise EnvelopeError(ErrorCode.SHUTTING_DOWN, requested)
        if len(self.by_id) >= server.settings.max_sessions_per_connection:
            raise EnvelopeError(ErrorCode.TOO_MANY_SESSIONS, requested)
        if server.manager.active_count() >= server.settings.max_sessions:
            raise EnvelopeError(ErrorCode.SERVER_FULL, requested)
        session_id = requested if requested is not None else protocol.new_session_id()
        try:
            core = server.manager.start(session_id, owner=self)
        except SessionExistsError:
            raise EnvelopeError(ErrorCode.SESSION_EXISTS, requested) from None
        session = RelaySession(self, core)
        self.by_id[session_id] = session
        session.begin()

    def forget(self, session: RelaySession) -> None:
        if self.by_id.get(session.session_id) is session:
            del self.by_id[session.session_id]

    def close(self, code: WSCloseCode, reason: EndReason) -> None:
        """End every session (telling the client ``reason`` unless it is the one closing)
        and close the connection with ``code``."""
        if self.closing:
            return
        for session in list(self.by_id.values()):
            session.end(reason, notify=reason is not EndReason.CLIENT)
        self.close_transport(code)
