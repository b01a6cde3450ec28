"""The envelope protocol of ``WS /relay``: decode client messages, encode relay messages.

Pure functions and small event classes, no I/O (the sans-I/O style of ``h11`` and
``websockets``): the connection handler feeds complete text messages in and writes the
bytes that come out. ``docs/protocol.md`` is the reference for every message, field and
error code; the tables here and there must agree.

Invariants:

* A decoded :class:`Proxy` always carries a JSON object or array (a JSON-RPC request or
  batch), already parsed: the policy layer inspects it, the upstream gets it re-encoded.
* Relay-to-client envelopes are built from pre-validated parts only. A node message is
  spliced in as the ``payload`` value *after* it has been parsed as exactly one JSON
  value, so a node cannot add or override envelope fields.
* Error envelopes carry a stable ``code`` and a fixed human ``message``; never exception
  text, addresses or client data. ``sessionId`` is echoed only when it is well-formed.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import orjson

__all__ = [
    "SESSION_ID_PATTERN",
    "EndReason",
    "EnvelopeError",
    "ErrorCode",
    "Proxy",
    "SessionEnd",
    "SessionStart",
    "decode_client_message",
    "dumps_exact",
    "encode_error",
    "encode_session_ended",
    "encode_session_started",
    "exact_id",
    "is_valid_session_id",
    "loads_exact",
    "loads_request",
    "new_session_id",
    "proxy_prefix",
]

#: Client-chosen session ids: 8 to 128 characters of ``A-Z a-z 0-9 _ - . :`` (UUIDs fit).
SESSION_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:\-]{8,128}")


class ErrorCode(StrEnum):
    """Stable ``code`` values of ``error`` envelopes."""

    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    BAD_SESSION_ID = "bad_session_id"
    UNKNOWN_SESSION = "unknown_session"
    SESSION_EXISTS = "session_exists"
    TOO_MANY_SESSIONS = "too_many_sessions"
    SERVER_FULL = "relay_full"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    QUEUE_FULL = "queue_full"
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    SHUTTING_DOWN = "shutting_down"


#: The fixed human message of each code. Never formatted with runtime data.
ERROR_MESSAGES: Final[dict[ErrorCode, str]] = {
    ErrorCode.BAD_JSON: "message is not valid JSON",
    ErrorCode.BAD_MESSAGE: "message is not a valid envelope",
    ErrorCode.UNKNOWN_TYPE: "unknown message type",
    ErrorCode.BAD_SESSION_ID: "sessionId is missing or malformed (8-128 of A-Z a-z 0-9 _ - . :)",
    ErrorCode.UNKNOWN_SESSION: "no such session on this connection",
    ErrorCode.SESSION_EXISTS: "a session with this sessionId already exists",
    ErrorCode.TOO_MANY_SESSIONS: "too many sessions on this connection",
    ErrorCode.SERVER_FULL: "the relay has no room for more sessions, try again later",
    ErrorCode.UPSTREAM_UNAVAILABLE: "the node is unavailable, try again later",
    ErrorCode.QUEUE_FULL: "too many messages queued before the session started",
    ErrorCode.BINARY_NOT_SUPPORTED: "binary frames are not supported, send text",
    ErrorCode.SHUTTING_DOWN: "the relay is shutting down",
}


class EndReason(StrEnum):
    """``reason`` of ``session_ended``."""

    CLIENT = "client"
    UPSTREAM_CLOSED = "upstream_closed"
    UPSTREAM_ERROR = "upstream_error"
    EXPIRED = "expired"
    IDLE = "idle"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class SessionStart:
    """``session_start``; ``session_id`` is None when the relay must make one."""

    session_id: str | None


@dataclass(frozen=True, slots=True)
class Proxy:
    """``proxy``: a JSON-RPC request (dict) or batch (list) for the session's node."""

    session_id: str
    payload: dict[str, Any] | list[Any]


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """``session_end``."""

    session_id: str


ClientMessage = SessionStart | Proxy | SessionEnd


class EnvelopeError(Exception):
    """A client message that cannot be acted on; becomes an ``error`` envelope."""

    def __init__(self, code: ErrorCode, session_id: str | None = None) -> None:
        super().__init__(code.value)
        self.code = code
        self.session_id = session_id


def is_valid_session_id(value: object) -> bool:
    return isinstance(value, str) and SESSION_ID_PATTERN.fullmatch(value) is not None


def new_session_id() -> str:
    """A relay-generated id: 128 random bits as 32 hex characters."""
    return secrets.token_hex(16)


#: ``orjson.loads`` bound once: a C static when compiled, not a module lookup per message
json_loads: Final = orjson.loads

#: A JSON number of 19 or more digits: possibly beyond 64 bits, where orjson gives a float.
_BIG_INT: Final = re.compile(rb"[:\[,]\s*-?\d{19}")
_BIG_INT_TEXT: Final = re.compile(r"[:\[,]\s*-?\d{19}")


def loads_exact(data: bytes | str) -> Any:
    """Parse JSON like ``orjson.loads``, but keep integers beyond 64 bits exact.

    orjson turns such integers into floats, so re-encoding a request would change its id
    or parameters. They are rare in JSON-RPC; when a cheap scan finds one, the standard
    library parser (exact integers) is used instead. Raises ``orjson.JSONDecodeError``.
    """
    obj = json_loads(data)
    big = _BIG_INT_TEXT.search(data) if isinstance(data, str) else _BIG_INT.search(data)
    if big is not None:
        obj = json.loads(data)
    return obj


def loads_request(data: bytes | str) -> Any:
    """Parse a client's JSON-RPC message for the hot path.

    A single request is forwarded as its original text, so only its id can suffer from
    orjson's float for integers beyond 64 bits, and only when the relay answers it itself
    (:func:`exact_id`); a batch may be re-encoded, so it is parsed exactly.
    """
    if data[:1] in ("[", b"["):
        return loads_exact(data)
    return json_loads(data)


def exact_id(raw: bytes | str, parsed_id: Any) -> Any:
    """The request id as the client wrote it (``parsed_id`` may be a rounded float)."""
    if isinstance(parsed_id, float) and (
        _BIG_INT_TEXT.search(raw) if isinstance(raw, str) else _BIG_INT.search(raw)
    ):
        exact = json.loads(raw)
        if isinstance(exact, dict):
            return exact.get("id")
    return parsed_id


def dumps_exact(obj: Any) -> bytes:
    """``orjson.dumps``, falling back to the standard library for integers beyond 64 bits
    (kept exact by :func:`loads_exact`), so such a request is forwarded unchanged."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def decode_client_message(data: bytes | str) -> ClientMessage:
    """Decode one complete text message from a client, or raise :class:`EnvelopeError`."""
    try:
        obj = loads_exact(data)
    except orjson.JSONDecodeError:
        raise EnvelopeError(ErrorCode.BAD_JSON) from None
    if not isinstance(obj, dict):
        raise EnvelopeError(ErrorCode.BAD_MESSAGE)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise EnvelopeError(ErrorCode.BAD_MESSAGE)
    if kind not in ("proxy", "session_start", "session_end"):
        raise EnvelopeError(ErrorCode.UNKNOWN_TYPE)
    sid = obj.get("sessionId")
    if kind == "session_start" and sid is None:
        return SessionStart(None)
    if not is_valid_session_id(sid):
        raise EnvelopeError(ErrorCode.BAD_SESSION_ID)
    assert isinstance(sid, str)
    if kind == "proxy":
        payload = obj.get("payload")
        if not isinstance(payload, dict | list) or not payload:
            raise EnvelopeError(ErrorCode.BAD_MESSAGE, sid)
        return Proxy(sid, payload)
    if kind == "session_start":
        return SessionStart(sid)
    return SessionEnd(sid)


def encode_session_started(session_id: str) -> bytes:
    return orjson.dumps({"type": "session_started", "sessionId": session_id})


def encode_session_ended(session_id: str, reason: EndReason) -> bytes:
    return orjson.dumps({"type": "session_ended", "sessionId": session_id, "reason": reason})


def encode_error(code: ErrorCode, session_id: str | None = None) -> bytes:
    msg: dict[str, str] = {"type": "error", "code": code, "message": ERROR_MESSAGES[code]}
    if session_id is not None and is_valid_session_id(session_id):
        msg["sessionId"] = session_id
    return orjson.dumps(msg)


def proxy_prefix(session_id: str) -> bytes:
    """The constant head of this session's ``proxy`` envelopes.

    ``proxy_prefix(s) + payload + b"}"`` is a complete envelope when ``payload`` is one
    validated JSON value; built once per session so the hot path only concatenates.
    """
    return b'{"type":"proxy","sessionId":' + orjson.dumps(session_id) + b',"payload":'
