"""The frame gate (``frame_gate.py``/``.pyx``): the shortcut for whole text frames must
route exactly as the listeners' full frame handling does, on every endpoint and both legs.

The compiled build (CI) takes the Cython gate's shortcut (test_native.py checks that it is
the one in use); the plain Python relay sends every frame through ``on_frame`` (CI runs
this file that way too). These tests speak raw frames over real sockets, so they
can send what no client library will: a whole text frame inside a fragmented message,
reserved bits, control frames between fragments.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection

from ghostcloak_relay.policy import OFF_POLICY
from ghostcloak_relay.server import RelayServer

from .conftest import TIMEOUT, RelayFactory, ScriptedUpstream, UpstreamConn, eventually
from .rawws import frame, handshake, read_frame

TEXT, BINARY, CONTINUATION, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9
SID = "gate-session-1"


class RawClient:
    """A WebSocket client over a plain TCP stream: writes any frame, reads server frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, relay: RelayServer, path: str) -> RawClient:
        reader, writer, head = await handshake(relay.port, path, TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))  # in one write: the relay may read them at once
        await self.writer.drain()

    async def read_frame(self) -> tuple[int, bytes]:
        """The next whole message (opcode, payload); server frames are unmasked."""
        opcode, message = None, b""
        while True:
            this, fin, payload = await read_frame(self.reader, TIMEOUT)
            if this in (PING, 0xA):
                continue
            opcode = opcode if this == CONTINUATION else this
            message += payload
            if fin:
                return opcode, message

    async def read_json(self) -> Any:
        opcode, payload = await self.read_frame()
        assert opcode in (TEXT, BINARY), (opcode, payload)  # /rpc keeps the node's opcode
        return orjson.loads(payload)

    async def close_code(self) -> int:
        """Read until the relay's CLOSE frame; its code."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == CLOSE:
                code: int = struct.unpack("!H", payload[:2])[0]
                return code

    def abort(self) -> None:
        self.writer.close()


def request(req_id: int, method: str = "system_chain") -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": []})


def envelope(payload: bytes) -> bytes:
    return b'{"type":"proxy","sessionId":"' + SID.encode() + b'","payload":' + payload + b"}"


class Endpoint:
    """One way into the relay: ``/rpc`` with the method policy on or off, or ``/relay``."""

    def __init__(self, name: str, path: str, wrap: bool, **settings: Any) -> None:
        self.name, self.path, self.wrap, self.settings = name, path, wrap, settings

    def message(self, req_id: int) -> bytes:
        return envelope(request(req_id)) if self.wrap else request(req_id)

    async def open(self, relay: RelayServer) -> RawClient:
        client = await RawClient.open(relay, self.path)
        if self.wrap:
            start = {"type": "session_start", "sessionId": SID}
            await client.send(frame(TEXT, orjson.dumps(start)))
            started = await client.read_json()
            assert started == {"type": "session_started", "sessionId": SID}, started
        return client

    async def answer_id(self, client: RawClient) -> Any:
        msg = await client.read_json()
        if self.wrap:
            assert msg["type"] == "proxy", msg
            msg = msg["payload"]
        assert msg["result"] == "ok:system_chain", msg
        return msg["id"]


ENDPOINTS = [
    Endpoint("rpc", "/rpc", False),
    Endpoint("rpc-policy-off", "/rpc", False, rpc_methods=OFF_POLICY),
    Endpoint("relay", "/relay", True),
]


@pytest.fixture(params=ENDPOINTS, ids=lambda e: e.name)
async def gated(
    request: pytest.FixtureRequest, relay_factory: RelayFactory, upstream: ScriptedUpstream
) -> AsyncIterator[tuple[Endpoint, RelayServer, RawClient]]:
    endpoint: Endpoint = request.param
    relay = await relay_factory(node=(upstream.url,), **endpoint.settings)
    client = await endpoint.open(relay)
    try:
        yield endpoint, relay, client
    finally:
        client.abort()


async def test_fast_path_resumes_after_a_fragmented_message_with_a_ping_inside(
    gated: tuple[Endpoint, RelayServer, RawClient], upstream: ScriptedUpstream
) -> None:
    endpoint, _, client = gated
    one, two = endpoint.message(1), endpoint.message(2)
    await client.send(
        frame(TEXT, one[:7], fin=False),
        frame(PING, b"between"),
        frame(CONTINUATION, one[7:20], fin=False),
        frame(CONTINUATION, one[20:]),
        frame(TEXT, two),  # whole: the fast path again, after the fragmented message
    )
    assert await endpoint.answer_id(client) == 1
    assert await endpoint.answer_id(client) == 2
    await eventually(lambda: len(upstream.conns) == 1 and len(upstream.conns[0].received) == 2)
    assert [orjson.loads(m)["id"] for m in upstream.conns[0].received] == [1, 2]


async def test_a_whole_text_frame_inside_a_fragmented_message_is_1002(
    gated: tuple[Endpoint, RelayServer, RawClient], upstream: ScriptedUpstream
) -> None:
    endpoint, relay, client = gated
    assert await _round_trip(endpoint, client, 1)
    whole = endpoint.message(2)
    await client.send(frame(TEXT, whole[:5], fin=False), frame(TEXT, whole))
    assert await client.close_code() == 1002
    await eventually(lambda: relay.manager.active_count() == 0)
    assert len(upstream.conns[0].received) == 1  # neither message reached the node


def _reserved_bits(message: bytes) -> bytes:
    return frame(TEXT, message, rsv=4)


def _invalid_utf8(message: bytes) -> bytes:
    return frame(TEXT, message.replace(b"system_chain", b"system_\xffhain"))


@pytest.mark.parametrize(
    ("bad", "code"), [(_reserved_bits, 1002), (_invalid_utf8, 1007)], ids=["rsv", "utf8"]
)
async def test_a_refused_whole_text_frame_closes_and_never_reaches_the_node(
    gated: tuple[Endpoint, RelayServer, RawClient],
    upstream: ScriptedUpstream,
    bad: Callable[[bytes], bytes],
    code: int,
) -> None:
    """Reserved bits (1002) and invalid UTF-8 (1007) on a whole text frame."""
    endpoint, relay, client = gated
    assert await _round_trip(endpoint, client, 1)
    await client.send(bad(endpoint.message(2)))
    assert await client.close_code() == code
    await eventually(lambda: relay.manager.active_count() == 0)
    assert len(upstream.conns[0].received) == 1


async def test_frames_after_the_relay_closed_are_not_acted_on(
    gated: tuple[Endpoint, RelayServer, RawClient], upstream: ScriptedUpstream
) -> None:
    """After refusing a frame the relay has sent CLOSE; whole text frames read in the
    same batch must not take the shortcut to the node."""
    endpoint, relay, client = gated
    assert await _round_trip(endpoint, client, 1)
    await client.send(frame(TEXT, endpoint.message(2), rsv=4), frame(TEXT, endpoint.message(3)))
    assert await client.close_code() == 1002
    await eventually(lambda: relay.manager.active_count() == 0)
    await asyncio.sleep(0.1)  # give a wrongly forwarded message time to arrive
    assert len(upstream.conns[0].received) == 1


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
async def test_frames_after_an_oversized_frame_are_not_acted_on(
    endpoint: Endpoint, relay_factory: RelayFactory, upstream: ScriptedUpstream
) -> None:
    """picows refuses a frame over the limit itself (CLOSE 1009) and goes on delivering
    the frames read with it: none of them may reach the node."""
    relay = await relay_factory(node=(upstream.url,), max_message_bytes=1024, **endpoint.settings)
    client = await endpoint.open(relay)
    try:
        assert await _round_trip(endpoint, client, 1)
        big = endpoint.message(2).replace(b"[]", b'["' + b"x" * 2000 + b'"]')
        await client.send(frame(TEXT, big), frame(TEXT, endpoint.message(3)))
        assert await client.close_code() == 1009
        await eventually(lambda: relay.manager.active_count() == 0)
        await asyncio.sleep(0.1)  # give a wrongly forwarded message time to arrive
        assert len(upstream.conns[0].received) == 1
    finally:
        client.abort()


async def test_node_answers_fragmented_and_whole_arrive_in_order(
    gated: tuple[Endpoint, RelayServer, RawClient], upstream: ScriptedUpstream
) -> None:
    """The upstream leg's gate: a fragmented answer (slow path) then whole answers (fast
    path) from the node reach the client whole and in the node's order."""
    endpoint, _, client = gated

    async def fragmenting(conn: UpstreamConn, msg: Any) -> None:
        ws: ServerConnection = conn.ws
        answer = orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": "ok:system_chain"})
        if msg["id"] % 2:
            await ws.send([answer[:9].decode(), answer[9:30].decode(), answer[30:].decode()])
        else:
            await ws.send(answer.decode())

    upstream.handler = fragmenting
    await client.send(*(frame(TEXT, endpoint.message(i)) for i in range(1, 7)))
    assert [await endpoint.answer_id(client) for _ in range(6)] == [1, 2, 3, 4, 5, 6]


async def _round_trip(endpoint: Endpoint, client: RawClient, req_id: int) -> bool:
    await client.send(frame(TEXT, endpoint.message(req_id)))
    return bool(await endpoint.answer_id(client) == req_id)
