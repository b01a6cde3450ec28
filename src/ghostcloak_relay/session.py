"""One session at the edge: its fresh upstream connection and the traffic both ways.

:class:`UpstreamSession` holds what ``/relay`` envelope sessions and ``/rpc``
connections share: dialing a node from the pool (failing over to the next one, with
backoff, before giving up), queueing client messages until the node's connection is
open (bounded by ``RELAY_MAX_QUEUED_MESSAGES``), the JSON-RPC policy
(:class:`.rpc.RpcSession`), request timeouts, the idle timeout, backpressure towards the
node, and ending exactly once. Subclasses decide how a message reaches the client
(wrapped in an envelope or not) and how the client is told that the session ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

import orjson
from picows import WSCloseCode, WSMsgType, WSTransport

from .limits import TokenBucket
from .logs import ref, safe_exception
from .protocol import EndReason, ErrorCode, dumps_exact, exact_id, json_loads, loads_exact
from .rpc import (
    BATCH_TOO_LARGE,
    DROP,
    METHOD_NOT_ALLOWED,
    RATE_LIMITED,
    TOO_MANY_SUBSCRIPTIONS,
    RpcSession,
)
from .sessions import Session
from .upstream import connect

if TYPE_CHECKING:
    from .connection import ClientConnection

__all__ = ["State", "UpstreamSession"]

log = logging.getLogger("ghostcloak_relay.session")

_TEXT: Final = WSMsgType.TEXT  # Final: C statics when compiled
_BINARY: Final = WSMsgType.BINARY

#: Pause before each further node tried for one session start (seconds; the last value
#: repeats). Every configured node is tried once before ``upstream_unavailable``.
CONNECT_BACKOFF = (0.0, 0.05, 0.2, 0.5)


#: ``refused_total{reason}`` for each JSON-RPC error the relay answers itself.
REFUSAL_REASONS = {
    METHOD_NOT_ALLOWED: "method_not_allowed",
    RATE_LIMITED: "rate_limited",
    BATCH_TOO_LARGE: "batch_too_large",
    TOO_MANY_SUBSCRIPTIONS: "too_many_subscriptions",
}


class State(Enum):
    CONNECTING = 1
    OPEN = 2
    CLOSED = 3


_OPEN: Final = State.OPEN  # for the hot path: a C static when compiled


class UpstreamSession:
    """A session's upstream connection and its state; ends exactly once."""

    needs_json = False  # /relay must splice node messages into envelopes: JSON only

    # slots: there is one of these per session, 10,000s per process (memory per session)
    __slots__ = (
        "_queue",
        "_server",
        "_stats",
        "conn",
        "connect_task",
        "core",
        "last_active",
        "node_stuck_since",
        "rpc",
        "session_id",
        "state",
        "upstream",
    )

    def __init__(self, conn: ClientConnection, core: Session) -> None:
        self.conn = conn
        self.core = core
        self.session_id = core.session_id
        server = conn.server
        settings = server.settings
        self._server = server  # kept here: the hot path reads them on every message
        self._stats = server.stats
        self.state = State.CONNECTING
        self.upstream: WSTransport | None = None
        self.connect_task: asyncio.Task[None] | None = None
        # while connecting: (to_node, opcode, data) in arrival order; None afterwards
        self._queue: deque[tuple[bool, WSMsgType, bytes | str]] | None = deque()
        self.last_active = server.now
        self.node_stuck_since: float | None = None
        self.rpc: RpcSession | None = None
        if settings.rpc_methods.enabled:
            buckets = tuple(
                b
                for b in (
                    TokenBucket(settings.rate_limit) if settings.rate_limit > 0 else None,
                    conn.client_bucket,
                )
                if b is not None
            )
            self.rpc = RpcSession(
                settings.rpc_methods,
                settings.max_subscriptions_per_session,
                settings.max_batch,
                buckets=buckets,
                request_timeout=settings.request_timeout,
                observe=server.stats.observe_rtt,
            )
        server.stats.sessions_started[conn.endpoint] += 1

    # -- to be provided by the endpoint -----------

    def deliver(self, data: bytes, binary: bool) -> None:
        """A message for the client (from the node, or the relay's own JSON-RPC answer)."""
        raise NotImplementedError

    def opened(self) -> None:
        """The upstream connection is open (before queued messages are flushed)."""

    def ended(self, reason: EndReason, notify: bool) -> None:
        """The session has ended; tell the client if ``notify``."""
        raise NotImplementedError

    def unavailable(self) -> None:
        """No node could be reached; the session never started."""
        raise NotImplementedError

    # -- dialing -----------

    def begin(self) -> None:
        self.connect_task = self.conn.server.tasks.spawn(self._connect(), name="upstream-connect")

    async def _connect(self) -> None:
        server = self.conn.server
        settings = server.settings
        stats = server.stats
        for attempt, node in enumerate(server.pool.candidates()):
            if attempt:
                await asyncio.sleep(CONNECT_BACKOFF[min(attempt, len(CONNECT_BACKOFF) - 1)])
            stats.upstream_connects[node.index] += 1
            try:
                await connect(
                    node.url,
                    self,
                    timeout=settings.upstream_connect_timeout,
                    max_message_bytes=settings.max_message_bytes,
                    ssl_context=server.upstream_ssl,
                    ping_interval=settings.ping_interval,
                    write_buffer_bytes=settings.client_buffer_bytes,
                )
                return
            except Exception as exc:  # every way of not reaching a node is the same here
                stats.upstream_failures[node.index] += 1
                server.pool.failed(node)
                if self.state is not State.CONNECTING:
                    return
                log.info(
                    "session %s: node %s unreachable: %s",
                    ref(self.session_id),
                    node.name,
                    safe_exception(exc),
                )
        if self.state is State.CONNECTING:
            self.state = State.CLOSED
            self._queue = None
            server.stats.refused["upstream_unavailable"] += 1
            self.unavailable()

    # -- upstream events (UpstreamSink) -----------

    def on_upstream_open(self, transport: WSTransport) -> None:
        if self.state is not State.CONNECTING:  # ended while the handshake was finishing
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        self.upstream = transport
        self.state = State.OPEN
        if self.conn.paused_since is not None:
            transport.underlying_transport.pause_reading()
        self.opened()
        queue, self._queue = self._queue, None
        if queue:
            for to_node, opcode, data in queue:
                if to_node:
                    transport.send(opcode, data)
                else:
                    self.deliver(data if isinstance(data, bytes) else data.encode(), False)
        log.debug("session %s open", ref(self.session_id))

    def on_upstream_message(self, data: bytes, binary: bool = False) -> None:
        if self.state is not _OPEN:
            return
        self.last_active = self._server.now
        stats = self._stats
        stats.msgs_to_client += 1
        stats.bytes_to_client += len(data)
        rpc = self.rpc
        if rpc is not None or self.needs_json:
            try:
                # a batch answer may be re-encoded (merged refusals): keep its integers exact
                msg = loads_exact(data) if data[:1] == b"[" else json_loads(data)
            except orjson.JSONDecodeError:
                log.info("session %s: node sent a message that is not JSON", ref(self.session_id))
                self.end(EndReason.UPSTREAM_ERROR)
                return
            if rpc is not None:
                if rpc.answered_plain(msg):  # the hot path: an answer, passed as is
                    self.deliver(data, binary)
                    return
                out = rpc.node_message(msg)
                if rpc.outbox and self.upstream is not None:  # the relay's own requests
                    for request in rpc.take_outbox():
                        self.upstream.send(_TEXT, dumps_exact(request))
                if out is DROP:
                    return
                if out is not None:
                    data, binary = dumps_exact(out), False
        self.deliver(data, binary)

    def on_upstream_closed(self, clean: bool) -> None:
        self.upstream = None
        self.end(EndReason.UPSTREAM_CLOSED if clean else EndReason.UPSTREAM_ERROR)

    def on_upstream_pause(self, stuck: bool) -> None:
        """The node stopped (or resumed) reading what the relay sends it."""
        if stuck == (self.node_stuck_since is not None) or self.state is State.CLOSED:
            return
        self.node_stuck_since = self.conn.server.now if stuck else None
        self.conn.node_not_reading(stuck)

    # -- client side -----------

    def from_client(
        self, msg: Any, raw: bytes | str | None, opcode: WSMsgType = _TEXT
    ) -> ErrorCode | None:
        """A parsed client message (``raw``: its original text, forwarded when unchanged)."""
        server = self._server
        self.last_active = server.now
        queue = self._queue
        if queue is not None and len(queue) >= server.settings.max_queued_messages:
            server.stats.refused["queue_full"] += 1
            return ErrorCode.QUEUE_FULL  # refused before any bookkeeping: as if never sent
        rpc = self.rpc
        if rpc is not None:
            if raw is not None and queue is None and rpc.forward_plain(msg):  # the hot path
                return self.to_node(opcode, raw)
            decision = rpc.client_request(msg)
            if decision is None:  # allowed, unchanged: the common case
                if raw is None:
                    raw = dumps_exact(msg)
                return self.to_node(opcode, raw)
            if decision.answer is not None:
                if raw is not None and type(msg) is dict and type(decision.answer) is dict:
                    # a single request parsed without loads_exact: answer with its exact id
                    decision.answer["id"] = exact_id(raw, decision.answer["id"])
                refused = self.conn.server.stats.refused
                for answer in (
                    decision.answer if isinstance(decision.answer, list) else (decision.answer,)
                ):
                    refused[REFUSAL_REASONS.get(answer["error"]["code"], "invalid")] += 1
                self.reply(decision.answer)
            if decision.forward is None:
                return None
            if decision.changed or raw is None:
                raw, opcode = dumps_exact(decision.forward), _TEXT
        elif raw is None:
            raw = dumps_exact(msg)
        return self.to_node(opcode, raw)

    def to_node(self, opcode: WSMsgType, data: bytes | str) -> ErrorCode | None:
        stats = self._stats
        stats.msgs_to_node += 1
        # str from /rpc: its length is its UTF-8 size when ASCII (an O(1) check)
        stats.bytes_to_node += (
            len(data) if isinstance(data, bytes) or data.isascii() else len(data.encode())
        )
        upstream = self.upstream
        if upstream is not None:
            upstream.send(opcode, data)
            return None
        return self._enqueue(True, opcode, data)

    def reply(self, answer: Any) -> None:
        """The relay's own JSON-RPC answer, in order with the node's."""
        data = dumps_exact(answer)
        if self.state is State.CONNECTING:
            self._enqueue(False, _TEXT, data)
        elif self.state is State.OPEN:
            self.deliver(data, False)

    def _enqueue(self, to_node: bool, opcode: WSMsgType, data: bytes | str) -> ErrorCode | None:
        queue = self._queue
        if queue is None:
            return None
        if len(queue) >= self.conn.server.settings.max_queued_messages:
            self.conn.server.stats.refused["queue_full"] += 1
            return ErrorCode.QUEUE_FULL
        queue.append((to_node, opcode, data))
        return None

    def pause_node_reading(self, pause: bool) -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.is_disconnected:
            raw = upstream.underlying_transport
            if pause:
                raw.pause_reading()
            else:
                raw.resume_reading()

    @property
    def in_flight(self) -> int:
        return self.rpc.in_flight if self.rpc is not None else 0

    # -- time and ending -----------

    def tick(self, now: float) -> None:
        settings = self.conn.server.settings
        if self.rpc is not None and self.state is State.OPEN:
            for answer in self.rpc.expire():
                self.conn.server.stats.refused["timeout"] += 1
                self.reply(answer)
        if now - self.last_active >= settings.idle_timeout:
            self.end(EndReason.IDLE)
        elif (
            self.node_stuck_since is not None
            and now - self.node_stuck_since >= settings.slow_client_timeout
        ):
            log.info("session %s: node not reading", ref(self.session_id))
            self.end(EndReason.UPSTREAM_ERROR)

    def end(self, reason: EndReason, *, notify: bool = True) -> None:
        """End once: close the upstream, account for it, tell the client."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._queue = None
        task = self.connect_task
        if task is not None and not task.done():
            task.cancel()
        stuck = self.node_stuck_since is not None
        if stuck:
            self.node_stuck_since = None
            self.conn.node_not_reading(False)
        upstream, self.upstream = self.upstream, None
        if upstream is not None and not upstream.is_disconnected:
            upstream.send_close(self.upstream_close_code(reason))
            # a node that is not reading would hold a graceful close (and its buffer) open
            upstream.disconnect(graceful=not stuck and reason is not EndReason.UPSTREAM_ERROR)
        server = self.conn.server
        server.manager.end(self.session_id, reason)
        server.stats.sessions_ended[reason.value] += 1
        self.ended(reason, notify)
        log.debug("session %s ended: %s", ref(self.session_id), reason.value)

    def upstream_close_code(self, reason: EndReason) -> WSCloseCode:
        return WSCloseCode.OK
