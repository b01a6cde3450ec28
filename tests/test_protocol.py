"""The envelope protocol of WS /relay: decoding client messages, encoding relay messages."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostcloak_relay.protocol import (
    EndReason,
    EnvelopeError,
    ErrorCode,
    Proxy,
    SessionEnd,
    SessionStart,
    decode_client_message,
    encode_error,
    encode_session_ended,
    encode_session_started,
    is_valid_session_id,
    new_session_id,
    proxy_prefix,
)

SID = "wallet-session-0001"
UUID = "3f2b8c1e-9d4a-4e6f-8a7b-1c2d3e4f5a6b"
PAYLOAD = {"jsonrpc": "2.0", "id": 1, "method": "system_health", "params": []}

# Written out here (not imported) so the test pins the documented rule.
DOCUMENTED_ID = r"[A-Za-z0-9_.:\-]{8,128}"

DOCUMENTED_CODES = {
    "bad_json",
    "bad_message",
    "unknown_type",
    "bad_session_id",
    "unknown_session",
    "session_exists",
    "too_many_sessions",
    "upstream_unavailable",
}
DOCUMENTED_REASONS = {"client", "upstream_closed", "upstream_error", "expired", "idle", "shutdown"}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def decode_error(data: bytes | str) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        decode_client_message(data)
    return info.value


# -- strategies ---------------------------------------------------------------------------

json_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=20,
)
non_empty_payloads = st.dictionaries(json_text, json_values, min_size=1, max_size=5) | st.lists(
    json_values, min_size=1, max_size=5
)
valid_ids = st.from_regex(DOCUMENTED_ID, fullmatch=True)
message_types = st.sampled_from(["session_start", "proxy", "session_end"])

envelope_like = st.fixed_dictionaries(
    {"type": message_types | json_values},
    optional={"sessionId": valid_ids | json_values, "payload": json_values | non_empty_payloads},
)


# -- decoding valid messages --------------------------------------------------------------


def test_session_start_without_id_asks_the_relay_for_one():
    assert decode_client_message(dumps({"type": "session_start"})) == SessionStart(None)


def test_session_start_with_id():
    assert decode_client_message(dumps({"type": "session_start", "sessionId": SID})) == (
        SessionStart(SID)
    )


def test_proxy_with_request_object():
    msg = decode_client_message(dumps({"type": "proxy", "sessionId": SID, "payload": PAYLOAD}))
    assert msg == Proxy(SID, PAYLOAD)


def test_proxy_with_batch():
    batch = [PAYLOAD, {**PAYLOAD, "id": 2, "method": "chain_getHeader"}]
    msg = decode_client_message(dumps({"type": "proxy", "sessionId": SID, "payload": batch}))
    assert msg == Proxy(SID, batch)


def test_session_end():
    assert decode_client_message(dumps({"type": "session_end", "sessionId": SID})) == (
        SessionEnd(SID)
    )


def test_text_and_bytes_input_decode_the_same():
    text = json.dumps({"type": "proxy", "sessionId": SID, "payload": PAYLOAD})
    assert decode_client_message(text) == decode_client_message(text.encode())


def test_non_ascii_payload_is_preserved():
    payload = {"jsonrpc": "2.0", "id": "ключ-🔑", "method": "x", "params": ["ü"]}
    data = json.dumps({"type": "proxy", "sessionId": SID, "payload": payload}, ensure_ascii=False)
    assert decode_client_message(data.encode()) == Proxy(SID, payload)


def test_large_integers_in_payload_are_not_silently_changed():
    """JSON-RPC ids and params may be integers beyond 64 bits; the payload is re-encoded
    for the node, so the decoded value must be exact (or the message refused), never
    rounded to a float."""
    big = 2**64 + 1
    payload = {"jsonrpc": "2.0", "id": big, "method": "m", "params": [10**30 + 1]}
    data = dumps({"type": "proxy", "sessionId": SID, "payload": payload})
    try:
        msg = decode_client_message(data)
    except EnvelopeError:
        return  # refusing is acceptable; changing the request is not
    assert isinstance(msg, Proxy)
    assert msg.payload == payload
    assert isinstance(msg.payload["id"], int)


# -- decoding errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        "",
        b"{",
        "not json",
        b"{'type': 'proxy'}",
        b'{"type":"session_end","sessionId":"abcdefgh",}',
        b"\xff\xfe\xfd",
        b'{"type":"session_end","sessionId":"abcdefgh\xff"}',  # invalid UTF-8 inside a string
        b'{"type":"session_start"}\xc3',  # truncated multi-byte sequence
        b'{"type":"session_start"} {"type":"session_start"}',  # two values
        "[" * 5000 + "]" * 5000,  # nesting too deep
    ],
)
def test_bad_json(data: bytes | str):
    err = decode_error(data)
    assert err.code is ErrorCode.BAD_JSON
    assert err.session_id is None


@pytest.mark.parametrize(
    "obj",
    [
        [],
        [{"type": "session_start"}],
        1,
        "session_start",
        None,
        True,
        {},
        {"sessionId": SID},
        {"type": None, "sessionId": SID},
        {"type": 1, "sessionId": SID},
        {"type": ["proxy"], "sessionId": SID},
        {"type": {"proxy": 1}, "sessionId": SID},
    ],
)
def test_bad_message_for_non_envelopes_and_missing_or_non_string_type(obj: Any):
    err = decode_error(dumps(obj))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.session_id is None


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"payload": None},
        {"payload": 1},
        {"payload": 1.5},
        {"payload": "eth_call"},
        {"payload": True},
        {"payload": {}},
        {"payload": []},
    ],
)
def test_proxy_without_usable_payload_is_bad_message_with_the_session_id(extra: dict[str, Any]):
    err = decode_error(dumps({"type": "proxy", "sessionId": SID, **extra}))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.session_id == SID


@pytest.mark.parametrize("kind", ["hello", "", "PROXY", "session_started", "error", "Proxy "])
def test_unknown_type(kind: str):
    err = decode_error(dumps({"type": kind, "sessionId": SID, "payload": PAYLOAD}))
    assert err.code is ErrorCode.UNKNOWN_TYPE
    assert err.session_id is None


BAD_IDS: list[Any] = [
    "a" * 7,
    "a" * 129,
    "",
    "abcdefg!",
    "abcd efgh",
    "abcdefgh\n",
    "\nabcdefgh",
    "abcdéfgh",
    "abcd/efgh",
    'abcdefgh"',
    "abcdefgh\x00",
    12345678,
    1.5,
    True,
    ["abcdefgh"],
    {"id": "abcdefgh"},
]


@pytest.mark.parametrize("kind", ["session_start", "proxy", "session_end"])
@pytest.mark.parametrize("bad_id", BAD_IDS, ids=repr)
def test_bad_session_id(kind: str, bad_id: Any):
    err = decode_error(dumps({"type": kind, "sessionId": bad_id, "payload": PAYLOAD}))
    assert err.code is ErrorCode.BAD_SESSION_ID
    assert err.session_id is None


@pytest.mark.parametrize("kind", ["proxy", "session_end"])
def test_missing_session_id_is_bad_session_id_where_required(kind: str):
    err = decode_error(dumps({"type": kind, "payload": PAYLOAD}))
    assert err.code is ErrorCode.BAD_SESSION_ID


@pytest.mark.parametrize(
    "good_id",
    [
        "a" * 8,
        "Z" * 128,
        UUID,
        str(uuid.uuid4()),
        "AZaz09_-.:",
        "urn:uuid:" + UUID,
        "0123456789abcdef0123456789abcdef",
    ],
)
@pytest.mark.parametrize("kind", ["session_start", "proxy", "session_end"])
def test_accepted_session_ids(kind: str, good_id: str):
    msg = decode_client_message(dumps({"type": kind, "sessionId": good_id, "payload": PAYLOAD}))
    assert msg.session_id == good_id
    assert is_valid_session_id(good_id)


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=repr)
def test_is_valid_session_id_rejects(bad_id: Any):
    assert not is_valid_session_id(bad_id)


# -- error envelopes ----------------------------------------------------------------------


def test_documented_error_codes_and_end_reasons_exist():
    assert {code.value for code in ErrorCode} >= DOCUMENTED_CODES
    assert {reason.value for reason in EndReason} == DOCUMENTED_REASONS


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_envelope_without_session(code: ErrorCode):
    msg = orjson.loads(encode_error(code))
    assert set(msg) == {"type", "code", "message"}
    assert msg["type"] == "error"
    assert msg["code"] == code.value
    assert isinstance(msg["message"], str)
    assert msg["message"]


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_envelope_with_well_formed_session(code: ErrorCode):
    msg = orjson.loads(encode_error(code, UUID))
    assert msg == {
        "type": "error",
        "code": code.value,
        "message": orjson.loads(encode_error(code))["message"],
        "sessionId": UUID,
    }


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_message_is_fixed_and_holds_no_client_data(code: ErrorCode):
    messages = {
        orjson.loads(encode_error(code, sid))["message"]
        for sid in (None, SID, UUID, "x" * 128, "bad id!")
    }
    assert len(messages) == 1
    (message,) = messages
    for client_data in (SID, UUID, "bad id!"):
        assert client_data not in message


@pytest.mark.parametrize(
    "bad_id",
    ["short", "a" * 129, 'abcdefgh","type":"x', "abcd efgh", "abcdefgh\n", ""],
)
def test_error_envelope_omits_malformed_session_id(bad_id: str):
    raw = encode_error(ErrorCode.UNKNOWN_SESSION, bad_id)
    msg = orjson.loads(raw)
    assert set(msg) == {"type", "code", "message"}
    assert msg["type"] == "error"
    assert msg["code"] == "unknown_session"


def test_distinct_codes_have_distinct_messages():
    messages = [orjson.loads(encode_error(code))["message"] for code in ErrorCode]
    assert len(set(messages)) == len(messages)


def test_error_from_decoding_round_trips_into_an_envelope():
    err = decode_error(dumps({"type": "proxy", "sessionId": SID, "payload": 7}))
    msg = orjson.loads(encode_error(err.code, err.session_id))
    assert msg["code"] == "bad_message"
    assert msg["sessionId"] == SID


# -- relay-to-client encoders -------------------------------------------------------------


def test_encode_session_started_exact():
    assert orjson.loads(encode_session_started(UUID)) == {
        "type": "session_started",
        "sessionId": UUID,
    }


@pytest.mark.parametrize("reason", list(EndReason))
def test_encode_session_ended_exact(reason: EndReason):
    raw = encode_session_ended(SID, reason)
    assert json.loads(raw) == {"type": "session_ended", "sessionId": SID, "reason": reason.value}


def test_encoders_return_bytes_of_valid_json():
    for raw in (
        encode_session_started(SID),
        encode_session_ended(SID, EndReason.CLIENT),
        encode_error(ErrorCode.BAD_JSON, SID),
        proxy_prefix(SID) + b"{}}",
    ):
        assert isinstance(raw, bytes)
        assert isinstance(json.loads(raw), dict)


# -- relay-generated session ids ----------------------------------------------------------


def test_new_session_id_is_128_bits_of_hex():
    sid = new_session_id()
    assert re.fullmatch(r"[0-9a-f]{32}", sid)
    assert 0 <= int(sid, 16) < 2**128
    assert is_valid_session_id(sid)


def test_new_session_ids_are_distinct():
    ids = [new_session_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", sid) for sid in ids)


def test_new_session_ids_use_the_whole_alphabet():
    # a weak generator (e.g. hex of a small counter or time) would leave digits unused
    joined = "".join(new_session_id() for _ in range(100))
    assert set(joined) == set("0123456789abcdef")


# -- splicing node messages ---------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b'{"jsonrpc":"2.0","id":1,"result":"0x00"}',
        b'[{"jsonrpc":"2.0","id":1,"result":null},{"jsonrpc":"2.0","id":2,"result":true}]',
        b'{"jsonrpc":"2.0","method":"chain_newHead","params":{"subscription":"a","result":{}}}',
        b'  {"type":"session_ended","sessionId":"other-session","reason":"client"}  ',
        b'"just a string"',
        b"42",
        b"null",
    ],
)
def test_proxy_prefix_splices_a_complete_envelope(payload: bytes):
    envelope = json.loads(proxy_prefix(SID) + payload + b"}")
    assert envelope == {"type": "proxy", "sessionId": SID, "payload": json.loads(payload)}


@settings(max_examples=200, deadline=None)
@given(sid=valid_ids, payload=json_values)
def test_proxy_prefix_splices_arbitrary_json(sid: str, payload: Any):
    raw = orjson.dumps(payload)
    envelope = orjson.loads(proxy_prefix(sid) + raw + b"}")
    assert envelope == {"type": "proxy", "sessionId": sid, "payload": orjson.loads(raw)}


@settings(max_examples=200, deadline=None)
@given(
    sid=valid_ids,
    fake_type=json_values,
    fake_sid=json_values,
    rest=st.dictionaries(json_text, json_values, max_size=3),
    wrap_in_list=st.booleans(),
    indent=st.none() | st.integers(0, 3),
)
def test_node_payload_cannot_change_envelope_type_or_session(
    sid: str,
    fake_type: Any,
    fake_sid: Any,
    rest: dict[str, Any],
    wrap_in_list: bool,
    indent: int | None,
):
    node_msg: Any = {**rest, "type": fake_type, "sessionId": fake_sid, "payload": fake_type}
    if wrap_in_list:
        node_msg = [node_msg]
    raw = json.dumps(node_msg, indent=indent, ensure_ascii=False).encode()
    spliced = proxy_prefix(sid) + raw + b"}"
    for parse in (orjson.loads, json.loads):  # two parsers; duplicate keys would differ
        envelope = parse(spliced)
        assert set(envelope) == {"type", "sessionId", "payload"}
        assert envelope["type"] == "proxy"
        assert envelope["sessionId"] == sid
        assert envelope["payload"] == orjson.loads(raw)


# -- properties of the decoder ------------------------------------------------------------


def _decode_only_envelope_errors(data: bytes | str) -> None:
    error: EnvelopeError | None = None
    try:
        msg = decode_client_message(data)
    except EnvelopeError as exc:  # any other exception fails the test
        error = exc
    if error is not None:
        assert isinstance(error.code, ErrorCode)
        assert error.session_id is None or is_valid_session_id(error.session_id)
        return
    assert isinstance(msg, SessionStart | Proxy | SessionEnd)
    if isinstance(msg, Proxy):
        assert isinstance(msg.payload, dict | list)
        assert msg.payload
        assert is_valid_session_id(msg.session_id)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decode_never_raises_but_envelope_error_on_bytes(data: bytes):
    _decode_only_envelope_errors(data)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(), max_size=200))  # includes lone surrogates
def test_decode_never_raises_but_envelope_error_on_text(data: str):
    _decode_only_envelope_errors(data)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_decode_never_raises_but_envelope_error_on_json_values(value: Any):
    _decode_only_envelope_errors(orjson.dumps(value))


@settings(max_examples=200, deadline=None)
@given(envelope_like)
def test_decode_never_raises_but_envelope_error_on_envelope_like_objects(obj: dict[str, Any]):
    _decode_only_envelope_errors(orjson.dumps(obj))
    _decode_only_envelope_errors(orjson.dumps(obj).decode())


@settings(max_examples=200, deadline=None)
@given(
    kind=message_types,
    sid=valid_ids,
    payload=non_empty_payloads,
    extra=st.dictionaries(st.sampled_from(["id", "x", "meta"]), json_values, max_size=2),
)
def test_round_trip_of_valid_envelopes(kind: str, sid: str, payload: Any, extra: dict[str, Any]):
    obj: dict[str, Any] = {**extra, "type": kind, "sessionId": sid}
    if kind == "proxy":
        obj["payload"] = payload
    msg = decode_client_message(json.dumps(obj).encode())
    if kind == "proxy":
        assert msg == Proxy(sid, payload)
        # what the relay forwards to the node is the same JSON the client sent
        assert isinstance(msg, Proxy)
        assert orjson.loads(orjson.dumps(msg.payload)) == payload
    elif kind == "session_start":
        assert msg == SessionStart(sid)
    else:
        assert msg == SessionEnd(sid)
