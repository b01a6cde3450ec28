"""Property-based and fuzz tests: the JSON-RPC session logic, the method policy, the live relay.

1. :class:`~ghostcloak_relay.rpc.RpcSession` against :class:`FakeNode`, a node with
   jsonrpsee semantics (notifications are neither run nor answered; an unsubscribe only
   ends a subscription of its own method; answers arrive in any order, a subscription's
   notifications only after its answer). Hypothesis drives arbitrary requests, batches,
   junk elements and ids, and checks the invariants (a)-(g) listed at
   :func:`test_rpc_session_invariants`.
2. :mod:`~ghostcloak_relay.policy`: ``parse_allowlist`` never lets an unsafe method through,
   and ``MethodPolicy.allows`` is exactly its definition.
3. A live fuzz: raw WebSocket connections throw a bounded, seeded stream of garbage and
   half-valid envelopes at a relay while a well-behaved client keeps doing round trips.

Below the properties are small regression tests, one per bug the properties found, each
with the smallest input known to show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import string
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ghostcloak_relay.devnode import DevNode
from ghostcloak_relay.policy import (
    SAFE_METHODS,
    SAFE_POLICY,
    UNSAFE_METHODS,
    MethodPolicy,
    PolicyError,
    parse_allowlist,
)
from ghostcloak_relay.protocol import (
    ERROR_MESSAGES,
    EndReason,
    ErrorCode,
    is_valid_session_id,
    loads_exact,
)
from ghostcloak_relay.rpc import (
    DROP,
    INVALID_REQUEST,
    MESSAGES,
    METHOD_NOT_ALLOWED,
    RATE_LIMITED,
    TOO_MANY_SUBSCRIPTIONS,
    ClientDecision,
    RpcSession,
)
from ghostcloak_relay.server import RelayServer

from .conftest import RelayFactory, eventually, relay_url
from .rawws import frame, handshake, read_frame

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces, no flakiness
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- a node with jsonrpsee semantics ------------------------------------------------------

#: subscribe method -> (its unsubscribe method, its notification method)
SUBSCRIPTIONS: dict[str, tuple[str, str]] = {
    "chain_subscribeNewHeads": ("chain_unsubscribeNewHeads", "chain_newHead"),
    "chain_subscribeNewHead": ("chain_unsubscribeNewHead", "chain_newHead"),
    "chain_subscribeFinalizedHeads": ("chain_unsubscribeFinalizedHeads", "chain_finalizedHead"),
    "chain_subscribeFinalisedHeads": ("chain_unsubscribeFinalisedHeads", "chain_finalizedHead"),
    "chain_subscribeAllHeads": ("chain_unsubscribeAllHeads", "chain_allHead"),
    "chain_subscribeRuntimeVersion": ("chain_unsubscribeRuntimeVersion", "state_runtimeVersion"),
    "state_subscribeRuntimeVersion": ("state_unsubscribeRuntimeVersion", "state_runtimeVersion"),
    "state_subscribeStorage": ("state_unsubscribeStorage", "state_storage"),
    "author_submitAndWatchExtrinsic": ("author_unwatchExtrinsic", "author_extrinsicUpdate"),
    "chainHead_v1_follow": ("chainHead_v1_unfollow", "chainHead_v1_followEvent"),
    "transactionWatch_v1_submitAndWatch": (
        "transactionWatch_v1_unwatch",
        "transactionWatch_v1_watchEvent",
    ),
}
UNSUBSCRIBE_OF: dict[str, str] = {unsub: sub for sub, (unsub, _) in SUBSCRIPTIONS.items()}

#: Notification results by notification method: (not ending the subscription, ending it).
#: Substrate's TransactionStatus ends on finalized/usurped/finalityTimeout/dropped/invalid;
#: the new JSON-RPC spec's transactionWatch ends on finalized/error/invalid/dropped, and a
#: chainHead follow only on ``stop`` (its ``finalized`` event reports finalized blocks).
EVENTS: dict[str, tuple[list[Any], list[Any]]] = {
    "author_extrinsicUpdate": (
        ["future", "ready", {"broadcast": ["peer"]}, {"inBlock": "0x01"}, {"retracted": "0x01"}],
        [
            {"finalized": "0x02"},
            {"usurped": "0x03"},
            {"finalityTimeout": "0x04"},
            "dropped",
            "invalid",
        ],
    ),
    "transactionWatch_v1_watchEvent": (
        [{"event": "validated"}, {"event": "bestChainBlockIncluded", "block": None}],
        [
            {"event": "finalized", "block": {"hash": "0x01", "index": 0}},
            {"event": "error", "error": "x"},
            {"event": "invalid", "error": "x"},
            {"event": "dropped", "error": "x"},
        ],
    ),
    "chainHead_v1_followEvent": (
        [
            {"event": "initialized", "finalizedBlockHashes": ["0x01"]},
            {"event": "newBlock", "blockHash": "0x02", "parentBlockHash": "0x01"},
            {"event": "bestBlockChanged", "bestBlockHash": "0x02"},
            {"event": "finalized", "finalizedBlockHashes": ["0x02"], "prunedBlockHashes": []},
        ],
        [{"event": "stop"}],
    ),
}
HEAD = {"number": "0x1", "parentHash": "0x00"}

#: What the fake node serves (random names get "Method not found").
NODE_METHODS = frozenset(
    SAFE_METHODS | UNSAFE_METHODS | SUBSCRIPTIONS.keys() | UNSUBSCRIBE_OF.keys()
)
#: The node's answer to rpc_methods: everything it serves, plus junk entries.
NODE_METHOD_LIST: list[Any] = [*sorted(NODE_METHODS), "midnight_x", 5, None, {"m": 1}]


def ok(rid: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def node_error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


@dataclass
class Outgoing:
    """A node answer on its way to the relay, and the client message it answers."""

    origin: int
    message: Any
    new_subs: list[str]


@dataclass
class FakeNode:
    """The node of one session: it runs what the relay forwards at once, but its answers
    wait in ``outbox`` until the test delivers them (in any order). Like jsonrpsee it does
    not run notifications, ends a subscription only through the unsubscribe method of the
    same subscription family, and answers an empty batch with an error."""

    subs: dict[str, str] = field(default_factory=dict)  # live subscription -> subscribe method
    announced: list[str] = field(default_factory=list)  # subscriptions the relay has seen
    outbox: list[Outgoing] = field(default_factory=list)
    received: list[Any] = field(default_factory=list)  # every element the node was sent
    counter: int = 0
    most_subs: int = 0  # the most live subscriptions the node held at any time

    def receive(self, origin: int, forward: Any) -> None:
        created: list[str] = []
        answer: Any
        if isinstance(forward, list):
            self.received.extend(forward)
            if not forward:
                answer = node_error(None, INVALID_REQUEST, "Invalid request: empty batch")
            else:
                answers = [a for e in forward if (a := self._call(e, created)) is not None]
                answer = answers or None
        else:
            self.received.append(forward)
            answer = self._call(forward, created)
        if answer is not None:
            self.outbox.append(Outgoing(origin, answer, created))

    def _call(self, req: Any, created: list[str]) -> dict[str, Any] | None:
        if not isinstance(req, dict) or not isinstance(req.get("method"), str):
            return node_error(None, INVALID_REQUEST, "Invalid request")
        if "id" not in req:
            return None  # a notification: not run, not answered
        rid, method, params = req["id"], req["method"], req.get("params")
        if method in SUBSCRIPTIONS:
            sub = f"sub-{self.counter}"
            self.counter += 1
            self.subs[sub] = method
            created.append(sub)
            self.most_subs = max(self.most_subs, len(self.subs))
            return ok(rid, sub)
        if method in UNSUBSCRIBE_OF:
            sub = params[0] if isinstance(params, list) and params else None
            if isinstance(sub, str) and self.subs.get(sub) == UNSUBSCRIBE_OF[method]:
                del self.subs[sub]
                if sub in self.announced:
                    self.announced.remove(sub)
                return ok(rid, True)
            return ok(rid, False)
        if method == "rpc_methods":
            return ok(rid, {"version": 1, "methods": NODE_METHOD_LIST})
        if method in NODE_METHODS:
            return ok(rid, f"ok:{method}")
        return node_error(rid, -32601, "Method not found")

    def deliver(self, index: int) -> Outgoing:
        out = self.outbox.pop(index)
        self.announced.extend(s for s in out.new_subs if s in self.subs)
        return out

    def notification(self, index: int, choice: int, terminal: bool) -> dict[str, Any]:
        """A notification of an announced subscription; a terminal one ends it."""
        sub = self.announced[index % len(self.announced)]
        notif = SUBSCRIPTIONS[self.subs[sub]][1]
        going, ending = EVENTS.get(notif, ([HEAD], []))
        if terminal and ending:
            result = ending[choice % len(ending)]
            del self.subs[sub]
            self.announced.remove(sub)
        else:
            result = going[choice % len(going)]
        return {
            "jsonrpc": "2.0",
            "method": notif,
            "params": {"subscription": sub, "result": result},
        }


# -- strategies ---------------------------------------------------------------------------

KEY_NAMES = ["jsonrpc", "params", "result", "error", "subscription", "methods", "event", "x"]
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.sampled_from(KEY_NAMES) | st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)

SUBSCRIBE_METHODS = sorted(SUBSCRIPTIONS)
UNSUBSCRIBE_METHODS = sorted(UNSUBSCRIBE_OF)
OTHER_METHODS = ["rpc_methods", "midnight_ledgerVersion", "payment_queryInfo", "chainHead_v1_body"]
methods = st.one_of(
    st.sampled_from(SUBSCRIBE_METHODS),
    st.sampled_from(UNSUBSCRIBE_METHODS),
    st.sampled_from(sorted(SAFE_METHODS)),
    st.sampled_from(sorted(UNSAFE_METHODS)),
    st.sampled_from(OTHER_METHODS),
    st.text(max_size=16),
)
#: How a request carries its id: fresh unique int or string, null, or none (notification).
ID_KINDS = st.sampled_from(["int", "int", "str", "null", "none"])

#: ("req", method, subscription index for unsubscribes, params, id kind)
request_templates = st.tuples(
    st.just("req"), methods, st.integers(0, 8), st.lists(json_scalars, max_size=2), ID_KINDS
)
#: ("junk", a non-object or an object without a string method, id kind)
junk_templates = st.tuples(
    st.just("junk"),
    json_scalars
    | st.lists(json_scalars, max_size=2)
    | st.fixed_dictionaries({"jsonrpc": st.just("2.0")})
    | st.fixed_dictionaries(
        {"jsonrpc": st.just("2.0"), "method": json_scalars.filter(lambda v: not isinstance(v, str))}
    ),
    ID_KINDS,
)
element_templates = st.one_of(request_templates, request_templates, junk_templates)


@functools.cache
def message_templates(max_batch: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        element_templates, element_templates, st.lists(element_templates, max_size=max_batch + 2)
    )


class Ids:
    """Fresh request ids, unique across a session, so answers can be matched exactly."""

    def __init__(self) -> None:
        self.n = 0

    def fresh(self, kind: str) -> Any:
        self.n += 1
        return self.n if kind == "int" else f"id-{self.n}"


def materialize(template: Any, ids: Ids) -> Any:
    if isinstance(template, list):
        return [materialize(t, ids) for t in template]
    if template[0] == "req":
        _, method, sub_index, params, kind = template
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if method in UNSUBSCRIBE_OF or "unsubscribe" in method.lower():
            req["params"] = [f"sub-{sub_index}"]
        else:
            req["params"] = params
    else:
        _, value, kind = template
        if not isinstance(value, dict):
            return value
        req = dict(value)
    if kind == "null":
        req["id"] = None
    elif kind != "none":
        req["id"] = ids.fresh(kind)
    return req


# -- the oracle ---------------------------------------------------------------------------

NO_ANSWER = object()


def answer_id(element: Any) -> Any:
    """The id the client must get an answer with (NO_ANSWER for a valid notification)."""
    if isinstance(element, dict) and isinstance(element.get("method"), str):
        return element.get("id", NO_ANSWER)
    return element.get("id") if isinstance(element, dict) else None


def token(value: Any) -> bytes:
    return orjson.dumps(value)  # 1, "1", true and null stay apart


def expected_answer(msg: Any, max_batch: int) -> tuple[str, list[bytes]]:
    """("none", []), ("single", [id]) or ("array", sorted ids) for one client message."""
    if isinstance(msg, list):
        if not msg or len(msg) > max_batch:
            return "single", [token(None)]
        ids = [token(i) for e in msg if (i := answer_id(e)) is not NO_ANSWER]
        return ("array", sorted(ids)) if ids else ("none", [])
    i = answer_id(msg)
    return ("none", []) if i is NO_ANSWER else ("single", [token(i)])


def elements(msg: Any) -> list[Any]:
    return msg if isinstance(msg, list) else [msg]


def check_forward(policy: MethodPolicy, msg: Any, decision: ClientDecision) -> None:
    """(a): only allowed methods reach the node, never an unsafe one, never an empty batch;
    what is forwarded is taken from the client's message; unchanged means identical."""
    forward = decision.forward
    if forward is None:
        return
    assert forward != [], f"an empty batch is forwarded to the node for {msg!r}"
    originals = [id(e) for e in elements(msg)]
    for element in elements(forward):
        assert isinstance(element, dict), f"non-object forwarded: {element!r}"
        method = element.get("method")
        assert isinstance(method, str), f"element without method forwarded: {element!r}"
        assert method not in UNSAFE_METHODS, f"unsafe method forwarded: {method!r}"
        assert policy.allows(method), f"refused method forwarded: {method!r}"
        # taken from the client's message, as is or, in a batch whose refusals are merged
        # into the node's answer, with an id of the relay's own in place of the client's
        assert id(element) in originals or (
            str(element.get("id", "")).startswith("ghostcloak-relay/")
            and any(
                isinstance(e, dict) and {**e, "id": element["id"]} == element for e in elements(msg)
            )
        ), f"forwarded element not from the client: {element!r}"
    if not decision.changed:
        assert forward == msg, f"forward differs from {msg!r} but changed=False"


def check_methods_filtered(policy: MethodPolicy, item: Any) -> None:
    """(g): an rpc_methods answer lists exactly the node's methods the policy allows."""
    for element in elements(item):
        result = element.get("result") if isinstance(element, dict) else None
        if isinstance(result, dict) and isinstance(result.get("methods"), list):
            allowed = [m for m in NODE_METHOD_LIST if isinstance(m, str) and policy.allows(m)]
            assert result["methods"] == allowed, f"rpc_methods answer not filtered: {element!r}"


ALLOWLIST_TEXT = """\
# a generous wallet allowlist; the unsafe names in it must stay denied
rpc_methods
system_chain
system_name       # trailing comment
   system_peers
author_*
state_*
chain_subscribeNewHeads
chain_unsubscribeNewHeads
chainHead_v1_*
offchain_localStorageGet
dev_getBlockStats
"""
FILE_POLICY = parse_allowlist(ALLOWLIST_TEXT)
POLICY_BY_NAME = {"safe": SAFE_POLICY, "file": FILE_POLICY}
POLICIES = st.sampled_from(sorted(POLICY_BY_NAME))


# -- 1. RpcSession properties -----------------------------------------------------------


STEP_ACTIONS = st.sampled_from(["client"] * 3 + ["deliver"] * 2 + ["notify"])
TIMED_STEP_ACTIONS = st.sampled_from(["client"] * 3 + ["deliver", "notify", "tick", "tick"])
REQUEST_TIMEOUT = 10.0


class Model:
    """One session of RpcSession and FakeNode, driven step by step by Hypothesis; what the
    client receives is recorded by the client message it answers (its origin)."""

    def __init__(self, policy: MethodPolicy, max_subs: int, max_batch: int) -> None:
        self.policy = policy
        self.max_subs = max_subs
        self.max_batch = max_batch
        self.now = 0.0
        self.session = RpcSession(
            policy,
            max_subs,
            max_batch,
            request_timeout=REQUEST_TIMEOUT,
            clock=lambda: self.now,
        )
        self.node = FakeNode()
        self.ids = Ids()
        self.sent: list[Any] = []  # client messages; the index is the answers' origin
        self.got: dict[int, list[Any]] = {}  # what the client received, by origin
        self.forwarded: set[int] = set()  # id() of every element that reached the node
        self.origin_of: dict[bytes, int] = {}  # request id token -> origin

    def to_client(self, origin: int, message: Any) -> None:
        check_methods_filtered(self.policy, message)
        self.got.setdefault(origin, []).append(message)

    def client(self, msg: Any) -> None:
        origin = len(self.sent)
        self.sent.append(msg)
        for element in elements(msg):
            if isinstance(element, dict) and "id" in element:
                self.origin_of.setdefault(token(element["id"]), origin)
        decision = self.session.client_message(msg)
        check_forward(self.policy, msg, decision)
        if decision.answer is not None:
            self.to_client(origin, decision.answer)
        if decision.forward is not None:
            originals = elements(msg)
            for element in elements(decision.forward):
                source = next((e for e in originals if e is element), None) or next(
                    e
                    for e in originals  # sent with an id of the relay's own (see above)
                    if isinstance(e, dict) and {**e, "id": element["id"]} == element
                )
                self.forwarded.add(id(source))
            self.node.receive(origin, decision.forward)

    def deliver(self, index: int) -> None:
        out = self.node.deliver(index)
        replacement = self.session.node_message(out.message)
        if replacement is not DROP:
            self.to_client(out.origin, out.message if replacement is None else replacement)

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for answer in self.session.expire():
            self.to_client(self.origin_of[token(answer["id"])], answer)

    def check_cap(self) -> None:
        """(e) as the node sees it."""
        assert self.node.most_subs <= self.max_subs, (
            f"(e) the node holds {self.node.most_subs} subscriptions, cap {self.max_subs}; "
            f"the node was sent {self.node.received!r}"
        )

    def run(self, data: st.DataObject, actions: st.SearchStrategy[str]) -> None:
        for _ in range(data.draw(st.integers(1, 25), label="steps")):
            action = data.draw(actions)
            if action == "client":
                template = data.draw(message_templates(self.max_batch), label="message")
                self.client(materialize(template, self.ids))
            elif action == "deliver" and self.node.outbox:
                self.deliver(data.draw(st.integers(0, len(self.node.outbox) - 1), label="at"))
            elif action == "notify" and self.node.announced:
                notif = self.node.notification(
                    data.draw(st.integers(0, 10)),
                    data.draw(st.integers(0, 10)),
                    data.draw(st.booleans()),
                )
                assert self.session.node_message(notif) is None, "a notification was changed"
            elif action == "tick":
                self.tick(data.draw(st.sampled_from([REQUEST_TIMEOUT, 1.0])))
            self.check_cap()
        while self.node.outbox:  # the node answers everything in the end, in any order
            self.deliver(data.draw(st.integers(0, len(self.node.outbox) - 1), label="drain"))
            self.check_cap()


@FUZZ
@given(
    data=st.data(),
    policy_name=POLICIES,
    max_subs=st.integers(1, 3),
    max_batch=st.integers(1, 4),
)
def test_rpc_session_invariants(
    data: st.DataObject, policy_name: str, max_subs: int, max_batch: int
) -> None:
    """(a) nothing refused or unsafe reaches the node; (b) every refused element with an id
    gets one relay error with that id, at once or merged into the node's batch answer;
    (c) the client gets exactly one answer per request id (one array per batch); (d) no
    answer to notifications; (e) the node never holds more than max_subscriptions
    subscriptions; (g) rpc_methods answers are filtered. (f) is a test of its own."""
    model = Model(POLICY_BY_NAME[policy_name], max_subs, max_batch)
    model.run(data, STEP_ACTIONS)
    policy = model.policy
    for origin, msg in enumerate(model.sent):
        kind, want = expected_answer(msg, max_batch)
        answers = model.got.get(origin, [])
        if kind == "none":
            assert answers == [], f"(d) {msg!r} must get no answer, got {answers!r}"
            continue
        assert len(answers) == 1, f"(c) {msg!r} must get exactly one answer, got {answers!r}"
        answer = answers[0]
        if kind == "single":
            assert isinstance(answer, dict), f"(c) {msg!r} got {answer!r}"
            assert [token(answer.get("id"))] == want, f"(c) {msg!r} got {answer!r}"
            by_id = {token(answer.get("id")): answer}
        else:
            assert isinstance(answer, list), f"(c) batch {msg!r} got {answer!r}"
            assert sorted(token(a.get("id")) for a in answer) == want, (
                f"(c) batch {msg!r} got {answer!r}"
            )
            by_id = {token(a.get("id")): a for a in answer}
        if kind == "single" and isinstance(msg, list):
            continue  # empty or oversized batch: one error, nothing forwarded
        # (b): an element that did not reach the node is answered by the relay
        for element in elements(msg):
            if not isinstance(element, dict) or element.get("id") is None:
                continue  # ids that are absent or null cannot be told apart
            reply = by_id[token(element["id"])]
            method = element.get("method")
            if id(element) in model.forwarded:
                assert reply.get("error", {}).get("message") not in MESSAGES.values(), (
                    f"(b) {element!r} reached the node but the relay answered {reply!r}"
                )
                continue
            assert "error" in reply, f"(b) refused {element!r} got {reply!r}"
            code = reply["error"]["code"]
            if not isinstance(method, str):
                assert code == INVALID_REQUEST, f"(b) {element!r} got {reply!r}"
            elif not policy.allows(method):
                assert code == METHOD_NOT_ALLOWED, f"(b) {element!r} got {reply!r}"
            else:
                assert code == TOO_MANY_SUBSCRIPTIONS, f"(b) {element!r} got {reply!r}"
            assert reply["error"]["message"] == MESSAGES[code]


@FUZZ
@given(
    data=st.data(),
    policy_name=POLICIES,
    max_subs=st.integers(1, 3),
    max_batch=st.integers(1, 4),
)
def test_rpc_session_invariants_with_request_timeouts(
    data: st.DataObject, policy_name: str, max_subs: int, max_batch: int
) -> None:
    """With time passing, the relay answers slow requests itself (REQUEST_TIMEOUT) and
    drops the node's late answers. Still: every request id is answered exactly once
    (by the node, the policy or the timeout), notifications never, and the node never
    holds more subscriptions than the cap."""
    model = Model(POLICY_BY_NAME[policy_name], max_subs, max_batch)
    model.run(data, TIMED_STEP_ACTIONS)
    for origin, msg in enumerate(model.sent):
        kind, want = expected_answer(msg, max_batch)
        answers = model.got.get(origin, [])
        if kind == "none":
            assert answers == [], f"(d) {msg!r} must get no answer, got {answers!r}"
            continue
        got = sorted(token(a.get("id")) for answer in answers for a in elements(answer))
        assert [i for i in got if i != b"null"] == [i for i in want if i != b"null"], (
            f"(c) {msg!r}: each id must be answered once, got {answers!r}"
        )


node_shaped = st.one_of(
    st.fixed_dictionaries(
        {"jsonrpc": st.just("2.0"), "id": st.integers(0, 4) | st.sampled_from(["s", None])},
        optional={"result": json_values, "error": json_values},
    ),
    st.fixed_dictionaries(
        {
            "jsonrpc": st.just("2.0"),
            "method": st.sampled_from([*EVENTS, "chain_newHead"]) | json_values,
            "params": st.fixed_dictionaries(
                {},
                optional={
                    "subscription": st.sampled_from(["sub-0", "sub-1", 0]) | json_values,
                    "result": st.sampled_from(
                        ["finalized", "dropped", {"event": "stop"}, {"finalized": "0x1"}]
                    )
                    | json_values,
                },
            )
            | json_values,
        }
    ),
    st.fixed_dictionaries(
        {"id": st.integers(0, 4), "result": st.fixed_dictionaries({"methods": json_values})}
    ),
)
node_messages = st.one_of(json_values, node_shaped, st.lists(node_shaped | json_values, max_size=5))
small_ids = st.integers(0, 4) | st.sampled_from(["s", None, 1.5, True, [1], {"a": 1}])
client_shaped = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0"), "method": methods},
    optional={"id": small_ids, "params": st.lists(st.sampled_from(["sub-0", "sub-1", 0]))},
)
client_messages = st.one_of(
    json_values, client_shaped, st.lists(client_shaped | json_values, max_size=5)
)


@FUZZ
@given(
    steps=st.lists(
        st.tuples(st.just("client"), client_messages)
        | st.tuples(st.just("node"), node_messages)
        | st.tuples(st.just("tick"), st.sampled_from([1.0, REQUEST_TIMEOUT])),
        max_size=30,
    ),
    policy_name=POLICIES,
)
def test_rpc_session_never_raises_on_arbitrary_json(
    steps: list[tuple[str, Any]], policy_name: str
) -> None:
    """(f): whatever JSON values the client and the node send, in any order and with time
    passing, nothing raises and whatever the session returns can be encoded for the wire."""
    policy = POLICY_BY_NAME[policy_name]
    now = [0.0]
    session = RpcSession(policy, 2, 4, request_timeout=REQUEST_TIMEOUT, clock=lambda: now[0])
    for side, value in steps:
        if side == "client":
            decision = session.client_message(value)
            check_forward(policy, value, decision)
            orjson.dumps(decision.answer)
        elif side == "node":
            replacement = session.node_message(value)
            if replacement is not DROP:
                assert replacement is None or isinstance(replacement, dict | list)
                orjson.dumps(replacement)
        else:
            now[0] += value
            for answer in session.expire():
                assert isinstance(answer, dict)
                assert "error" in answer
                orjson.dumps(answer)


# -- 2. the method policy ------------------------------------------------------------------

NAME_CHARS = string.ascii_letters + string.digits + "_"
names = st.text(NAME_CHARS, min_size=1, max_size=20)
unsafe_prefixes = st.sampled_from(sorted(UNSAFE_METHODS)).flatmap(
    lambda m: st.integers(1, len(m)).map(lambda n: m[:n])
)
allowlist_entries = st.one_of(
    st.sampled_from(sorted(UNSAFE_METHODS)).map(lambda m: ("exact", m)),
    st.sampled_from(sorted(SAFE_METHODS)).map(lambda m: ("exact", m)),
    names.map(lambda m: ("exact", m)),
    unsafe_prefixes.map(lambda p: ("prefix", p)),
    names.map(lambda p: ("prefix", p)),
    st.just(("comment", "")),
    st.just(("blank", "")),
)
candidate_methods = st.one_of(
    st.sampled_from(sorted(UNSAFE_METHODS)),
    st.sampled_from(sorted(SAFE_METHODS)),
    names,
    st.text(max_size=20),
)


def render(entry: tuple[str, str], pad: str, comment: str) -> str:
    kind, name = entry
    if kind == "comment":
        return f"{pad}# {comment}"
    if kind == "blank":
        return pad
    text = name + ("*" if kind == "prefix" else "")
    return f"{pad}{text}{pad}" + (f"  # {comment}" if comment else "")


@FUZZ
@given(text=st.text(max_size=300))
def test_parse_allowlist_never_allows_unsafe_whatever_the_text(text: str) -> None:
    try:
        policy = parse_allowlist(text)
    except PolicyError:
        return
    assert not [m for m in UNSAFE_METHODS if policy.allows(m)]


@FUZZ
@given(
    entries=st.lists(
        st.tuples(
            allowlist_entries, st.sampled_from(["", " ", "\t"]), st.text("ab #*", max_size=5)
        ),
        max_size=25,
    ),
    extra=st.lists(candidate_methods, max_size=10),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_parse_allowlist_means_what_the_file_says(
    entries: list[tuple[tuple[str, str], str, str]], extra: list[str], newline: str
) -> None:
    text = newline.join(render(entry, pad, comment) for entry, pad, comment in entries)
    policy = parse_allowlist(text)
    exact = {name for (kind, name), _, _ in entries if kind == "exact"}
    prefixes = [name for (kind, name), _, _ in entries if kind == "prefix"]
    assert not [m for m in UNSAFE_METHODS if policy.allows(m)]
    candidates = set(extra) | exact | {p + "x" for p in prefixes} | set(prefixes)
    candidates |= UNSAFE_METHODS | SAFE_METHODS
    for method in candidates:
        listed = method in exact or any(method.startswith(p) for p in prefixes)
        assert policy.allows(method) == (listed and method not in UNSAFE_METHODS), method


@FUZZ
@given(
    exact=st.frozensets(candidate_methods, max_size=8),
    prefixes=st.lists(st.text(max_size=6) | unsafe_prefixes, max_size=4).map(tuple),
    method=candidate_methods,
)
def test_method_policy_allows_is_its_definition(
    exact: frozenset[str], prefixes: tuple[str, ...], method: str
) -> None:
    for policy in (MethodPolicy(exact, prefixes), SAFE_POLICY, FILE_POLICY):
        listed = method in policy.exact or any(method.startswith(p) for p in policy.prefixes)
        assert policy.allows(method) == (listed and method not in UNSAFE_METHODS)
    assert not MethodPolicy(exact | UNSAFE_METHODS, ("", *prefixes)).allows(
        sorted(UNSAFE_METHODS)[len(method) % len(UNSAFE_METHODS)]
    )


LIMITS_64 = [2**63, 2**64, 10**19, 10**20]
near_64_bits = st.sampled_from(LIMITS_64).flatmap(lambda b: st.integers(b - 2, b + 2))


@FUZZ
@given(n=st.integers(-(10**25), 10**25) | near_64_bits | near_64_bits.map(lambda n: -n))
def test_loads_exact_keeps_every_integer_exact(n: int) -> None:
    """``loads_exact`` promises integers beyond 64 bits stay exact (not floats)."""
    value = loads_exact(f'{{"id":{n},"params":[{n}]}}')
    assert value == {"id": n, "params": [n]}
    assert type(value["id"]) is int


# -- regression tests for what the properties found ----------------------------------------


def run_session(
    requests: list[Any], max_subs: int = 2, max_batch: int = 4
) -> tuple[FakeNode, list[Any]]:
    """Each client message in turn, each node answer delivered at once; the client's view."""
    session = RpcSession(SAFE_POLICY, max_subs, max_batch)
    node = FakeNode()
    client: list[Any] = []
    for origin, msg in enumerate(requests):
        decision = session.client_message(msg)
        if decision.answer is not None:
            client.append(decision.answer)
        if decision.forward is not None:
            node.receive(origin, decision.forward)
        while node.outbox:
            out = node.deliver(0).message
            replacement = session.node_message(out)
            if replacement is not DROP:
                client.append(out if replacement is None else replacement)
    return node, client


def req(rid: Any, method: str, params: list[Any] | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or []}
    if rid is not ...:
        r["id"] = rid
    return r


def test_refused_notifications_in_a_batch_send_nothing_to_the_node() -> None:
    """A batch of refused notifications: nothing may reach the node, nothing is answered."""
    node, client = run_session([[req(..., "author_rotateKeys")]])
    assert node.received == []
    assert client == []


def test_batch_with_null_id_and_refused_element_gets_one_array() -> None:
    """The forwarded part has only a null id: the relay answers its refusal at once and
    the node's answer comes as a second array."""
    batch = [req(None, "system_chain"), req(2, "author_rotateKeys")]
    _, client = run_session([batch])
    assert len(client) == 1, f"one batch, {len(client)} answers: {client}"


def test_subscriptions_with_null_id_are_counted() -> None:
    """A subscribe call whose id is not a string or integer is forwarded but never counted."""
    node, _ = run_session([req(None, "chain_subscribeNewHeads") for _ in range(4)])
    assert len(node.subs) <= 2, node.subs


def test_subscriptions_with_a_reused_id_are_counted() -> None:
    """Two subscribe calls in flight with the same id (answers delivered afterwards)."""
    session = RpcSession(SAFE_POLICY, 2, 4)
    node = FakeNode()
    for i, msg in enumerate([req(1, "chain_subscribeNewHeads")] * 3):
        decision = session.client_message(msg)
        if decision.forward is not None:
            node.receive(i, decision.forward)
    assert len(node.subs) <= 2


def test_unsubscribe_notification_does_not_free_a_slot() -> None:
    """The node does not run notifications, so the subscription is still there."""
    node, _ = run_session(
        [
            req(1, "chain_subscribeNewHeads"),
            req(..., "chain_unsubscribeNewHeads", ["sub-0"]),
            req(2, "chain_subscribeNewHeads"),
        ],
        max_subs=1,
    )
    assert len(node.subs) <= 1, node.subs


def test_unsubscribe_of_another_family_does_not_free_a_slot() -> None:
    """The node refuses (false) to end a NewHeads subscription through the FinalizedHeads
    unsubscribe method; the relay stops counting it anyway."""
    node, client = run_session(
        [
            req(1, "chain_subscribeNewHeads"),
            req(2, "chain_unsubscribeFinalizedHeads", ["sub-0"]),  # node answers false
            req(3, "chain_subscribeNewHeads"),
        ],
        max_subs=1,
    )
    assert client[1]["result"] is False
    assert len(node.subs) <= 1, node.subs


def test_chainhead_finalized_event_does_not_end_the_follow() -> None:
    """In the JSON-RPC spec only ``stop`` ends a chainHead_v1_follow subscription; a
    ``finalized`` event just reports finalized blocks (about every block)."""
    session = RpcSession(SAFE_POLICY, 1, 4)
    node = FakeNode()
    node.receive(0, session.client_message(req(1, "chainHead_v1_follow")).forward)
    session.node_message(node.deliver(0).message)
    finalized = {"event": "finalized", "finalizedBlockHashes": ["0x01"], "prunedBlockHashes": []}
    session.node_message(
        {
            "jsonrpc": "2.0",
            "method": "chainHead_v1_followEvent",
            "params": {"subscription": "sub-0", "result": finalized},
        }
    )
    decision = session.client_message(req(2, "chainHead_v1_follow"))
    assert decision.forward is None, "a second follow reached the node; the first is live"


def test_rpc_methods_with_null_id_is_filtered() -> None:
    """rpc_methods with a null id: the node's full list, unsafe methods included, reaches
    the client unfiltered (refusing such a call would do too)."""
    _, client = run_session([req(None, "rpc_methods")])
    for answer in client:
        check_methods_filtered(SAFE_POLICY, answer)


def test_timed_out_subscribe_still_counts() -> None:
    """The relay times a subscribe call out and drops the node's late answer; the node
    holds that subscription all the same, so it must still count against the cap."""
    now = [0.0]
    session = RpcSession(SAFE_POLICY, 1, 4, request_timeout=10.0, clock=lambda: now[0])
    node = FakeNode()
    node.receive(0, session.client_message(req(1, "chain_subscribeNewHeads")).forward)
    now[0] = 10.0
    assert [a["id"] for a in session.expire()] == [1]
    decision = session.client_message(req(2, "chain_subscribeNewHeads"))
    if decision.forward is not None:
        node.receive(1, decision.forward)
    while node.outbox:
        session.node_message(node.deliver(0).message)
    assert len(node.subs) <= 1, f"cap 1, the node holds {sorted(node.subs)}"


# -- 3. live fuzz ----------------------------------------------------------------------------

DOCUMENTED_TYPES = {"error", "proxy", "session_started", "session_ended"}
ERROR_CODES = {c.value for c in ErrorCode}
END_REASONS = {r.value for r in EndReason}
LEGIT_CLOSE = {1002, 1007, 1009}  # protocol error, invalid UTF-8, too big
LEGIT_RPC_CLOSE = LEGIT_CLOSE | {1013}  # /rpc: queue full before the upstream opens
DEVNODE_ANSWERS = {
    "system_chain": "GhostCloak Dev",
    "system_name": "ghostcloak-devnode",
    "system_version": "0.1.0-dev",
}
WAIT = 5.0  # every single wait in the live tests is bounded by this
MESSAGES_PER_RUN = 1000  # two runs: 2000 messages in all
SMALL_LIMITS: dict[str, Any] = {
    "max_message_bytes": 4096,
    "max_sessions_per_connection": 3,
    "max_queued_messages": 4,
    "max_batch": 3,
    "max_subscriptions_per_session": 2,
}
FUZZ_METHODS = [
    "system_chain",
    "system_name",
    "chain_getHeader",
    "chain_getBlockHash",
    "rpc_methods",
    "chain_subscribeNewHeads",
    "chain_unsubscribeNewHeads",
    "author_submitAndWatchExtrinsic",
    "author_rotateKeys",
    "author_insertKey",
    "system_peers",
    "nonsense_method",
]


@dataclass
class Anomalies:
    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        if len(self.items) < 50:
            self.items.append(text[:600])


class FuzzConn:
    """A raw connection to the relay; a task keeps reading whatever it is sent."""

    def __init__(self, ws: ClientConnection, path: str, name: str) -> None:
        self.ws = ws
        self.path = path
        self.name = name
        self.received: list[str | bytes] = []
        self.sent: list[str] = []  # what was sent, shortened, for reports
        self.checked = False  # its close code was checked, or we closed it ourselves
        self.requested: list[str] = []  # session ids this connection asked for
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                self.received.append(message)

    @property
    def closed(self) -> bool:
        return self.reader.done()

    def note(self, what: Any) -> None:
        text = what if isinstance(what, str) else repr(what)
        self.sent.append(text[:300])

    def last_sent(self, containing: str = "", n: int = 4) -> str:
        return " | ".join([m for m in self.sent if containing in m][-n:])


def legit_close(conn: FuzzConn) -> set[int]:
    return LEGIT_RPC_CLOSE if conn.path == "/rpc" else LEGIT_CLOSE


def rand_int(rng: random.Random) -> int:
    if rng.random() < 0.03:
        return rng.randrange(-(10**25), 10**25)  # beyond 64 bits
    return rng.randrange(-1000, 100000)


def rand_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rand_int(rng)
    if kind == 3:
        return rng.choice([0.5, -1e300, 3.14, 1e-9])
    if kind == 4:
        return "".join(rng.choice('ab"\\é😀 \u2028\x00{}[]') for _ in range(rng.randrange(6)))
    if kind == 5:
        return [rand_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["type", "sessionId", "payload", "id", "method", "params", "jsonrpc", "x"]
    return {rng.choice(keys): rand_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def rand_request(rng: random.Random) -> Any:
    method = rng.choice(FUZZ_METHODS)
    r: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    roll = rng.random()
    if roll < 0.5:
        r["id"] = rand_int(rng)
    elif roll < 0.7:
        r["id"] = f"r{rng.randrange(1000)}"
    elif roll < 0.8:
        r["id"] = None
    if method == "chain_unsubscribeNewHeads":
        r["params"] = [f"{rng.randrange(16**8):08x}"]
    elif method == "author_submitAndWatchExtrinsic":
        r["params"] = ["0x" + "ab" * rng.randrange(1, 8)]
    elif rng.random() < 0.5:
        r["params"] = [rand_json(rng, 2) for _ in range(rng.randrange(3))]
    return r


def rand_payload(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.55:
        return rand_request(rng)
    if roll < 0.75:
        return [rand_request(rng) for _ in range(rng.randrange(6))]
    return rand_json(rng)


INVALID_SIDS: list[Any] = ["short", "x" * 129, "bad sid!", "é" * 10, 12345678, None, [], ""]


def rand_sid(rng: random.Random, conn: FuzzConn, victim: str) -> Any:
    roll = rng.random()
    if roll < 0.5 and conn.requested:
        return rng.choice(conn.requested[-4:])
    if roll < 0.65:
        return f"fz-{rng.randrange(16**12):012x}"
    if roll < 0.75:
        return victim
    return rng.choice(INVALID_SIDS)


def rand_envelope(rng: random.Random, conn: FuzzConn, victim: str) -> dict[str, Any]:
    kind = rng.choices(["session_start", "proxy", "session_end", "other"], weights=[2, 6, 1, 1])[0]
    env: dict[str, Any] = {}
    if kind == "other":
        env["type"] = rng.choice(["Proxy", "ping", "", 5, None, ["proxy"], "session_started"])
    else:
        env["type"] = kind
    if not (kind == "session_start" and rng.random() < 0.2):
        env["sessionId"] = rand_sid(rng, conn, victim)
    if kind == "proxy" or rng.random() < 0.1:
        env["payload"] = rand_payload(rng)
    if rng.random() < 0.1:
        env[rng.choice(["extra", "type2", "code"])] = rand_json(rng, 2)
    if kind == "session_start" and isinstance(env.get("sessionId"), str):
        conn.requested.append(env["sessionId"])
    return env


def rand_text_bytes(rng: random.Random, allow_invalid: bool) -> bytes:
    if allow_invalid and rng.random() < 0.5:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    text = "".join(rng.choice('{}[]":,abc 0é€😀\\') for _ in range(rng.randrange(1, 40)))
    return text.encode()


def check_relay_messages(conn: FuzzConn, anomalies: Anomalies) -> None:
    """Every message on a fuzz connection to /relay: a documented envelope, its own."""
    started: set[str] = set()
    for raw in conn.received:
        where = f"{conn.name}: {raw!r:.200}"
        if not isinstance(raw, str):
            anomalies.add(f"binary message from the relay on {where}")
            continue
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            anomalies.add(f"not JSON on {where}")
            continue
        if not isinstance(msg, dict) or msg.get("type") not in DOCUMENTED_TYPES:
            anomalies.add(f"undocumented message on {where}")
            continue
        kind, sid = msg["type"], msg.get("sessionId")
        if kind == "error":
            if msg.get("code") not in ERROR_CODES or msg.get("message") != ERROR_MESSAGES.get(
                ErrorCode(msg["code"])
            ):
                anomalies.add(f"bad error envelope on {where}")
            if "sessionId" in msg and not is_valid_session_id(sid):
                anomalies.add(f"error echoes a malformed sessionId on {where}")
            if set(msg) - {"type", "code", "message", "sessionId"}:
                anomalies.add(f"extra fields on {where}")
            continue
        if not is_valid_session_id(sid):
            anomalies.add(f"bad sessionId on {where}")
            continue
        if kind == "session_started":
            if sid not in conn.requested and not (len(sid) == 32 and sid.isalnum()):
                anomalies.add(f"session_started for a session not asked for on {where}")
            started.add(sid)
        elif kind == "proxy":
            if sid not in started:
                anomalies.add(f"proxy for a session this connection did not start on {where}")
            if not isinstance(msg.get("payload"), dict | list) or set(msg) != {
                "type",
                "sessionId",
                "payload",
            }:
                anomalies.add(f"bad proxy envelope on {where}")
        else:
            if sid not in started and sid not in conn.requested:
                anomalies.add(f"session_ended for a session not of this connection on {where}")
            if msg.get("reason") != EndReason.CLIENT.value:
                anomalies.add(
                    f"a fuzz session ended other than by its client on {where}; "
                    f"last sent for it: {conn.last_sent(sid)}"
                )


def check_rpc_messages(conn: FuzzConn, anomalies: Anomalies) -> None:
    for raw in conn.received:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            anomalies.add(f"not JSON on {conn.name}: {raw!r:.200}")
            continue
        for item in elements(msg):
            if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
                anomalies.add(f"not a JSON-RPC message on {conn.name}: {raw!r:.200}")


@dataclass
class GoodClient:
    """A well-behaved wallet: session round trips on its own connection; it must see exactly
    the answers it expects, nothing else."""

    ws: ClientConnection
    rng: random.Random
    rate_limited_ok: bool  # the relay's per-client rate limit is shared with the fuzzers
    problems: list[str] = field(default_factory=list)
    rate_limited: int = 0
    current: str = "none-yet"  # its live session, once started (what fuzzers aim at)
    holding: str | None = None
    cycle: int = 0
    req_id: int = 0
    round_trips: int = 0

    async def recv(self) -> dict[str, Any]:
        msg = orjson.loads(await asyncio.wait_for(self.ws.recv(), WAIT))
        assert isinstance(msg, dict)
        return msg

    async def expect(self, **fields: Any) -> dict[str, Any]:
        msg = await self.recv()
        if any(msg.get(k) != v for k, v in fields.items()):
            raise AssertionError(f"good client expected {fields}, got {msg}")
        return msg

    async def start(self) -> None:
        self.cycle += 1
        sid = f"good-client-{self.cycle:04d}"
        await self.ws.send(orjson.dumps({"type": "session_start", "sessionId": sid}).decode())
        await self.expect(type="session_started", sessionId=sid)
        self.holding = self.current = sid

    async def end(self) -> None:
        sid = self.holding
        await self.ws.send(orjson.dumps({"type": "session_end", "sessionId": sid}).decode())
        await self.expect(type="session_ended", sessionId=sid, reason="client")
        self.holding = None

    async def round_trip(self) -> None:
        sid = self.holding
        methods = [self.rng.choice(sorted(DEVNODE_ANSWERS)) for _ in range(self.rng.randrange(3))]
        calls = []
        for method in methods or ["system_chain"]:
            self.req_id += 1
            calls.append({"jsonrpc": "2.0", "id": self.req_id, "method": method, "params": []})
        payload: Any = calls if len(methods) > 1 else calls[0]
        await self.ws.send(
            orjson.dumps({"type": "proxy", "sessionId": sid, "payload": payload}).decode()
        )
        msg = await self.expect(type="proxy", sessionId=sid)
        if isinstance(payload, list) != isinstance(msg["payload"], list):
            raise AssertionError(f"good client sent {payload}, got {msg}")
        answers = {a["id"]: a.get("result") for a in elements(msg["payload"])}
        want = {c["id"]: DEVNODE_ANSWERS[c["method"]] for c in calls}
        for a in elements(msg["payload"]):
            if self.rate_limited_ok and a.get("error", {}).get("code") == RATE_LIMITED:
                answers[a["id"]] = want.get(a["id"])
                self.rate_limited += 1
        if answers != want or len(elements(msg["payload"])) != len(calls):
            raise AssertionError(f"good client sent {payload}, got {msg}")
        self.round_trips += 1

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.start()
            while not stop.is_set():
                await self.round_trip()
                if self.rng.random() < 0.1:
                    await self.end()
                    await self.start()
                await asyncio.sleep(0)
        except Exception as exc:  # reported by the test, with everything else
            self.problems.append(f"{type(exc).__name__}: {exc}")


#: Framing violations that websockets will not send: each must close with 1002.
VIOLATIONS: dict[str, bytes] = {
    "continuation without a message": frame(0x0, b"{}"),
    "reserved bit set": frame(0x1, b"{}", rsv=4),
    "data frame inside a fragmented message": frame(0x1, b'{"a"', fin=False) + frame(0x1, b"{}"),
    "continuation after a complete message": frame(0x1, b"{}") + frame(0x0, b"{}"),
}


async def raw_violation(server: RelayServer, path: str, violation: str, sid: str | None) -> Any:
    """Open a raw connection, maybe start a session, break the framing; the close code."""
    try:
        reader, writer, head = await handshake(server.port, path, WAIT)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        return f"no close frame: {type(exc).__name__}"
    try:
        if not head.startswith(b"HTTP/1.1 101"):
            return f"handshake: {head[:40]!r}"
        if sid is not None:
            writer.write(
                frame(0x1, json.dumps({"type": "session_start", "sessionId": sid}).encode())
            )
        writer.write(VIOLATIONS[violation])
        while True:  # skip what comes before the close frame
            opcode, _, payload = await read_frame(reader, WAIT)
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        return f"no close frame: {type(exc).__name__}"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), WAIT)


async def http_health(server: RelayServer) -> dict[str, Any]:
    def get() -> tuple[int, bytes]:
        with urllib.request.urlopen(relay_url(server, "/health", "http"), timeout=WAIT) as r:
            return r.status, r.read()

    status, body = await asyncio.wait_for(asyncio.to_thread(get), WAIT + 1)
    assert status == 200
    result = orjson.loads(body)
    assert isinstance(result, dict)
    return result


async def run_live_fuzz(
    server: RelayServer, devnode: DevNode, rng: random.Random, small: bool
) -> None:
    anomalies = Anomalies()
    good_ws = await connect(relay_url(server), open_timeout=WAIT)
    settings = server.settings
    limited = settings.rate_limit > 0 or settings.rate_limit_per_client > 0
    good = GoodClient(good_ws, random.Random(rng.random()), rate_limited_ok=limited)
    stop = asyncio.Event()
    good_task = asyncio.create_task(good.run(stop))
    await eventually(lambda: good.holding is not None or good_task.done(), WAIT, "good start")

    all_conns: list[FuzzConn] = []
    try:
        paths = ["/relay", "/relay", "/relay", "/rpc"]
        slots: list[FuzzConn | None] = [None] * len(paths)
        fatal_budget = 40  # messages sent in order to get the connection closed
        raw_budget = 10  # framing violations on raw connections of their own
        max_conns = 120
        expected_closes = Counter[int]()

        async def open_conn(slot: int) -> FuzzConn | None:
            if len(all_conns) >= max_conns:
                return None
            name = f"{paths[slot]}#{len(all_conns)}"
            ws = await connect(relay_url(server, paths[slot]), open_timeout=WAIT, max_size=2**22)
            conn = FuzzConn(ws, paths[slot], name)
            all_conns.append(conn)
            slots[slot] = conn
            return conn

        async def await_close(conn: FuzzConn, want: set[int], why: str) -> None:
            conn.checked = True
            try:
                await asyncio.wait_for(asyncio.shield(conn.reader), WAIT)
            except TimeoutError:
                anomalies.add(f"{conn.name} not closed within {WAIT}s after {why}")
                await conn.ws.close()
                return
            code = conn.ws.close_code
            if code not in want:
                anomalies.add(
                    f"{conn.name} closed with {code} after {why}; last sent: {conn.last_sent()}"
                )
            else:
                expected_closes[code] += 1

        async def send(conn: FuzzConn, data: Any, text: bool | None = None) -> bool:
            conn.note(data)
            try:
                await asyncio.wait_for(conn.ws.send(data, text=text), WAIT)
            except ConnectionClosed:
                return False
            return True

        for n in range(MESSAGES_PER_RUN):
            slot = rng.randrange(len(slots))
            conn = slots[slot]
            if conn is None or conn.closed:
                if conn is not None:  # closed by the relay without a reason we gave
                    await await_close(conn, legit_close(conn), "ordinary messages")
                conn = await open_conn(slot)
                if conn is None:
                    anomalies.add(f"more than {max_conns} connections needed; stopped at {n}")
                    break
            roll = rng.random()
            if raw_budget > 0 and rng.random() < 0.01:
                raw_budget -= 1
                violation = rng.choice(sorted(VIOLATIONS))
                sid = f"raw-{rng.randrange(16**12):012x}" if rng.random() < 0.5 else None
                path = rng.choice(["/relay", "/rpc"])
                code = await raw_violation(server, path, violation, sid)
                if code != 1002:
                    anomalies.add(f"{path}: {violation} (session {sid}) got close {code!r}")
                else:
                    expected_closes[code] += 1
            fatal = fatal_budget > 0 and roll < 0.04
            if fatal:
                fatal_budget -= 1
                kind = rng.choice(["utf8", "utf8_fragments"] + (["too_big"] if small else []))
                if kind == "utf8":
                    if rng.random() < 0.5:
                        bad = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
                    else:
                        bad = (
                            b'{"type":"proxy","x":"'
                            + bytes([rng.choice([0xFF, 0xC0, 0xED])])
                            + b'"}'
                        )
                    ok_sent = await send(conn, bad, text=True)
                    try:
                        bad.decode()
                    except UnicodeDecodeError:
                        want = {1007}
                    else:  # random bytes that happen to be UTF-8: an ordinary message
                        fatal_budget += 1
                        continue
                elif kind == "utf8_fragments":
                    ok_sent = await send(
                        conn, [b'{"type":"', b"\xe2\x82", b"\xff", b'"}'], text=True
                    )
                    want = {1007}
                else:
                    big = "x" * (SMALL_LIMITS["max_message_bytes"] + 1 + rng.randrange(2000))
                    frags = [big] if rng.random() < 0.5 else [big[:1000], big[1000:]]
                    ok_sent = await send(conn, frags if len(frags) > 1 else frags[0])
                    want = {1009}
                if ok_sent:
                    await await_close(conn, want, f"a {kind} message")
                else:
                    await await_close(conn, legit_close(conn), "ordinary messages")
                slots[slot] = None
                continue
            if conn.path == "/rpc":
                if roll < 0.7:
                    data: Any = json.dumps(rand_payload(rng))
                elif roll < 0.85:
                    data = json.dumps(rand_json(rng))
                else:
                    data = rand_text_bytes(rng, allow_invalid=False).decode()
                await send(conn, data)
                continue
            if roll < 0.6:
                envelope = json.dumps(rand_envelope(rng, conn, good.current))
                if rng.random() < 0.1 and len(envelope) > 2:
                    cut = rng.randrange(1, len(envelope))
                    await send(conn, [envelope[:cut], envelope[cut:]])  # fragmented
                else:
                    await send(conn, envelope)
            elif roll < 0.72:
                await send(conn, json.dumps(rand_json(rng)))
            elif roll < 0.82:
                await send(conn, rand_text_bytes(rng, allow_invalid=False), text=True)
            elif roll < 0.88:
                # a valid multi-byte character split across fragments must be reassembled
                body = json.dumps({"type": "proxy", "sessionId": "€" * 9}, ensure_ascii=False)
                raw = body.encode()
                cut = raw.index("€".encode()) + 1
                await send(conn, [raw[:cut], raw[cut:]], text=True)
            elif roll < 0.95:
                await send(conn, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30))))
            else:
                text = json.dumps(rand_envelope(rng, conn, good.current))
                await send(conn, text[: rng.randrange(len(text))])  # truncated JSON
            if n % 50 == 0:
                await asyncio.sleep(0.01)  # let the relay, node and readers catch up

        # wind down: every fuzz connection closed by us, then the good client's session alone
        for conn in all_conns:
            if conn.closed and not conn.checked:
                await await_close(conn, legit_close(conn), "ordinary messages")
            if not conn.closed:
                conn.checked = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.ws.close(), WAIT)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.reader, WAIT)
            if conn.path == "/relay":
                check_relay_messages(conn, anomalies)
            else:
                check_rpc_messages(conn, anomalies)
    finally:
        for conn in all_conns:
            conn.reader.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(), WAIT)
        stop.set()
    try:
        await asyncio.wait_for(good_task, WAIT * 2)
        assert not good.problems, f"the well-behaved client was disturbed: {good.problems}"
        stats = f"good client: {good.round_trips} round trips, {good.rate_limited} rate limited"
        assert good.round_trips - good.rate_limited > 10, stats
        assert good.holding is not None

        await eventually(lambda: server.manager.active_count() == 1, WAIT, "sessions: only good")
        await eventually(lambda: devnode.active_connections == 1, WAIT, "node: only good")
        assert (await http_health(server)) == {"status": "ok", "activeSessions": 1}
        await good.round_trip()
        await good.end()
        await eventually(lambda: server.manager.active_count() == 0, WAIT, "no sessions")
        await eventually(lambda: devnode.active_connections == 0, WAIT, "no node connections")
        assert (await http_health(server)) == {"status": "ok", "activeSessions": 0}
        await asyncio.wait_for(good_ws.close(), WAIT)
    except (AssertionError, pytest.fail.Exception) as exc:
        if anomalies.items:  # report both
            raise AssertionError(f"{exc}\n\nand:\n" + "\n".join(anomalies.items)) from exc
        raise
    finally:
        good_task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(good_ws.close(), WAIT)
    assert not anomalies.items, "\n".join(anomalies.items)
    assert len(all_conns) > len(paths), "no connection was ever replaced"
    exercised = {1002, 1007} | ({1009} if small else set())
    assert exercised <= set(expected_closes), f"close codes seen: {dict(expected_closes)}"


@pytest.mark.timeout(60)
async def test_live_fuzz_default_limits(relay: RelayServer, devnode: DevNode) -> None:
    """1000 seeded fuzz messages at a relay with the default settings."""
    started = time.monotonic()
    await run_live_fuzz(relay, devnode, random.Random(1234), small=False)
    assert time.monotonic() - started < 30


@pytest.mark.timeout(60)
async def test_live_fuzz_small_limits(relay_factory: RelayFactory, devnode: DevNode) -> None:
    """1000 more at a relay with small limits (message size, sessions, queue, batch)."""
    server = await relay_factory(node=(devnode.url,), **SMALL_LIMITS)
    started = time.monotonic()
    await run_live_fuzz(server, devnode, random.Random(1234), small=True)
    assert time.monotonic() - started < 30


# -- live regression tests --------------------------------------------------------------------

BIG_ID = 123456789012345678901234  # beyond 64 bits: loads_exact keeps it a Python int


async def test_relay_big_integer_id_gets_an_answer_and_keeps_the_connection(
    relay: RelayServer,
) -> None:
    """loads_exact keeps integers beyond 64 bits as Python ints, which orjson cannot encode
    again: the relay must still answer (or refuse), not fail the connection with 1011."""
    async with connect(relay_url(relay), open_timeout=WAIT) as ws:
        sid = "big-int-session-1"
        await ws.send(json.dumps({"type": "session_start", "sessionId": sid}))
        assert orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))["type"] == "session_started"
        for method in ("author_rotateKeys", "system_chain"):  # refused, then forwarded
            payload = {"jsonrpc": "2.0", "id": BIG_ID, "method": method}
            await ws.send(json.dumps({"type": "proxy", "sessionId": sid, "payload": payload}))
            try:
                raw = await asyncio.wait_for(ws.recv(), WAIT)
            except ConnectionClosed:
                pytest.fail(f"{method} with id {BIG_ID}: the relay closed {ws.close_code}")
            assert json.loads(raw)["type"] == "proxy"


async def test_rpc_big_integer_id_refused_gets_an_answer(relay: RelayServer) -> None:
    async with connect(relay_url(relay, "/rpc"), open_timeout=WAIT) as ws:
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": BIG_ID, "method": "author_rotateKeys"}))
        try:
            answer = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        except ConnectionClosed:
            pytest.fail(f"refused call with id {BIG_ID}: the relay closed {ws.close_code}")
        assert answer["id"] == BIG_ID
        assert answer["error"]["code"] == METHOD_NOT_ALLOWED
