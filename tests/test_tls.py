"""TLS on the client leg: real certificates from a throwaway CA (trustme), made per test."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.request
from collections.abc import Awaitable, Callable

import orjson
import pytest
from websockets.asyncio.client import connect

from ghostcloak_relay.devnode import DevNode

from .conftest import TIMEOUT, Client, RelayFactory, TlsFiles, relay_url


async def test_wss_round_trip_and_https_health(
    relay_factory: RelayFactory,
    devnode: DevNode,
    tls_files: TlsFiles,
    client_factory: Callable[..., Awaitable[Client]],
) -> None:
    relay = await relay_factory(
        node=(devnode.url,), tls_cert=str(tls_files.cert), tls_key=str(tls_files.key)
    )
    ctx = tls_files.client_context()
    c = await client_factory(relay_url(relay, scheme="wss"), ssl=ctx)
    await c.start("tls-session-1")
    assert (await c.call("tls-session-1", "system_chain"))["result"] == "GhostCloak Dev"

    def get() -> bytes:
        url = relay_url(relay, "/health", "https")
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=ctx) as resp:
            return resp.read()

    assert orjson.loads(await asyncio.to_thread(get)) == {"status": "ok", "activeSessions": 1}


async def test_tls_refuses_untrusted_plain_and_old_clients(
    relay_factory: RelayFactory, devnode: DevNode, tls_files: TlsFiles
) -> None:
    relay = await relay_factory(
        node=(devnode.url,), tls_cert=str(tls_files.cert), tls_key=str(tls_files.key)
    )
    # a client that does not trust the CA fails verification
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect(
            relay_url(relay, scheme="wss"), ssl=ssl.create_default_context(), open_timeout=TIMEOUT
        )
    # TLS 1.1 is refused
    old = tls_files.client_context()
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with contextlib.suppress(ssl.SSLError):
        old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, OSError)):
        await connect(relay_url(relay, scheme="wss"), ssl=old, open_timeout=TIMEOUT)
    # plain WebSocket to the TLS port does not get a session
    with pytest.raises(Exception):  # noqa: B017 - any failure; what matters is no session
        ws = await connect(relay_url(relay), open_timeout=3)
        await ws.send('{"type":"session_start"}')
        await asyncio.wait_for(ws.recv(), 3)
    assert relay.manager.active_count() == 0


async def test_tls_1_2_is_accepted(
    relay_factory: RelayFactory,
    devnode: DevNode,
    tls_files: TlsFiles,
    client_factory: Callable[..., Awaitable[Client]],
) -> None:
    relay = await relay_factory(
        node=(devnode.url,), tls_cert=str(tls_files.cert), tls_key=str(tls_files.key)
    )
    ctx = tls_files.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    c = await client_factory(relay_url(relay, scheme="wss"), ssl=ctx)
    await c.start("tls12-session")
    ssl_obj = c.ws.transport.get_extra_info("ssl_object")
    assert ssl_obj.version() == "TLSv1.2"
