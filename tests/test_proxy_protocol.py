"""RELAY_PROXY_PROTOCOL: the client address a load balancer passes on keys the per-client
limits, is never logged, and a connection without a header is refused."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from ghostcloak_relay.config import ConfigError, load_settings
from ghostcloak_relay.devnode import DevNode
from ghostcloak_relay.proxyproto import V2_SIGNATURE, ProxyHeaderError, parse

from .conftest import TIMEOUT, Client, RelayFactory, relay_url


def v1(source: str) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} 10.0.0.1 55555 443\r\n".encode()


def v2(source: str) -> bytes:
    addr = ipaddress.ip_address(source)
    if addr.version == 4:
        block = addr.packed + bytes(4) + struct.pack("!HH", 55555, 443)
        family = 0x11
    else:
        block = addr.packed + bytes(16) + struct.pack("!HH", 55555, 443)
        family = 0x21
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(block)) + block


def test_parse_v1_v2_and_refusals() -> None:
    assert parse(v1("203.0.113.9")) == ("203.0.113.9", len(v1("203.0.113.9")))
    assert parse(v1("2001:db8::7"))[0] == "2001:db8::7"  # type: ignore[index]
    assert parse(v2("198.51.100.4") + b"GET /")[0] == "198.51.100.4"  # type: ignore[index]
    assert parse(v2("2001:db8::9"))[0] == "2001:db8::9"  # type: ignore[index]
    assert parse(b"PROXY UNKNOWN\r\n") == (None, 15)
    assert parse(b"PROXY TCP4 203.0") is None  # needs more bytes
    assert parse(V2_SIGNATURE[:7]) is None
    for bad in (
        b"GET /relay HTTP/1.1\r\n\r\n",
        b"PROXY TCP4 nope 1.2.3.4 1 2\r\n",
        b"PROXY " + b"x" * 120,
    ):
        with pytest.raises(ProxyHeaderError):
            parse(bad)


def test_proxy_protocol_needs_tls_in_front() -> None:
    with pytest.raises(ConfigError, match="RELAY_PROXY_PROTOCOL"):
        load_settings({"RELAY_PROXY_PROTOCOL": "on", "RELAY_TLS_CERT": "c", "RELAY_TLS_KEY": "k"})


async def through_proxy(relay_port: int, header: bytes, path: str = "/relay") -> ClientConnection:
    sock = socket.create_connection(("127.0.0.1", relay_port), timeout=TIMEOUT)
    sock.sendall(header)
    sock.setblocking(False)
    return await connect(f"ws://127.0.0.1:{relay_port}{path}", sock=sock, open_timeout=TIMEOUT)


async def test_limits_key_on_the_proxied_address(
    relay_factory: RelayFactory, devnode: DevNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    relay = await relay_factory(
        node=(devnode.url,), proxy_protocol="on", max_connections_per_client=1
    )
    a = Client(await through_proxy(relay.port, v1("203.0.113.9")))
    b = Client(await through_proxy(relay.port, v2("198.51.100.4"), "/relay"))
    await a.start("proxied-client-a")
    await b.start("proxied-client-b")  # another address: its own limit
    assert (await a.call("proxied-client-a", "system_chain"))["result"] == "GhostCloak Dev"
    again = await through_proxy(relay.port, v2("203.0.113.9"), "/rpc")  # same address
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(again.recv(), TIMEOUT)
    assert (again.close_code, again.close_reason) == (1013, "too_many_connections")
    assert all("203.0.113" not in key for key in relay.clients._clients)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "203.0.113" not in logged
    assert "198.51.100" not in logged


async def test_connection_without_header_is_refused(
    relay_factory: RelayFactory, devnode: DevNode
) -> None:
    relay = await relay_factory(node=(devnode.url,), proxy_protocol="on")
    with pytest.raises((InvalidHandshake, OSError, EOFError, asyncio.TimeoutError)):
        await connect(relay_url(relay), open_timeout=TIMEOUT)
    assert relay.manager.active_count() == 0
