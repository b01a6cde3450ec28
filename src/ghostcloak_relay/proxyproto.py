"""The PROXY protocol (HAProxy, v1 text and v2 binary): the client address behind a proxy.

Behind a load balancer every connection comes from the balancer, so per-client limits
(``RELAY_MAX_CONNECTIONS_PER_CLIENT``, ``RELAY_RATE_LIMIT_PER_CLIENT``) would see one
client. With ``RELAY_PROXY_PROTOCOL=on`` the balancer (``send-proxy`` / ``send-proxy-v2``
in HAProxy) prefixes each connection with the real source address, which the relay uses
for those limits only: held as a keyed hash, never logged, never forwarded. Every
connection must then start with a header; one without is closed, so nobody can skip the
balancer's accounting. :func:`parse` is pure; :class:`ProxyHeaderShim` is the asyncio edge
that reads the header and hands the connection to picows.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Callable
from typing import Any, Final

__all__ = ["MAX_HEADER", "ProxyHeaderError", "ProxyHeaderShim", "parse"]

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_HEADER: Final = 16 + 216  # v2 with the largest address block; v1 is at most 107
HEADER_TIMEOUT: Final = 5.0


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header."""


def parse(data: bytes) -> tuple[str | None, int] | None:
    """``(source address or None for LOCAL/UNKNOWN, header length)``, or None if ``data``
    is a valid beginning that needs more bytes; raise :class:`ProxyHeaderError` otherwise."""
    if data.startswith(b"PROXY "):
        end = data.find(b"\r\n", 0, 108)
        if end < 0:
            if len(data) >= 108:
                raise ProxyHeaderError("v1 header too long")
            return None
        parts = data[:end].split(b" ")
        if parts[1:2] == [b"UNKNOWN"]:
            return None, end + 2
        if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
            raise ProxyHeaderError("bad v1 header")
        try:
            source = ipaddress.ip_address(parts[2].decode("ascii"))
        except ValueError:
            raise ProxyHeaderError("bad v1 address") from None
        return str(source), end + 2
    if len(data) < 16:
        if V2_SIGNATURE.startswith(data[:12]) or b"PROXY ".startswith(data[:6]):
            return None
        raise ProxyHeaderError("no PROXY header")
    if not data.startswith(V2_SIGNATURE):
        raise ProxyHeaderError("no PROXY header")
    version_command, family, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError("bad v2 version")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    if version_command & 0x0F == 0:  # LOCAL: the balancer's own connection (health check)
        return None, total
    if family >> 4 == 1 and length >= 12:  # AF_INET
        return str(ipaddress.IPv4Address(data[16:20])), total
    if family >> 4 == 2 and length >= 36:  # AF_INET6
        return str(ipaddress.IPv6Address(data[16:32])), total
    return None, total  # AF_UNSPEC / AF_UNIX: no address to key on


class ProxyHeaderShim(asyncio.Protocol):
    """Reads the PROXY header, then gives the connection to the WebSocket protocol."""

    def __init__(
        self, make_protocol: Callable[[], Any], record: Callable[[Any, str | None], None]
    ) -> None:
        self._make = make_protocol
        self._record = record
        self._data = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, transport.abort)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        self._data += data
        try:
            result = parse(self._data)
        except ProxyHeaderError:
            self._done()
            transport.abort()
            return
        if result is None:
            if len(self._data) > MAX_HEADER:
                self._done()
                transport.abort()
            return
        source, length = result
        self._done()
        rest, self._data = self._data[length:], b""
        self._record(transport, source)
        protocol = self._make()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        while rest:  # what came after the header is the WebSocket handshake
            buffer = protocol.get_buffer(len(rest))
            n = min(len(buffer), len(rest))
            buffer[:n] = rest[:n]
            protocol.buffer_updated(n)
            rest = rest[n:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._done()

    def _done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
