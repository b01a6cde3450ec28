"""Raw WebSocket for tests: frames and a handshake that no client library will misuse.

Tests that must send what a library refuses to (reserved bits, a data frame inside a
fragmented message, a client that never reads) build frames here and read the relay's
unmasked server frames themselves.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """One masked client frame (RFC 6455 5.2); ``rsv`` is the 3 reserved bits (4: RSV1)."""
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


def upgrade_request(port: int, path: str) -> bytes:
    """A WebSocket upgrade request for ``path`` on 127.0.0.1:``port``."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def handshake(
    port: int, path: str, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Connect and send the upgrade; the streams and the response head (not checked)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(upgrade_request(port, path))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except BaseException:
        writer.close()
        raise
    return reader, writer, head


async def read_frame(reader: asyncio.StreamReader, timeout: float) -> tuple[int, bool, bytes]:
    """The next server frame (unmasked): opcode, fin, payload."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), timeout)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), timeout))
    elif n == 127:
        (n,) = struct.unpack("!Q", await asyncio.wait_for(reader.readexactly(8), timeout))
    payload = await asyncio.wait_for(reader.readexactly(n), timeout)
    return b0 & 0x0F, bool(b0 & 0x80), payload
