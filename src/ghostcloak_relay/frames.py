"""WebSocket message assembly (RFC 6455 section 5.4, 5.6, 8.1), without I/O.

picows hands over frames, not messages. :class:`MessageAssembler` turns a stream of data
frames into complete messages: it joins fragments, bounds the total size, and validates
the UTF-8 of text messages incrementally, so an invalid fragment fails at once rather
than after the whole message (Autobahn's "fail fast" cases). Violations raise
:class:`FrameError` carrying the close code to send (1002 protocol error, 1007 invalid
text, 1009 too big). :func:`close_reply_code` picks the code that answers a peer's CLOSE
(RFC 6455 section 5.5.1, 7.4).

Memory bound: at most ``max_size`` bytes of payload per assembler, plus one frame.
"""

from __future__ import annotations

import codecs
from typing import Final

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_TEXT",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "OP_BINARY",
    "OP_CONTINUATION",
    "OP_TEXT",
    "FrameError",
    "MessageAssembler",
    "close_code_is_valid",
    "close_reply_code",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INVALID_TEXT: Final = 1007
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN_LATER: Final = 1013


class FrameError(Exception):
    """A protocol violation; the connection must be closed with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def close_code_is_valid(code: int) -> bool:
    """May a peer send ``code`` in a CLOSE frame? (RFC 6455 section 7.4.1, 7.4.2)

    Yes for the defined codes 1000-1003 and 1007-1011, the IANA-registered 1012-1014, and
    the application range 3000-4999. No for everything else: below 1000, the reserved
    1004, 1005 (no status), 1006 (abnormal closure) and 1015 (TLS failure), which must
    never be sent, the unassigned 1016-2999 and anything from 5000 up.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def close_reply_code(payload_size: int, code: int) -> int:
    """The code to answer a peer's CLOSE with: its own code, echoed (RFC 6455 5.5.1).

    ``payload_size`` is the CLOSE frame's payload length and ``code`` the status code in
    it (picows reports both "no payload" and an explicit 0 as ``NO_INFO`` = 0, so the size
    tells them apart). A CLOSE without a status code is answered with 1000; a code no
    endpoint may send (:func:`close_code_is_valid`) raises :class:`FrameError` 1002, so a
    relay never puts 0, 1005, 1006 or 5000+ on the wire by echoing it.
    """
    if payload_size == 0:
        return CLOSE_NORMAL
    if not close_code_is_valid(code):
        raise FrameError(CLOSE_PROTOCOL_ERROR, "invalid close code")
    return code


_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class MessageAssembler:
    """Reassemble fragmented data frames into messages (``str`` text, ``bytes`` binary)."""

    __slots__ = ("_binary", "_decoder", "_opcode", "_size", "_text", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._opcode: int | None = None  # opcode of the message in progress
        self._text: list[str] = []
        self._binary: list[bytes] = []
        self._decoder: codecs.IncrementalDecoder | None = None
        self._size = 0

    @property
    def in_progress(self) -> bool:
        return self._opcode is not None

    def feed(self, opcode: int, fin: int, payload: bytes) -> str | bytes | None:
        """Take one data frame; return the message it completes, else None.

        ``fin``: nonzero for the last frame of a message (picows gives an int)."""
        if opcode == OP_CONTINUATION:
            if self._opcode is None:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._opcode is not None:
                self._reset()
                raise FrameError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            if fin:
                return self._single(opcode, payload)
            self._opcode = opcode
            self._size = 0
            self._decoder = _utf8_decoder() if opcode == OP_TEXT else None
        else:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "not a data frame")
        self._size += len(payload)
        if self._size > self.max_size:
            self._reset()
            raise FrameError(CLOSE_MESSAGE_TOO_BIG, "message too big")
        if self._decoder is not None:
            try:
                text = self._decoder.decode(payload, bool(fin))
            except UnicodeDecodeError:
                self._reset()
                raise FrameError(CLOSE_INVALID_TEXT, "invalid UTF-8 in text message") from None
            self._text.append(text)
        else:
            self._binary.append(payload)
        if not fin:
            return None
        message: str | bytes
        message = "".join(self._text) if self._opcode == OP_TEXT else b"".join(self._binary)
        self._reset()
        return message

    def _single(self, opcode: int, payload: bytes) -> str | bytes:
        if len(payload) > self.max_size:
            raise FrameError(CLOSE_MESSAGE_TOO_BIG, "message too big")
        if opcode == OP_BINARY:
            return payload
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(CLOSE_INVALID_TEXT, "invalid UTF-8 in text message") from None

    def _reset(self) -> None:
        self._opcode = None
        self._text = []
        self._binary = []
        self._decoder = None
        self._size = 0
