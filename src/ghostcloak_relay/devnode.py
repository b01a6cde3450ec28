"""Embedded dev node: a small Substrate-style JSON-RPC 2.0 server over WebSocket.

**This is a development tool, not a blockchain node.** It stands in for a Midnight node
in the demo and in the fast integration tests, so they run without Docker, Node.js or a
chain spec. It never stands in for the real-node tests (tier 3 of DESIGN.md runs a real
Substrate runtime under chopsticks): there is no runtime, no state, no consensus and no
transaction validation here. Blocks are empty shells with deterministic hashes
(``blake2b-256`` of the SCALE-encoded block number), finality trails the best block by
:data:`FINALITY_LAG`, and submitted extrinsics are accepted as opaque bytes.

What it does get right, because the relay and its clients depend on it:

* Result shapes of the methods it serves, and Substrate's pubsub notifications
  ``{"jsonrpc":"2.0","method":M,"params":{"subscription":ID,"result":R}}`` for
  ``chain_newHead``, ``chain_finalizedHead`` and ``author_extrinsicUpdate``. As on a
  real node, a heads subscription first delivers the current head, right after the
  subscription id, and an extrinsic watch delivers ``"ready"``.
* JSON-RPC 2.0 (https://www.jsonrpc.org/specification): batches (section 6),
  notifications get no answer (4.1), error codes -32700/-32600/-32601/-32602/-32603
  (5.1). Positional params only; named params are refused with -32602. As on jsonrpsee,
  the server of Substrate nodes, extra trailing params are ignored, and notifications
  are neither executed nor answered.
* The node's *unsafe* methods (``author_rotateKeys``, ``author_insertKey``,
  ``system_addReservedPeer``) exist, so tests can show that the relay blocks them.
* RFC 6455 over picows, which hands us frames rather than messages: fragmented
  messages are reassembled (section 5.4) up to :data:`MAX_MESSAGE_SIZE`, a text message
  that is not UTF-8 fails the connection with 1007 (8.1), a CLOSE is answered with a
  CLOSE and the TCP connection is closed by us, the server (5.5.1, 7.1.1). PINGs are
  answered by picows itself (auto-pong).

Invariants: every subscription belongs to exactly one open connection and is dropped
when that connection closes; the block producer is one task owned by :class:`DevNode`,
cancelled and awaited by :meth:`DevNode.aclose`. Bad input never escapes a connection:
it is answered with a JSON-RPC error or, for WebSocket violations, a CLOSE.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    ws_create_server,
)

from .logs import SILENT, safe_exception

__all__ = ["DEFAULT_BLOCK_TIME", "DevNode", "start_devnode"]

#: Seconds between blocks, as on a Midnight/Substrate chain with 6 s slots.
DEFAULT_BLOCK_TIME: float = 6.0
#: Largest reassembled message (and frame): bounds the per-connection receive buffer.
MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
#: Largest unsent output per connection before a reader that does not read is dropped.
MAX_WRITE_BUFFER: Final = 16 * 1024 * 1024
#: Per connection, as a real node's ``--rpc-max-subscriptions-per-connection`` default.
MAX_SUBSCRIPTIONS_PER_CONNECTION: Final = 1024
#: Total hex characters of the extrinsics waiting for the next block. Included ones are
#: kept with their blocks for the node's lifetime: a dev node lives for a demo or a test.
MAX_POOL_BYTES: Final = 64 * 1024 * 1024
#: The finalized block is ``best - FINALITY_LAG`` (floor 0).
FINALITY_LAG: Final = 2
#: How long :meth:`DevNode.aclose` waits for clients to answer its CLOSE before aborting.
CLOSE_TIMEOUT: Final = 2.0

log = logging.getLogger("ghostcloak_relay.devnode")

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
TOO_MANY_SUBSCRIPTIONS: Final = -32006  # jsonrpsee's code
POOL_IMMEDIATELY_DROPPED: Final = 1016  # Substrate author API's code

NEW_HEAD: Final = "chain_newHead"
FINALIZED_HEAD: Final = "chain_finalizedHead"
EXTRINSIC_UPDATE: Final = "author_extrinsicUpdate"

_HASH_RE: Final = re.compile(r"0x[0-9a-fA-F]{64}")
_HEX_NUMBER_RE: Final = re.compile(r"0x[0-9a-fA-F]{1,8}")
_HEX_BYTES_RE: Final = re.compile(r"0x(?:[0-9a-fA-F]{2})+")
_ZERO_HASH: Final = "0x" + "00" * 32
_U32_MAX: Final = 2**32 - 1

_RUNTIME_VERSION: Final = {
    "specName": "midnight",
    "implName": "ghostcloak-devnode",
    "authoringVersion": 1,
    "specVersion": 1,
    "implVersion": 0,
    "apis": [],
    "transactionVersion": 1,
    "stateVersion": 1,
}
#: Methods whose result never changes, whatever their params.
_CONSTANT_METHODS: Final[dict[str, Any]] = {
    "system_health": {"peers": 0, "isSyncing": False, "shouldHavePeers": False},
    "system_chain": "GhostCloak Dev",
    "system_name": "ghostcloak-devnode",
    "system_version": "0.1.0-dev",
    "system_properties": {"ss58Format": 42, "tokenDecimals": 12, "tokenSymbol": "DUST"},
    "state_getRuntimeVersion": _RUNTIME_VERSION,
    "midnight_apiVersions": [2],
    "midnight_ledgerVersion": "ledger-4.0.0",
    "author_insertKey": None,  # unsafe
    "system_addReservedPeer": None,  # unsafe
}


class _RpcError(Exception):
    """A JSON-RPC error to answer with; the message is fixed text, never client data."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


def _invalid(message: str) -> _RpcError:
    return _RpcError(INVALID_PARAMS, f"Invalid params: {message}")


def _blake2(data: bytes) -> str:
    return "0x" + hashlib.blake2b(data, digest_size=32).hexdigest()


def _error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(slots=True, frozen=True)
class _Block:
    number: int
    hash: str
    header: dict[str, Any]
    extrinsics: list[str]


def _make_block(number: int, parent_hash: str, extrinsics: list[str]) -> _Block:
    scale_number = number.to_bytes(4, "little")
    header = {
        "parentHash": parent_hash,
        "number": hex(number),
        "stateRoot": _blake2(b"state" + scale_number),
        "extrinsicsRoot": _blake2(b"".join(bytes.fromhex(x[2:]) for x in extrinsics)),
        "digest": {"logs": []},
    }
    return _Block(number, _blake2(scale_number), header, extrinsics)


@dataclass(slots=True)
class _Subscription:
    conn: _Connection
    method: str  # the notification method: NEW_HEAD, FINALIZED_HEAD or EXTRINSIC_UPDATE
    in_block: int | None = None  # extrinsic watches: the block that included it


@dataclass(slots=True)
class _Call:
    """One request being served: its connection, positional params, and the
    notifications (subscription id, result) to send once its answer is out."""

    conn: _Connection
    params: list[Any]
    after: list[tuple[str, Any]] = field(default_factory=list)

    def arg(self, index: int) -> Any:
        return self.params[index] if index < len(self.params) else None


class _Connection(WSListener):
    """One client WebSocket: reassembles messages, hands them to the node, sends."""

    def __init__(self, node: DevNode) -> None:
        super().__init__()
        self.node = node
        self.transport: WSTransport | None = None
        self.subs: set[str] = set()
        self._frag_type: WSMsgType | None = None  # type of the message being reassembled
        self._frags = bytearray()
        self._abort_timer: asyncio.TimerHandle | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.node._connected(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._frags = bytearray()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self.node._disconnected(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                code = frame.get_close_code()
                transport.send_close(WSCloseCode.OK if code == WSCloseCode.NO_INFO else code)
            transport.disconnect()
            return
        if transport.is_close_frame_sent or msg_type in (WSMsgType.PING, WSMsgType.PONG):
            return  # closing: discard data (RFC 6455 5.5.1); pings are answered by picows
        if msg_type == WSMsgType.CONTINUATION:
            if self._frag_type is None:
                self.fail(WSCloseCode.PROTOCOL_ERROR)
                return
            if len(self._frags) + frame.payload_size > MAX_MESSAGE_SIZE:
                self.fail(WSCloseCode.MESSAGE_TOO_BIG)
                return
            self._frags += frame.get_payload_as_memoryview()
            if frame.fin:
                msg_type, data = self._frag_type, bytes(self._frags)
                self._frag_type, self._frags = None, bytearray()
                self.node._handle_message(self, msg_type, data)
        elif self._frag_type is not None:
            self.fail(WSCloseCode.PROTOCOL_ERROR)  # a new message inside a fragmented one
        elif frame.fin:
            self.node._handle_message(self, msg_type, frame.get_payload_as_bytes())
        else:
            self._frag_type = msg_type
            self._frags = bytearray(frame.get_payload_as_memoryview())

    def send(self, message: Any) -> None:
        transport = self.transport
        if transport is None or transport.is_close_frame_sent or transport.is_disconnected:
            return
        if transport.underlying_transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("dropping a dev node client that does not read its messages")
            transport.send_close(WSCloseCode.POLICY_VIOLATION)
            transport.disconnect(graceful=False)
            return
        transport.send(WSMsgType.TEXT, orjson.dumps(message))

    def fail(self, code: WSCloseCode) -> None:
        """Fail the WebSocket connection (RFC 6455 7.1.7): send CLOSE, then disconnect when
        the client answers it, or abort after CLOSE_TIMEOUT. Closing the socket at once
        would reset it while the client is still sending, and lose our CLOSE frame."""
        self._frag_type, self._frags = None, bytearray()
        transport = self.transport
        if transport is not None and not transport.is_close_frame_sent:
            transport.send_close(code)
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(CLOSE_TIMEOUT, transport.disconnect, False)


_Handler = Callable[[_Call], Any]


def _constant(result: Any) -> _Handler:
    return lambda _call: result


class DevNode:
    """A running dev node. Create it with :func:`start_devnode`; stop it with :meth:`aclose`."""

    def __init__(self, host: str, block_time: float) -> None:
        if not (math.isfinite(block_time) and block_time > 0):
            raise ValueError(f"block_time must be a finite number > 0, not {block_time!r}")
        self.host = host
        self.port = 0
        self._block_time = block_time
        self._server: asyncio.Server | None = None
        self._producer: asyncio.Task[None] | None = None
        self._closing = False
        self._conns: set[_Connection] = set()
        self._total_connections = 0
        self._subs: dict[str, _Subscription] = {}
        self._sub_prefix = secrets.token_hex(4)
        self._sub_counter = 0
        genesis = _make_block(0, _ZERO_HASH, [])
        self._blocks: list[_Block] = [genesis]
        self._by_hash: dict[str, _Block] = {genesis.hash: genesis}
        self._finalized = 0
        self._pool: list[tuple[str, str | None]] = []  # (extrinsic, watching subscription)
        self._pool_bytes = 0
        self._methods: dict[str, _Handler] = {
            name: _constant(result) for name, result in _CONSTANT_METHODS.items()
        }
        self._methods.update(
            {
                "rpc_methods": self._rpc_methods,
                "chain_getBlockHash": self._chain_get_block_hash,
                "chain_getHeader": self._chain_get_header,
                "chain_getBlock": self._chain_get_block,
                "chain_getFinalizedHead": lambda _call: self._blocks[self._finalized].hash,
                "chain_subscribeNewHeads": self._subscribe_heads(NEW_HEAD),
                "chain_unsubscribeNewHeads": self._unsubscriber(NEW_HEAD),
                "chain_subscribeFinalizedHeads": self._subscribe_heads(FINALIZED_HEAD),
                "chain_unsubscribeFinalizedHeads": self._unsubscriber(FINALIZED_HEAD),
                "author_submitExtrinsic": self._author_submit,
                "author_submitAndWatchExtrinsic": self._author_submit_and_watch,
                "author_unwatchExtrinsic": self._unsubscriber(EXTRINSIC_UPDATE),
                "author_rotateKeys": lambda _call: "0x" + secrets.token_hex(64),  # unsafe
            }
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def active_connections(self) -> int:
        """WebSocket connections open right now."""
        return len(self._conns)

    @property
    def total_connections(self) -> int:
        """WebSocket connections accepted since start."""
        return self._total_connections

    @property
    def active_subscriptions(self) -> int:
        """Live subscriptions across all connections."""
        return len(self._subs)

    @property
    def best_block(self) -> int:
        return self._blocks[-1].number

    def produce_block(self) -> None:
        """Make a block now, and notify exactly as the block timer would."""
        parent = self._blocks[-1]
        pool, self._pool, self._pool_bytes = self._pool, [], 0
        block = _make_block(parent.number + 1, parent.hash, [x for x, _ in pool])
        self._blocks.append(block)
        self._by_hash[block.hash] = block
        self._notify_all(NEW_HEAD, block.header)
        for _, sub_id in pool:
            if sub_id is not None and (sub := self._subs.get(sub_id)) is not None:
                sub.in_block = block.number
                self._notify(sub_id, {"inBlock": block.hash})
        finalized = max(0, block.number - FINALITY_LAG)
        if finalized > self._finalized:
            self._finalized = finalized
            self._notify_all(FINALIZED_HEAD, self._blocks[finalized].header)
            for sub_id, sub in list(self._subs.items()):
                if sub.in_block is not None and sub.in_block <= finalized:
                    self._notify(sub_id, {"finalized": self._blocks[sub.in_block].hash})
                    self._drop_subscription(sub_id)  # the watch ends, as on Substrate

    async def aclose(self) -> None:
        """Stop listening and producing, close every client with 1001 (going away).

        Idempotent. Clients get :data:`CLOSE_TIMEOUT` seconds to answer the CLOSE; the
        ones that do not are aborted, so this always returns.
        """
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._producer is not None:
            self._producer.cancel()
            await asyncio.wait([self._producer])  # lets our own cancellation propagate
        while transports := [c.transport for c in self._conns if c.transport is not None]:
            for transport in transports:
                if not transport.is_close_frame_sent:
                    transport.send_close(WSCloseCode.GOING_AWAY)
            # Each client answers with its CLOSE, on which on_ws_frame disconnects it.
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(t.wait_disconnected()) for t in transports],
                timeout=CLOSE_TIMEOUT,
            )
            for transport in transports:
                transport.disconnect(graceful=False)  # no-op for the closed ones
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()
        log.info("dev node stopped")

    # -- connections and messages -----------

    def _new_listener(self, request: WSUpgradeRequest) -> _Connection | None:
        return None if self._closing else _Connection(self)  # None: 404 while closing

    def _connected(self, conn: _Connection) -> None:
        self._conns.add(conn)
        self._total_connections += 1
        if self._closing:
            conn.fail(WSCloseCode.GOING_AWAY)

    def _disconnected(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        for sub_id in list(conn.subs):
            self._drop_subscription(sub_id)

    def _handle_message(self, conn: _Connection, msg_type: WSMsgType, data: bytes) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            if msg_type == WSMsgType.TEXT and not _is_utf8(data):
                conn.fail(WSCloseCode.INVALID_TEXT)
            else:
                conn.send(_error(None, PARSE_ERROR, "Parse error"))
            return
        after: list[tuple[str, Any]] = []
        answer: Any
        if not isinstance(message, list):
            answer = self._call(conn, message, after)
        elif not message:
            answer = _error(None, INVALID_REQUEST, "Invalid request: empty batch")
        else:
            answers = [self._call(conn, request, after) for request in message]
            answer = [a for a in answers if a is not None] or None
        if answer is not None:
            conn.send(answer)
        for sub_id, result in after:
            self._notify(sub_id, result)

    def _call(
        self, conn: _Connection, request: Any, after: list[tuple[str, Any]]
    ) -> dict[str, Any] | None:
        """Serve one request; the answer, or None for a notification (JSON-RPC 4.1)."""
        if not isinstance(request, dict):
            return _error(None, INVALID_REQUEST, "Invalid request")
        rid = request.get("id")
        if not (rid is None or isinstance(rid, str) or type(rid) is int):
            return _error(None, INVALID_REQUEST, "Invalid request: bad id")
        method, params = request.get("method"), request.get("params", [])
        if request.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return _error(rid, INVALID_REQUEST, "Invalid request")
        if params is None:
            params = []
        if not isinstance(params, list | dict):
            return _error(rid, INVALID_REQUEST, "Invalid request: params must be structured")
        if "id" not in request:
            return None  # a notification: not executed, not answered (as jsonrpsee does)
        call = _Call(conn, params if isinstance(params, list) else [])
        try:
            handler = self._methods.get(method)
            if handler is None:
                raise _RpcError(METHOD_NOT_FOUND, "Method not found")
            if isinstance(params, dict):
                raise _invalid("named params are not supported")
            result = handler(call)
        except _RpcError as exc:
            return _error(rid, exc.code, exc.message)
        except Exception as exc:  # type and place only: an exception's text may hold params
            log.error("dev node method failed: %s", safe_exception(exc))
            return _error(rid, INTERNAL_ERROR, "Internal error")
        after.extend(call.after)
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    # -- subscriptions -----------

    def _subscribe(self, call: _Call, method: str) -> str:
        if len(call.conn.subs) >= MAX_SUBSCRIPTIONS_PER_CONNECTION:
            raise _RpcError(TOO_MANY_SUBSCRIPTIONS, "Too many subscriptions on the connection")
        self._sub_counter += 1
        sub_id = f"{self._sub_prefix}{self._sub_counter:08x}"
        self._subs[sub_id] = _Subscription(call.conn, method)
        call.conn.subs.add(sub_id)
        return sub_id

    def _drop_subscription(self, sub_id: str) -> None:
        sub = self._subs.pop(sub_id, None)
        if sub is not None:
            sub.conn.subs.discard(sub_id)

    def _notify(self, sub_id: str, result: Any) -> None:
        sub = self._subs.get(sub_id)
        if sub is not None:
            params = {"subscription": sub_id, "result": result}
            sub.conn.send({"jsonrpc": "2.0", "method": sub.method, "params": params})

    def _notify_all(self, method: str, result: Any) -> None:
        for sub_id, sub in list(self._subs.items()):
            if sub.method == method:
                self._notify(sub_id, result)

    def _subscribe_heads(self, method: str) -> _Handler:
        def subscribe(call: _Call) -> str:
            sub_id = self._subscribe(call, method)
            number = self._finalized if method == FINALIZED_HEAD else self.best_block
            call.after.append((sub_id, self._blocks[number].header))  # the current head first
            return sub_id

        return subscribe

    def _unsubscriber(self, method: str) -> _Handler:
        def unsubscribe(call: _Call) -> bool:
            sub_id = call.arg(0)
            if not isinstance(sub_id, str):
                raise _invalid("subscription id must be a string")
            sub = self._subs.get(sub_id)
            if sub is None or sub.conn is not call.conn or sub.method != method:
                return False
            self._drop_subscription(sub_id)
            return True

        return unsubscribe

    # -- methods -----------

    def _rpc_methods(self, call: _Call) -> dict[str, Any]:
        return {"methods": sorted(self._methods)}

    def _block_number(self, value: Any) -> int:
        if isinstance(value, str) and _HEX_NUMBER_RE.fullmatch(value):
            return int(value, 16)
        if type(value) is int and 0 <= value <= _U32_MAX:
            return value
        raise _invalid("block number must be a u32 or its 0x hex")

    def _hash_at(self, number: Any) -> str | None:
        if number is None:
            return self._blocks[-1].hash
        n = self._block_number(number)
        return self._blocks[n].hash if n < len(self._blocks) else None

    def _chain_get_block_hash(self, call: _Call) -> str | list[str | None] | None:
        value = call.arg(0)
        if isinstance(value, list):
            return [self._hash_at(v) for v in value]
        return self._hash_at(value)

    def _block_at(self, block_hash: Any) -> _Block | None:
        """The block of ``block_hash`` (None: the best block), None if unknown."""
        if block_hash is None:
            return self._blocks[-1]
        if not (isinstance(block_hash, str) and _HASH_RE.fullmatch(block_hash)):
            raise _invalid("block hash must be 0x and 32 bytes of hex")
        return self._by_hash.get(block_hash.lower())

    def _chain_get_header(self, call: _Call) -> dict[str, Any] | None:
        block = self._block_at(call.arg(0))
        return None if block is None else block.header

    def _chain_get_block(self, call: _Call) -> dict[str, Any] | None:
        block = self._block_at(call.arg(0))
        if block is None:
            return None
        return {
            "block": {"header": block.header, "extrinsics": block.extrinsics},
            "justifications": None,
        }

    def _extrinsic(self, call: _Call) -> str:
        extrinsic = call.arg(0)
        if not (isinstance(extrinsic, str) and _HEX_BYTES_RE.fullmatch(extrinsic)):
            raise _invalid("extrinsic must be 0x and hex bytes")
        if self._pool_bytes + len(extrinsic) > MAX_POOL_BYTES:
            raise _RpcError(POOL_IMMEDIATELY_DROPPED, "Immediately Dropped")
        self._pool_bytes += len(extrinsic)
        return extrinsic.lower()

    def _author_submit(self, call: _Call) -> str:
        extrinsic = self._extrinsic(call)
        self._pool.append((extrinsic, None))
        return _blake2(bytes.fromhex(extrinsic[2:]))

    def _author_submit_and_watch(self, call: _Call) -> str:
        extrinsic = self._extrinsic(call)
        sub_id = self._subscribe(call, EXTRINSIC_UPDATE)
        self._pool.append((extrinsic, sub_id))
        call.after.append((sub_id, "ready"))
        return sub_id

    # -- lifecycle -----------

    async def _start(self, port: int) -> None:
        self._server = await ws_create_server(
            self._new_listener,
            self.host,
            port,
            logger_name=SILENT,  # picows logs peer addresses at INFO
            max_frame_size=MAX_MESSAGE_SIZE,
            read_buffer_init_size=1024,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._producer = asyncio.create_task(self._produce_forever(), name="devnode-blocks")
        log.info("dev node (development tool) listening on %s", self.url)

    async def _produce_forever(self) -> None:
        while True:
            await asyncio.sleep(self._block_time)
            try:
                self.produce_block()
            except Exception as exc:
                log.error("dev node block production failed: %s", safe_exception(exc))


async def start_devnode(
    host: str = "127.0.0.1", port: int = 0, *, block_time: float = DEFAULT_BLOCK_TIME
) -> DevNode:
    """Start a dev node listening on ``host:port`` (0: a free port, see ``DevNode.port``).

    A block is produced every ``block_time`` seconds (any finite value > 0).
    """
    node = DevNode(host, block_time)
    await node._start(port)
    return node
