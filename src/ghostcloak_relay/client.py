"""An asyncio client for the relay's envelope protocol (``WS /relay``).

::

    async with RelayClient("wss://relay.example:8443/relay") as relay:
        async with relay.session() as s:
            version = await s.request("state_getRuntimeVersion")
            async with s.subscribe("chain_subscribeNewHeads", [],
                                   unsubscribe="chain_unsubscribeNewHeads") as heads:
                async for header in heads:
                    ...

Several sessions share one connection; each is its own upstream connection at the relay,
so the node cannot link them. The client picks every ``sessionId`` itself (128 random
bits), which lets it match replies without guessing. Failures are typed exceptions, all
subclasses of :class:`RelayError`. See ``docs/client.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from . import protocol
from .frames import FrameError, MessageAssembler
from .logs import SILENT

__all__ = [
    "ClientSession",
    "RelayClient",
    "RelayConnectionError",
    "RelayError",
    "RelayProtocolError",
    "RequestTimeoutError",
    "RpcError",
    "SessionEndedError",
    "Subscription",
    "UpstreamUnavailableError",
]


#: Notifications held per session for subscriptions whose answer has not come yet.
MAX_EARLY_NOTIFICATIONS = 256


class RelayError(Exception):
    """Base of every error this client raises."""


class RelayConnectionError(RelayError):
    """The connection to the relay could not be made or was lost."""


class RelayProtocolError(RelayError):
    """The relay answered with an ``error`` envelope."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class UpstreamUnavailableError(RelayProtocolError):
    """The relay could not reach a node for a new session (``upstream_unavailable``)."""


class RequestTimeoutError(RelayError, TimeoutError):
    """No answer came within the request's timeout."""


class SessionEndedError(RelayError):
    """The session ended (``reason`` as in ``session_ended``) before an answer came."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"session ended: {reason}")
        self.reason = reason


class RpcError(RelayError):
    """A JSON-RPC error response, from the node or from the relay's method policy."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"JSON-RPC error {code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class Subscription:
    """A JSON-RPC subscription: iterate for notification results; close to unsubscribe."""

    def __init__(
        self, session: ClientSession, method: str, params: Any, unsubscribe: str | None
    ) -> None:
        self._session = session
        self._method = method
        self._params = params
        self._unsubscribe = unsubscribe
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.id: str | int | None = None

    async def start(self) -> Subscription:
        if self.id is None:
            # registered from the answer's callback, before any later message is read, so
            # a notification in the same read as the answer is not lost
            await self._session.request(self._method, self._params, on_result=self._register)
        return self

    def _register(self, sub_id: Any) -> None:
        self.id = sub_id
        key = _key(sub_id)
        self._session._subscriptions[key] = self
        for early in self._session._early.pop(key, ()):  # sent before the answer (allowed)
            self._push(early)

    async def __aenter__(self) -> Subscription:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        await self.start()
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)  # every later call fails the same way
            raise item
        return item

    def _push(self, item: Any) -> None:
        self._queue.put_nowait(item)

    async def aclose(self) -> None:
        """Unsubscribe (if ``unsubscribe`` was given and the session is still open)."""
        if self.id is None:
            return
        self._session._subscriptions.pop(_key(self.id), None)
        if self._unsubscribe is not None and self._session.ended is None:
            with contextlib.suppress(SessionEndedError, RelayConnectionError):
                await self._session.request(self._unsubscribe, [self.id])
        self.id = None


def _key(sub_id: Any) -> str:
    return sub_id if isinstance(sub_id, str) else orjson.dumps(sub_id).decode()


class ClientSession:
    """One relay session: JSON-RPC requests and subscriptions over its own upstream."""

    def __init__(self, client: RelayClient, session_id: str) -> None:
        self._client = client
        self.session_id = session_id
        self.ended: str | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._hooks: dict[int, Callable[[Any], None]] = {}
        self._subscriptions: dict[str, Subscription] = {}
        # notifications that came before their subscribe answer (nodes may do that), held
        # until the answer registers the subscription; bounded, oldest dropped first
        self._early: dict[str, list[Any]] = {}

    async def request(
        self,
        method: str,
        params: Any = None,
        *,
        timeout: float = 30,
        on_result: Callable[[Any], None] | None = None,
    ) -> Any:
        """Send one request and return its ``result``; raise :class:`RpcError` on error,
        :class:`RequestTimeoutError` after ``timeout`` seconds."""
        if self.ended is not None:
            raise SessionEndedError(self.ended)
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        if on_result is not None:
            self._hooks[req_id] = on_result
        payload = {
            "jsonrpc": "2.0",
            "id": req_id,
            "method": method,
            "params": [] if params is None else params,
        }
        try:
            self._client._send({"type": "proxy", "sessionId": self.session_id, "payload": payload})
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise RequestTimeoutError(f"no answer to {method} within {timeout} s") from None
        finally:
            self._pending.pop(req_id, None)
            self._hooks.pop(req_id, None)

    def subscribe(
        self, method: str, params: Any = None, *, unsubscribe: str | None = None
    ) -> Subscription:
        """A subscription, started on first use (``async with`` or ``async for``)."""
        return Subscription(self, method, [] if params is None else params, unsubscribe)

    async def end(self) -> None:
        """End the session (the relay closes its upstream connection)."""
        if self.ended is not None:
            return
        waiter = self._client._expect(("ended", self.session_id))
        self._client._send({"type": "session_end", "sessionId": self.session_id})
        with contextlib.suppress(TimeoutError, RelayError):
            await asyncio.wait_for(waiter, 10)
        self._finish("client")

    async def __aenter__(self) -> ClientSession:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.end()

    # -- from the connection -----------

    def _on_payload(self, payload: Any) -> None:
        items = payload if isinstance(payload, list) else [payload]
        for item in items:
            if not isinstance(item, dict):
                continue
            req_id = item.get("id")
            if isinstance(req_id, int) and (fut := self._pending.get(req_id)) is not None:
                if fut.done():
                    continue
                err = item.get("error")
                if isinstance(err, dict):
                    fut.set_exception(
                        RpcError(err.get("code", 0), str(err.get("message", "")), err.get("data"))
                    )
                else:
                    if (hook := self._hooks.pop(req_id, None)) is not None:
                        hook(item.get("result"))
                    fut.set_result(item.get("result"))
                continue
            params = item.get("params")
            if "method" in item and isinstance(params, dict) and "subscription" in params:
                key = _key(params["subscription"])
                sub = self._subscriptions.get(key)
                if sub is not None:
                    sub._push(params.get("result"))
                elif self._hooks:  # a subscribe call is in flight: this may be its first
                    self._early.setdefault(key, []).append(params.get("result"))
                    while sum(map(len, self._early.values())) > MAX_EARLY_NOTIFICATIONS:
                        del self._early[next(iter(self._early))]

    def _fail(self, err: RelayProtocolError) -> None:
        """The relay refused something of this session: fail what is waiting."""
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        if err.code == "unknown_session":  # the relay no longer knows it
            self._finish("unknown_session")

    def _finish(self, reason: str) -> None:
        if self.ended is not None:
            return
        self.ended = reason
        self._client._sessions.pop(self.session_id, None)
        exc = SessionEndedError(reason)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        for sub in self._subscriptions.values():
            sub._push(exc)


class _Listener(WSListener):
    def __init__(self, client: RelayClient) -> None:
        super().__init__()
        self._client = client
        self._assembler = MessageAssembler(64 * 1024 * 1024)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if frame.msg_type in (WSMsgType.PING, WSMsgType.PONG):
            return
        try:
            message = self._assembler.feed(
                frame.msg_type.value, frame.fin, frame.get_payload_as_bytes()
            )
        except FrameError as exc:
            transport.send_close(WSCloseCode(exc.code))
            transport.disconnect()
            return
        if message is not None:
            self._client._on_message(message)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._client._on_disconnected()


class RelayClient:
    """A connection to a relay's ``/relay`` endpoint; use as ``async with``."""

    def __init__(
        self, url: str, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 30
    ) -> None:
        self.url = url
        self._ssl = ssl_context
        self._timeout = timeout
        self._transport: WSTransport | None = None
        self._sessions: dict[str, ClientSession] = {}
        self._waiters: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self.errors: list[RelayProtocolError] = []  # error envelopes no request claimed
        self.closed = False

    async def connect(self) -> RelayClient:
        try:
            transport, _ = await ws_connect(
                lambda: _Listener(self),
                self.url,
                ssl_context=self._ssl,
                websocket_handshake_timeout=self._timeout,
                logger_name=SILENT,
                max_frame_size=64 * 1024 * 1024,
            )
        except (OSError, TimeoutError) as exc:
            raise RelayConnectionError(f"cannot connect to {self.url}: {exc}") from exc
        except Exception as exc:  # picows handshake errors
            raise RelayConnectionError(f"cannot connect to {self.url}: {exc}") from exc
        self._transport = transport
        return self

    async def __aenter__(self) -> RelayClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_disconnected:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            await transport.wait_disconnected()
        self._on_disconnected()

    def session(self, session_id: str | None = None) -> _SessionStarter:
        """Start a session: ``async with relay.session() as s`` (ended on exit)."""
        return _SessionStarter(self, session_id)

    async def start_session(self, session_id: str | None = None) -> ClientSession:
        if session_id is not None and not protocol.is_valid_session_id(session_id):
            raise ValueError("session_id must be 8-128 characters of A-Z a-z 0-9 _ - . :")
        sid = session_id if session_id is not None else protocol.new_session_id()
        waiter = self._expect(("started", sid))
        self._send({"type": "session_start", "sessionId": sid})
        try:
            async with asyncio.timeout(self._timeout):
                await waiter
        finally:
            self._waiters.pop(("started", sid), None)
        session = ClientSession(self, sid)
        self._sessions[sid] = session
        return session

    # -- internals -----------

    def _expect(self, key: tuple[str, str]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[key] = fut
        return fut

    def _send(self, envelope: dict[str, Any]) -> None:
        if self._transport is None or self.closed:
            raise RelayConnectionError("not connected")
        self._transport.send(WSMsgType.TEXT, orjson.dumps(envelope))

    def _resolve(self, key: tuple[str, str], value: Any) -> bool:
        fut = self._waiters.pop(key, None)
        if fut is None or fut.done():
            return False
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)
        return True

    def _on_message(self, message: str | bytes) -> None:
        try:
            msg = orjson.loads(message)
        except orjson.JSONDecodeError:
            return
        if not isinstance(msg, dict):
            return
        kind = msg.get("type")
        sid = msg.get("sessionId")
        if kind == "proxy" and (session := self._sessions.get(sid)) is not None:  # type: ignore[arg-type]
            session._on_payload(msg.get("payload"))
        elif kind == "session_started":
            self._resolve(("started", str(sid)), sid)
        elif kind == "session_ended":
            reason = str(msg.get("reason"))
            self._resolve(("ended", str(sid)), reason)
            if (session := self._sessions.get(sid)) is not None:  # type: ignore[arg-type]
                session._finish(reason)
        elif kind == "error":
            code, text = str(msg.get("code")), str(msg.get("message"))
            cls = UpstreamUnavailableError if code == "upstream_unavailable" else RelayProtocolError
            err = cls(code, text)
            if sid is not None and self._resolve(("started", str(sid)), err):
                return
            if (session := self._sessions.get(sid)) is not None:  # type: ignore[arg-type]
                session._fail(err)
            else:
                self.errors.append(err)

    def _on_disconnected(self) -> None:
        if self.closed:
            return
        self.closed = True
        exc = RelayConnectionError("connection to the relay closed")
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()
        for session in list(self._sessions.values()):
            session._finish("connection_closed")


class _SessionStarter:
    def __init__(self, client: RelayClient, session_id: str | None) -> None:
        self._client = client
        self._session_id = session_id
        self._session: ClientSession | None = None

    async def __aenter__(self) -> ClientSession:
        self._session = await self._client.start_session(self._session_id)
        return self._session

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None and not self._client.closed:
            await self._session.end()
