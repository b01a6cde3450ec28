"""JSON-RPC 2.0 bookkeeping of one session, shared by ``/relay`` and ``/rpc``; no I/O.

:class:`RpcSession` sits between the client and the node of one session. For each client
request it decides what reaches the node and what the relay answers itself (a method the
policy refuses, a subscription over the cap, a malformed element). For each node message
it keeps subscription counts and filters the answer to ``rpc_methods``. It never sees
sockets; the edge encodes and sends what it returns.

Batches: allowed elements go to the node as one batch; refused elements are answered by
the relay *merged into the node's batch answer* (matched by the set of forwarded ids), so
a client gets exactly one array per batch. If every element is refused, or the forwarded
elements are all notifications, the relay answers at once. The error codes the relay
uses itself are the constants below, listed in ``docs/protocol.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from .limits import TokenBucket, weight
from .policy import MethodPolicy

__all__ = [
    "BATCH_TOO_LARGE",
    "DROP",
    "INVALID_REQUEST",
    "METHOD_NOT_ALLOWED",
    "PARSE_ERROR",
    "RATE_LIMITED",
    "REQUEST_TIMEOUT",
    "TOO_MANY_SUBSCRIPTIONS",
    "ClientDecision",
    "RpcSession",
    "error_response",
]

PARSE_ERROR: Final = -32700  # the frame is not JSON
INVALID_REQUEST: Final = -32600  # not a JSON-RPC request object (or an empty batch)
METHOD_NOT_ALLOWED: Final = -32601  # the relay's method policy refuses the method
TOO_MANY_SUBSCRIPTIONS: Final = -32005  # RELAY_MAX_SUBSCRIPTIONS_PER_SESSION reached
BATCH_TOO_LARGE: Final = -32010  # more elements than RELAY_MAX_BATCH
RATE_LIMITED: Final = -32029  # RELAY_RATE_LIMIT or RELAY_RATE_LIMIT_PER_CLIENT exceeded
REQUEST_TIMEOUT: Final = -32008  # the node did not answer within RELAY_REQUEST_TIMEOUT

#: Returned by :meth:`RpcSession.node_message` for a message the client must not get
#: (the answer to a request that already timed out).
DROP: Final = object()

#: How many timed-out request ids are remembered to drop their late answers.
MAX_TIMED_OUT_IDS: Final = 1024

MESSAGES: Final = {
    PARSE_ERROR: "Parse error",
    INVALID_REQUEST: "Invalid request",
    METHOD_NOT_ALLOWED: "Method not allowed by the relay",
    TOO_MANY_SUBSCRIPTIONS: "Too many subscriptions in this session",
    BATCH_TOO_LARGE: "Batch too large",
    RATE_LIMITED: "Too many requests, slow down",
    REQUEST_TIMEOUT: "The node did not answer in time",
}

# Subscription methods whose name does not say "subscribe", and their counterparts.
_SUBSCRIBE_EXTRA: Final = frozenset(
    {"author_submitAndWatchExtrinsic", "chainHead_v1_follow", "transactionWatch_v1_submitAndWatch"}
)
_UNSUBSCRIBE_EXTRA: Final = frozenset(
    {"author_unwatchExtrinsic", "chainHead_v1_unfollow", "transactionWatch_v1_unwatch"}
)
# Notifications that end their subscription on the node's side.
_TERMINAL_TX_STATES: Final = frozenset(
    {"finalized", "usurped", "dropped", "invalid", "finalityTimeout", "retracted_final"}
)


def is_subscribe(method: str) -> bool:
    return method in _SUBSCRIBE_EXTRA or (
        "subscribe" in method and "unsubscribe" not in method.lower()
    )


def is_unsubscribe(method: str) -> bool:
    return method in _UNSUBSCRIBE_EXTRA or "unsubscribe" in method.lower()


def _key(value: Any) -> int | str | None:
    """A hashable form of a JSON-RPC id or subscription id (None: untrackable)."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return None


def error_response(req_id: Any, code: int, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": MESSAGES[code]}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": req_id, "error": err}


@dataclass(slots=True)
class ClientDecision:
    """What to do with one client message.

    ``forward``: what to send to the node (None: nothing); ``changed``: whether it
    differs from what the client sent (so it must be re-encoded); ``answer``: what the
    relay answers the client itself right now (None: nothing).
    """

    forward: Any = None
    changed: bool = False
    answer: Any = None


@dataclass(slots=True)
class _Merge:
    ids: frozenset[int | str]
    answers: list[dict[str, Any]] = field(default_factory=list)


class RpcSession:
    """Policy and subscription state of one session."""

    __slots__ = (
        "_buckets",
        "_clock",
        "_merges",
        "_observe",
        "_pending",
        "_pending_methods",
        "_pending_subs",
        "_timed_out",
        "max_batch",
        "max_subscriptions",
        "policy",
        "request_timeout",
        "subscriptions",
    )

    def __init__(
        self,
        policy: MethodPolicy,
        max_subscriptions: int,
        max_batch: int,
        *,
        buckets: tuple[TokenBucket, ...] = (),
        request_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.policy = policy
        self.max_subscriptions = max_subscriptions
        self.max_batch = max_batch
        self.request_timeout = request_timeout
        self._buckets = buckets
        self._clock = clock
        self._observe = observe  # called with each answered request's round-trip seconds
        self._pending: dict[int | str, float] = {}  # request id -> sent at, in send order
        self._timed_out: dict[int | str, None] = {}  # ids answered by the relay with a timeout
        self.subscriptions: set[int | str] = set()  # live subscription ids at the node
        self._pending_subs: set[int | str] = set()  # request ids of subscribe calls in flight
        self._pending_methods: set[int | str] = set()  # request ids of rpc_methods in flight
        self._merges: list[_Merge] = []

    # -- client -> node ------------------------------------------------------------------

    def client_message(self, msg: Any) -> ClientDecision:
        if isinstance(msg, list):
            return self._batch(msg)
        refusal = self._check(msg)
        if refusal is None:
            return ClientDecision(forward=msg)
        return ClientDecision(answer=refusal if refusal else None)

    def _batch(self, batch: list[Any]) -> ClientDecision:
        if not batch:
            return ClientDecision(answer=error_response(None, INVALID_REQUEST))
        if len(batch) > self.max_batch:
            return ClientDecision(
                answer=error_response(None, BATCH_TOO_LARGE, {"maxBatch": self.max_batch})
            )
        forward: list[Any] = []
        answers: list[dict[str, Any]] = []
        for element in batch:
            refusal = self._check(element)
            if refusal is None:
                forward.append(element)
            elif refusal:
                answers.append(refusal)
        if not answers:
            return ClientDecision(
                forward=batch if len(forward) == len(batch) else forward,
                changed=len(forward) != len(batch),
            )
        ids = frozenset(k for e in forward if (k := _key(e.get("id"))) is not None)
        if not forward or not ids:
            return ClientDecision(forward=forward or None, changed=True, answer=answers)
        self._merges.append(_Merge(ids, answers))
        return ClientDecision(forward=forward, changed=True)

    def _check(self, req: Any) -> dict[str, Any] | Literal[False] | None:
        """None: forward. A dict: the relay's answer. False: drop silently (notification)."""
        if not isinstance(req, dict) or not isinstance(req.get("method"), str):
            req_id = req.get("id") if isinstance(req, dict) else None
            return error_response(req_id, INVALID_REQUEST)
        method: str = req["method"]
        has_id = "id" in req
        if not self.policy.allows(method):
            return error_response(req["id"], METHOD_NOT_ALLOWED) if has_id else False
        if self._buckets:
            cost = weight(method)
            for bucket in self._buckets:
                if not bucket.take(cost):
                    return error_response(req["id"], RATE_LIMITED) if has_id else False
        req_id = _key(req.get("id"))
        if is_subscribe(method):
            if len(self.subscriptions) + len(self._pending_subs) >= self.max_subscriptions:
                if not has_id:
                    return False
                return error_response(
                    req["id"], TOO_MANY_SUBSCRIPTIONS, {"maxSubscriptions": self.max_subscriptions}
                )
            if req_id is not None:
                self._pending_subs.add(req_id)
        elif is_unsubscribe(method):
            params = req.get("params")
            if isinstance(params, list) and params and (sub := _key(params[0])) is not None:
                self.subscriptions.discard(sub)
        elif method == "rpc_methods" and req_id is not None:
            self._pending_methods.add(req_id)
        if req_id is not None:
            self._pending[req_id] = self._clock()
        return None

    # -- node -> client ------------------------------------------------------------------

    def node_message(self, msg: Any) -> Any | None:
        """Update state from a node message; return a replacement, or None to pass it as is."""
        if isinstance(msg, dict):
            return self._node_item(msg)
        if not isinstance(msg, list):
            return None
        replaced = False
        out: list[Any] = []
        for item in msg:
            new = self._node_item(item) if isinstance(item, dict) else None
            if new is DROP:
                replaced = True
                continue
            replaced = replaced or new is not None
            out.append(item if new is None else new)
        if self._merges:
            ids = frozenset(
                k for i in msg if isinstance(i, dict) and (k := _key(i.get("id"))) is not None
            )
            for n, merge in enumerate(self._merges):
                if merge.ids == ids:
                    del self._merges[n]
                    return out + merge.answers
        if replaced and not out:
            return DROP
        return out if replaced else None

    def _node_item(self, item: dict[str, Any]) -> Any:
        if "id" in item:
            req_id = _key(item["id"])
            if req_id is None:
                return None
            sent = self._pending.pop(req_id, None)
            if sent is None:
                if req_id in self._timed_out:  # the relay already answered with a timeout
                    del self._timed_out[req_id]
                    return DROP
            elif self._observe is not None:
                self._observe(self._clock() - sent)
            if not (self._pending_subs or self._pending_methods):
                return None
            if req_id in self._pending_subs:
                self._pending_subs.discard(req_id)
                sub = _key(item.get("result"))
                if sub is not None and "error" not in item:
                    self.subscriptions.add(sub)
            elif req_id in self._pending_methods:
                self._pending_methods.discard(req_id)
                return self._filter_methods(item)
            return None
        params = item.get("params")
        if isinstance(params, dict) and self.subscriptions:
            result = params.get("result")
            if _ends_subscription(item.get("method"), result):
                sub = _key(params.get("subscription"))
                if sub is not None:
                    self.subscriptions.discard(sub)
        return None

    # -- time -----------

    @property
    def in_flight(self) -> int:
        """Requests sent to the node and not answered yet."""
        return len(self._pending)

    def expire(self) -> list[dict[str, Any]]:
        """Timeout errors for requests older than ``request_timeout`` (oldest first).

        The relay answers them itself and drops the node's answer if it comes later; it
        never sends a request again (a submission is never retried).
        """
        pending = self._pending
        if not pending:
            return []
        deadline = self._clock() - self.request_timeout
        expired: list[dict[str, Any]] = []
        for req_id, sent in pending.items():
            if sent > deadline:
                break
            expired.append(error_response(req_id, REQUEST_TIMEOUT))
        for answer in expired:
            req_id = answer["id"]
            del pending[req_id]
            self._pending_subs.discard(req_id)
            self._pending_methods.discard(req_id)
            self._timed_out[req_id] = None
            if len(self._timed_out) > MAX_TIMED_OUT_IDS:
                del self._timed_out[next(iter(self._timed_out))]
        return expired

    def _filter_methods(self, item: dict[str, Any]) -> dict[str, Any] | None:
        result = item.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("methods"), list):
            return None
        allowed = [m for m in result["methods"] if isinstance(m, str) and self.policy.allows(m)]
        return {**item, "result": {**result, "methods": allowed}}


def _ends_subscription(method: Any, result: Any) -> bool:
    if method == "author_extrinsicUpdate":
        if isinstance(result, str):
            return result in _TERMINAL_TX_STATES
        return isinstance(result, dict) and not _TERMINAL_TX_STATES.isdisjoint(result)
    if method in ("transactionWatch_v1_watchEvent", "chainHead_v1_followEvent"):
        event = result.get("event") if isinstance(result, dict) else None
        return event in ("finalized", "error", "invalid", "dropped", "stop")
    return False
