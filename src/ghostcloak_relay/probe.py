"""Node health probes: ``system_health`` and the best block number, on a fresh connection.

A probe is a session of its own as far as the node can tell: a new connection from the
relay with the same generic handshake as every session (:mod:`.upstream`), two requests,
then close. It carries nothing of any client.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import orjson
from picows import WSCloseCode, WSMsgType, WSTransport

from .upstream import connect

__all__ = ["ProbeError", "probe_node"]


class ProbeError(Exception):
    """The node answered, but not like a healthy Substrate node."""


class _Collector:
    """UpstreamSink that keeps the answers to the probe's requests."""

    def __init__(self) -> None:
        self.answers: dict[int, Any] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_upstream_open(self, transport: WSTransport) -> None:
        pass

    def on_upstream_message(self, data: bytes, binary: bool = False) -> None:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(msg, dict) and msg.get("id") in (1, 2):
            self.answers[msg["id"]] = msg
            if len(self.answers) == 2 and not self.done.done():
                self.done.set_result(None)

    def on_upstream_closed(self, clean: bool) -> None:
        if not self.done.done():
            self.done.set_exception(ProbeError("closed"))

    def on_upstream_pause(self, stuck: bool) -> None:
        pass


async def probe_node(url: str, *, timeout: float, ssl_context: ssl.SSLContext | None) -> int:
    """Return the node's best block number, or raise if it is not healthy."""
    sink = _Collector()
    async with asyncio.timeout(timeout):
        transport = await connect(
            url, sink, timeout=timeout, max_message_bytes=1 << 20, ssl_context=ssl_context
        )
        try:
            transport.send(WSMsgType.TEXT, b'{"jsonrpc":"2.0","id":1,"method":"system_health"}')
            transport.send(WSMsgType.TEXT, b'{"jsonrpc":"2.0","id":2,"method":"chain_getHeader"}')
            await sink.done
        finally:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
    health = sink.answers[1].get("result")
    header = sink.answers[2].get("result")
    if not isinstance(health, dict) or not isinstance(header, dict):
        raise ProbeError("unexpected answer")
    if health.get("isSyncing") is True:
        raise ProbeError("syncing")
    number = header.get("number")
    if isinstance(number, str):
        return int(number, 16)
    if isinstance(number, int):
        return number
    raise ProbeError("no block number")
