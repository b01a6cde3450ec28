"""JSON-RPC 2.0 bookkeeping of one session, shared by ``/relay`` and ``/rpc``; no I/O.

:class:`RpcSession` sits between the client and the node of one session. For each client
request it decides what reaches the node and what the relay answers itself (a method the
policy refuses, a rate limit, a subscription over the cap, a malformed element). For each
node message it tracks answers (timeouts, round-trip times), subscriptions, and filters
lists of methods. It never sees sockets; the edge encodes and sends what it returns.

Invariants:

* The node never receives a refused call, and never holds more than
  ``max_subscriptions`` subscriptions of this session: a subscription counts from the
  moment its subscribe call is sent until the node confirms its end (an unsubscribe
  answered ``true``, or a final notification). Subscribe calls need a string or integer
  id not already in flight, so that their answers can be counted.
* The client gets exactly one answer per request id it sent: the node's, or the relay's
  (refusal or timeout, after which a late node answer is dropped). A batch gets exactly one
  array: refused elements are merged into the node's answer to the allowed ones (sent
  with ids of the relay's own, so the answer is recognised even when the client reuses
  ids, and given back their client ids), or answered at once when the node will not
  answer anything of it. A late answer to a timed-out subscribe still creates a subscription at the
  node; the relay ends it itself (``outbox``), since the client never learned its id.
* Any ``{"methods": [...]}`` result (the answer to ``rpc_methods``) lists only methods the
  policy allows, whatever id the call had.

The error codes the relay uses itself are the constants below (``docs/protocol.md``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
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
INVALID_REQUEST: Final = -32600  # not a request object, an empty batch, an untrackable sub id
METHOD_NOT_ALLOWED: Final = -32601  # the relay's method policy refuses the method
TOO_MANY_SUBSCRIPTIONS: Final = -32005  # RELAY_MAX_SUBSCRIPTIONS_PER_SESSION reached
REQUEST_TIMEOUT: Final = -32008  # the node did not answer within RELAY_REQUEST_TIMEOUT
BATCH_TOO_LARGE: Final = -32010  # more elements than RELAY_MAX_BATCH
RATE_LIMITED: Final = -32029  # RELAY_RATE_LIMIT or RELAY_RATE_LIMIT_PER_CLIENT exceeded

MESSAGES: Final = {
    PARSE_ERROR: "Parse error",
    INVALID_REQUEST: "Invalid request",
    METHOD_NOT_ALLOWED: "Method not allowed by the relay",
    TOO_MANY_SUBSCRIPTIONS: "Too many subscriptions in this session",
    BATCH_TOO_LARGE: "Batch too large",
    RATE_LIMITED: "Too many requests, slow down",
    REQUEST_TIMEOUT: "The node did not answer in time",
}

#: Returned by :meth:`RpcSession.node_message` for a message the client must not get.
DROP: Final = object()

#: How many timed-out request ids are remembered to drop their late answers.
MAX_TIMED_OUT_IDS: Final = 1024

#: Subscribe methods whose name does not say so, with their unsubscribe methods.
_SUBSCRIBE_PAIRS: Final = {
    "author_submitAndWatchExtrinsic": "author_unwatchExtrinsic",
    "chainHead_v1_follow": "chainHead_v1_unfollow",
    "transactionWatch_v1_submitAndWatch": "transactionWatch_v1_unwatch",
}
_UNSUBSCRIBE: Final = frozenset(_SUBSCRIBE_PAIRS.values())
_TERMINAL_TX_STATES: Final = frozenset(
    {"finalized", "usurped", "dropped", "invalid", "finalityTimeout", "retracted_final"}
)
_TERMINAL_TX_EVENTS: Final = frozenset({"finalized", "error", "invalid", "dropped"})
_OWN_ID_PREFIX: Final = "ghostcloak-relay/"

# kinds of requests in flight
_PLAIN: Final = 0
_SUB: Final = 1
_UNSUB: Final = 2
_OWN: Final = 3


_KINDS: Final[dict[str, int]] = {}
_MAX_KINDS: Final = 4096  # method names come from clients: bound the memo


def _kind_of(method: str) -> int:
    """Subscribe, unsubscribe or plain: memoized, as the same few methods recur."""
    kind = _KINDS.get(method)
    if kind is None:
        lower = method.lower()
        if method in _UNSUBSCRIBE or "unsubscribe" in lower:
            kind = _UNSUB
        elif method in _SUBSCRIBE_PAIRS or "subscribe" in method:
            kind = _SUB
        else:
            kind = _PLAIN
        if len(_KINDS) < _MAX_KINDS:
            _KINDS[method] = kind
    return kind


def unsubscribe_method(method: str) -> str:
    """``chain_subscribeNewHeads`` -> ``chain_unsubscribeNewHeads`` (and the named pairs)."""
    return _SUBSCRIBE_PAIRS.get(method) or method.replace("_subscribe", "_unsubscribe", 1)


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


class RpcSession:
    """Policy, rate limits, answers in flight and subscriptions of one session."""

    __slots__ = (
        "_buckets",
        "_clock",
        "_merges",
        "_observe",
        "_own_ids",
        "_pending",
        "_subs_in_flight",
        "_timed_out",
        "max_batch",
        "max_subscriptions",
        "outbox",
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
        #: request id -> (sent at, kind, data): subscribe method / unsubscribed id / None
        self._pending: dict[int | str, tuple[float, int, Any]] = {}
        self._timed_out: dict[int | str, tuple[int, Any]] = {}  # answered by the relay
        self._subs_in_flight = 0  # subscribe calls sent, not answered (timed out included)
        self.subscriptions: dict[int | str, str] = {}  # live at the node -> subscribe method
        #: batch number -> (relay id -> client id, the relay's answers to merge in)
        self._merges: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        self._own_ids = itertools.count(1)
        #: requests of the relay's own for the node (ending orphaned subscriptions)
        self.outbox: list[dict[str, Any]] = []

    @property
    def subscription_count(self) -> int:
        return len(self.subscriptions) + self._subs_in_flight

    # -- client -> node -------------------------------------------------------------------

    def client_message(self, msg: Any) -> ClientDecision:
        decision = self.client_request(msg)
        return ClientDecision(forward=msg) if decision is None else decision

    def forward_plain(self, msg: Any) -> bool:
        """Hot path: the common request (an object with a string or integer id, an allowed
        method that neither subscribes nor unsubscribes, within the rate limits) is tracked
        and True returned: forward it unchanged. False: nothing was done or spent; use
        :meth:`client_request`. The checks are those of :meth:`_check`, in the same order."""
        if type(msg) is not dict:
            return False
        method = msg.get("method")
        req_id = msg.get("id")
        if (
            type(method) is not str
            or (type(req_id) is not int and type(req_id) is not str)
            or _KINDS.get(method) != _PLAIN
            or not self.policy.allows(method)
        ):
            return False
        if self._buckets:
            cost = weight(method)
            buckets = self._buckets
            if not all(b.would_take(cost) for b in buckets):
                return False  # the slow path refuses it, with the proper answer
            for bucket in buckets:
                bucket.take(cost)
        self._pending[req_id] = (self._clock(), _PLAIN, None)
        return True

    def answered_plain(self, msg: Any) -> bool:
        """Hot path: the node's answer to a tracked plain request, not a methods list:
        bookkeeping done, True returned: pass it to the client as is. False: nothing was
        done; use :meth:`node_message`."""
        if type(msg) is not dict:
            return False
        req_id = msg.get("id")
        if type(req_id) is not int and type(req_id) is not str:
            return False
        entry = self._pending.get(req_id)
        if entry is None or entry[1] != _PLAIN or type(msg.get("result")) is dict:
            return False
        del self._pending[req_id]
        if self._observe is not None:
            self._observe(self._clock() - entry[0])
        return True

    def client_request(self, msg: Any) -> ClientDecision | None:
        """As :meth:`client_message`, but None for the common case "forward it as is"
        (saves an allocation per request on the hot path)."""
        if type(msg) is list:
            return self._batch(msg)
        verdict = self._check(msg)
        if type(verdict) is tuple:
            if "id" in msg:
                self._track(msg["id"], *verdict)
            return None
        return ClientDecision(answer=verdict or None)

    def _batch(self, batch: list[Any]) -> ClientDecision:
        if not batch:
            return ClientDecision(answer=error_response(None, INVALID_REQUEST))
        if len(batch) > self.max_batch:
            return ClientDecision(
                answer=error_response(None, BATCH_TOO_LARGE, {"maxBatch": self.max_batch})
            )
        forward: list[tuple[dict[str, Any], int, Any]] = []
        answers: list[dict[str, Any]] = []
        for element in batch:
            verdict = self._check(element)
            if isinstance(verdict, tuple):
                forward.append((element, *verdict))
            elif verdict:
                answers.append(verdict)
        answered = [f for f in forward if "id" in f[0]]
        if not answers or not answered:
            for element, kind, data in answered:
                self._track(element["id"], kind, data)
            elements = [f[0] for f in forward]
            if not answers:
                if not elements:  # only refused notifications: nothing to send or say
                    return ClientDecision()
                changed = len(elements) != len(batch)
                return ClientDecision(forward=elements if changed else batch, changed=changed)
            # the node will not answer what is forwarded (notifications only): answer now
            return ClientDecision(forward=elements or None, changed=True, answer=answers)
        # Refusals must be merged into the node's answer to the rest: give the forwarded
        # elements ids of the relay's own, so that answer is recognised exactly (a client
        # may reuse ids across batches), and restore the client's ids when it comes.
        batch_no = next(self._own_ids)
        aliases: dict[str, Any] = {}
        elements = []
        for n, (element, kind, data) in enumerate(forward):
            if "id" in element:
                alias = f"{_OWN_ID_PREFIX}{batch_no}.{n}"
                aliases[alias] = element["id"]
                self._track(alias, kind, data)
                element = {**element, "id": alias}
            elements.append(element)
        self._merges[batch_no] = (aliases, answers)
        return ClientDecision(forward=elements, changed=True)

    def _check(self, req: Any) -> dict[str, Any] | Literal[False] | tuple[int, Any]:
        """A dict: the relay's answer. False: drop silently (a refused notification).
        A (kind, data) pair: forward it, and track its answer as that kind."""
        if not isinstance(req, dict) or not isinstance(req.get("method"), str):
            return error_response(req.get("id") if isinstance(req, dict) else None, INVALID_REQUEST)
        method: str = req["method"]
        has_id = "id" in req
        if not self.policy.allows(method):
            return error_response(req["id"], METHOD_NOT_ALLOWED) if has_id else False
        if self._buckets:
            cost = weight(method)
            for bucket in self._buckets:
                if not bucket.take(cost):
                    return error_response(req["id"], RATE_LIMITED) if has_id else False
        kind = _kind_of(method)
        if kind == _SUB:
            req_id = _key(req.get("id"))
            if not has_id:  # the node does not run notifications
                return False
            if req_id is None or req_id in self._pending:
                return error_response(
                    req["id"],
                    INVALID_REQUEST,
                    {"reason": "a subscribe call needs a string or integer id not in use"},
                )
            if self.subscription_count >= self.max_subscriptions:
                return error_response(
                    req["id"], TOO_MANY_SUBSCRIPTIONS, {"maxSubscriptions": self.max_subscriptions}
                )
            self._subs_in_flight += 1
            return (_SUB, method)
        if kind == _UNSUB:
            params = req.get("params")
            if isinstance(params, list) and params:
                return (_UNSUB, _key(params[0]))
        return (_PLAIN, None)

    def _track(self, req_id: Any, kind: int, data: Any) -> None:
        key = _key(req_id)
        if key is not None:
            self._pending[key] = (self._clock(), kind, data)
        elif kind == _SUB:  # cannot happen: subscribe calls need a trackable id
            self._subs_in_flight -= 1

    # -- node -> client -------------------------------------------------------------------

    def node_message(self, msg: Any) -> Any:
        """Update state from a node message; return a replacement, :data:`DROP`, or None
        to pass it as is. Afterwards, send whatever :attr:`outbox` holds to the node."""
        if isinstance(msg, dict):
            return self._node_item(msg)
        if not isinstance(msg, list):
            return None
        merge = self._merge_for(msg) if self._merges else None
        replaced = merge is not None
        out: list[Any] = []
        for item in msg:
            new = self._node_item(item) if isinstance(item, dict) else None
            if new is DROP:
                replaced = True
                continue
            if merge is not None and isinstance(item, dict) and item.get("id") in merge[0]:
                new = {**(item if new is None else new), "id": merge[0][item["id"]]}
            replaced = replaced or new is not None
            out.append(item if new is None else new)
        if merge is not None:
            out += merge[1]
        if replaced and not out:
            return DROP
        return out if replaced else None

    def _merge_for(self, msg: list[Any]) -> tuple[dict[str, Any], list[Any]] | None:
        """The pending merge this batch answer belongs to (by the relay's own ids)."""
        for item in msg:
            req_id = item.get("id") if isinstance(item, dict) else None
            if isinstance(req_id, str) and req_id.startswith(_OWN_ID_PREFIX):
                number = req_id[len(_OWN_ID_PREFIX) :].split(".", 1)[0]
                if number.isdigit() and "." in req_id:
                    return self._merges.pop(int(number), None)
        return None

    def _node_item(self, item: dict[str, Any]) -> Any:
        if "id" not in item:
            self._notification(item)
            return None
        req_id = _key(item["id"])
        if req_id is None:
            return self._filter_methods(item)
        entry = self._pending.pop(req_id, None)
        if entry is None:
            late = self._timed_out.pop(req_id, None)
            if late is None:
                return self._filter_methods(item)
            self._answered(late[0], late[1], item)
            orphan = _key(item.get("result"))
            if late[0] == _SUB and orphan is not None and orphan in self.subscriptions:
                self._orphaned(orphan)
            return DROP  # the relay already answered this id with a timeout
        sent, kind, data = entry
        if self._observe is not None:
            self._observe(self._clock() - sent)
        self._answered(kind, data, item)
        if kind == _OWN:
            return DROP
        return self._filter_methods(item)

    def _answered(self, kind: int, data: Any, item: dict[str, Any]) -> None:
        ok = "error" not in item
        if kind == _SUB:
            self._subs_in_flight -= 1
            sub = _key(item.get("result"))
            if ok and sub is not None:
                self.subscriptions[sub] = data
        elif kind in (_UNSUB, _OWN) and data is not None and item.get("result") is True:
            self.subscriptions.pop(data, None)

    def _orphaned(self, sub: int | str) -> None:
        """A subscription the client never learned of: the relay ends it itself."""
        own = f"{_OWN_ID_PREFIX}{next(self._own_ids)}"
        method = unsubscribe_method(self.subscriptions[sub])
        self._pending[own] = (self._clock(), _OWN, sub)
        self.outbox.append({"jsonrpc": "2.0", "id": own, "method": method, "params": [sub]})

    def _notification(self, item: dict[str, Any]) -> None:
        params = item.get("params")
        if not self.subscriptions or not isinstance(params, dict):
            return
        if _ends_subscription(item.get("method"), params.get("result")):
            sub = _key(params.get("subscription"))
            if sub is not None:
                self.subscriptions.pop(sub, None)

    def _filter_methods(self, item: dict[str, Any]) -> dict[str, Any] | None:
        result = item.get("result")
        if type(result) is not dict or not isinstance(result.get("methods"), list):
            return None
        allowed = [m for m in result["methods"] if isinstance(m, str) and self.policy.allows(m)]
        return {**item, "result": {**result, "methods": allowed}}

    # -- time -----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests of the client sent to the node and not answered yet."""
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
        expired: list[int | str] = []
        for req_id, (sent, _, _) in pending.items():
            if sent > deadline:
                break
            expired.append(req_id)
        answers = []
        for req_id in expired:
            _, kind, data = pending.pop(req_id)
            self._timed_out[req_id] = (kind, data)
            if len(self._timed_out) > MAX_TIMED_OUT_IDS:
                old_kind, _ = self._timed_out.pop(next(iter(self._timed_out)))
                if old_kind == _SUB:  # forgotten for good: stop counting it
                    self._subs_in_flight -= 1
            if kind != _OWN:
                answers.append(error_response(self._client_id(req_id), REQUEST_TIMEOUT))
        return answers

    def _client_id(self, req_id: int | str) -> Any:
        """The client's id for a request the relay gave an id of its own (in a batch)."""
        if isinstance(req_id, str) and req_id.startswith(_OWN_ID_PREFIX):
            number = req_id[len(_OWN_ID_PREFIX) :].split(".", 1)[0]
            if number.isdigit():
                merge = self._merges.get(int(number))
                if merge is not None:
                    return merge[0].get(req_id, req_id)
        return req_id

    def take_outbox(self) -> list[dict[str, Any]]:
        out, self.outbox = self.outbox, []
        return out


def _ends_subscription(method: Any, result: Any) -> bool:
    """Does this notification end its subscription at the node?"""
    if method == "author_extrinsicUpdate":
        if isinstance(result, str):
            return result in _TERMINAL_TX_STATES
        return isinstance(result, dict) and not _TERMINAL_TX_STATES.isdisjoint(result)
    if method == "transactionWatch_v1_watchEvent":
        return isinstance(result, dict) and result.get("event") in _TERMINAL_TX_EVENTS
    if method == "chainHead_v1_followEvent":
        return isinstance(result, dict) and result.get("event") == "stop"
    return False
