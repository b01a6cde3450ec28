"""MessageAssembler: fragmented WebSocket messages (RFC 6455 5.4, 5.6, 8.1) without I/O."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostcloak_relay.frames import (
    CLOSE_INVALID_TEXT,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_PROTOCOL_ERROR,
    OP_BINARY,
    OP_CONTINUATION,
    OP_TEXT,
    FrameError,
    MessageAssembler,
    close_code_is_valid,
    close_reply_code,
)

CONT, TEXT, BINARY = OP_CONTINUATION, OP_TEXT, OP_BINARY
MAX = 1024


def test_close_codes_are_the_rfc_ones():
    assert (CLOSE_PROTOCOL_ERROR, CLOSE_INVALID_TEXT, CLOSE_MESSAGE_TOO_BIG) == (1002, 1007, 1009)
    assert (OP_CONTINUATION, OP_TEXT, OP_BINARY) == (0x0, 0x1, 0x2)


# -- answering a CLOSE (RFC 6455 5.5.1, 7.4; Autobahn 7.7.*, 7.9.*, 7.13.*) ------------------


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
)
def test_a_valid_close_code_is_echoed(code: int):
    assert close_code_is_valid(code)
    assert close_reply_code(2, code) == code


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
)
def test_an_invalid_close_code_is_a_protocol_error(code: int):
    assert not close_code_is_valid(code)
    with pytest.raises(FrameError) as info:
        close_reply_code(2, code)
    assert info.value.code == CLOSE_PROTOCOL_ERROR


def test_a_close_without_status_code_is_answered_with_1000():
    # picows reports an empty CLOSE as NO_INFO (0), like an explicit 0: the size decides
    assert close_reply_code(0, 0) == 1000


def frame_error(asm: MessageAssembler, opcode: int, fin: bool, payload: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        asm.feed(opcode, fin, payload)
    return info.value


def assert_usable(asm: MessageAssembler) -> None:
    """After an error the assembler is idle and assembles new messages correctly."""
    assert not asm.in_progress
    assert asm.feed(TEXT, True, b"ok") == "ok"
    assert asm.feed(TEXT, False, b"he") is None
    assert asm.feed(CONT, True, b"llo") == "hello"
    assert asm.feed(BINARY, True, b"\x00\xff") == b"\x00\xff"


# -- single frames -------------------------------------------------------------------------


def test_single_text_frame():
    asm = MessageAssembler(MAX)
    message = asm.feed(TEXT, True, '{"type":"session_start"} κόσμε'.encode())
    assert message == '{"type":"session_start"} κόσμε'
    assert isinstance(message, str)
    assert not asm.in_progress


def test_single_binary_frame():
    asm = MessageAssembler(MAX)
    message = asm.feed(BINARY, True, b"\xff\x00\xfe")
    assert message == b"\xff\x00\xfe"
    assert isinstance(message, bytes)
    assert not asm.in_progress


def test_empty_messages():
    asm = MessageAssembler(MAX)
    assert asm.feed(TEXT, True, b"") == ""
    assert asm.feed(BINARY, True, b"") == b""
    assert asm.feed(TEXT, False, b"") is None
    assert asm.feed(CONT, True, b"") == ""


def test_consecutive_messages_are_independent():
    asm = MessageAssembler(MAX)
    assert asm.feed(TEXT, True, b"one") == "one"
    assert asm.feed(TEXT, False, b"tw") is None
    assert asm.feed(CONT, True, b"o") == "two"
    assert asm.feed(TEXT, True, b"three") == "three"


# -- fragmented messages -------------------------------------------------------------------


def test_fragmented_text_reassembled_across_three_frames():
    asm = MessageAssembler(MAX)
    assert asm.feed(TEXT, False, b'{"type":') is None
    assert asm.in_progress
    assert asm.feed(CONT, False, b'"session_') is None
    assert asm.in_progress
    assert asm.feed(CONT, True, b'start"}') == '{"type":"session_start"}'
    assert not asm.in_progress


def test_fragmented_binary_reassembled():
    asm = MessageAssembler(MAX)
    assert asm.feed(BINARY, False, b"\xff\xfe") is None
    assert asm.feed(CONT, False, b"\x00") is None
    message = asm.feed(CONT, True, b"\xc3")
    assert message == b"\xff\xfe\x00\xc3"
    assert isinstance(message, bytes)


def test_multibyte_utf8_split_across_fragments():
    text = "a€b😀c"
    data = text.encode()
    euro = data.index("€".encode())
    smile = data.index("😀".encode())
    asm = MessageAssembler(MAX)
    # split inside the 3-byte euro sign and twice inside the 4-byte emoji
    assert asm.feed(TEXT, False, data[: euro + 1]) is None
    assert asm.feed(CONT, False, data[euro + 1 : smile + 1]) is None
    assert asm.feed(CONT, False, data[smile + 1 : smile + 3]) is None
    assert asm.feed(CONT, True, data[smile + 3 :]) == text


def test_fragment_of_one_byte_each():
    text = "ĀΩ€😀"
    data = text.encode()
    asm = MessageAssembler(MAX)
    assert asm.feed(TEXT, False, data[:1]) is None
    for i in range(1, len(data) - 1):
        assert asm.feed(CONT, False, data[i : i + 1]) is None
    assert asm.feed(CONT, True, data[-1:]) == text


# -- invalid UTF-8 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",
        b"abc\xc0\xafdef",  # overlong encoding of '/'
        b"\xed\xa0\x80",  # UTF-16 surrogate
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"abc\xe2\x82",  # truncated at the end of the message
        b"\x80",  # lone continuation byte
    ],
)
def test_invalid_utf8_in_single_text_frame_is_1007(payload: bytes):
    asm = MessageAssembler(MAX)
    assert frame_error(asm, TEXT, True, payload).code == CLOSE_INVALID_TEXT
    assert_usable(asm)


def test_invalid_utf8_in_first_fragment_fails_fast():
    asm = MessageAssembler(MAX)
    err = frame_error(asm, TEXT, False, "κόσμε".encode() + b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80")
    assert err.code == CLOSE_INVALID_TEXT
    assert_usable(asm)


def test_invalid_utf8_in_middle_fragment_fails_fast():
    asm = MessageAssembler(MAX)
    assert asm.feed(TEXT, False, b"valid ") is None
    assert frame_error(asm, CONT, False, b"\xff more").code == CLOSE_INVALID_TEXT
    assert_usable(asm)


def test_truncated_utf8_at_end_of_fragmented_message_is_1007():
    asm = MessageAssembler(MAX)
    assert asm.feed(TEXT, False, b"abc") is None
    assert asm.feed(CONT, False, b"\xe2\x82") is None  # may still complete
    assert frame_error(asm, CONT, True, b"").code == CLOSE_INVALID_TEXT
    assert_usable(asm)


def test_invalid_utf8_split_across_fragments_is_detected():
    asm = MessageAssembler(MAX)
    assert asm.feed(TEXT, False, b"ab\xe2") is None
    assert frame_error(asm, CONT, True, b"\x28\xa1").code == CLOSE_INVALID_TEXT
    assert_usable(asm)


def test_binary_messages_are_not_utf8_checked():
    asm = MessageAssembler(MAX)
    assert asm.feed(BINARY, False, b"\xff") is None
    assert asm.feed(CONT, True, b"\xed\xa0\x80") == b"\xff\xed\xa0\x80"


# -- protocol errors -----------------------------------------------------------------------


@pytest.mark.parametrize("fin", [True, False])
def test_continuation_without_start_is_1002(fin: bool):
    asm = MessageAssembler(MAX)
    assert frame_error(asm, CONT, fin, b"orphan").code == CLOSE_PROTOCOL_ERROR
    assert_usable(asm)


@pytest.mark.parametrize(("first", "second"), [(TEXT, TEXT), (TEXT, BINARY), (BINARY, TEXT)])
@pytest.mark.parametrize("fin", [True, False])
def test_new_data_frame_inside_fragmented_message_is_1002(first: int, second: int, fin: bool):
    asm = MessageAssembler(MAX)
    assert asm.feed(first, False, b"part") is None
    assert frame_error(asm, second, fin, b"intruder").code == CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [0x3, 0x7, 0x8, 0x9, 0xA, 0xF])
def test_non_data_opcode_is_1002(opcode: int):
    asm = MessageAssembler(MAX)
    assert frame_error(asm, opcode, True, b"").code == CLOSE_PROTOCOL_ERROR
    assert_usable(asm)


# -- size limit ----------------------------------------------------------------------------


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_single_frame_at_limit_is_accepted(opcode: int):
    asm = MessageAssembler(10)
    assert len(asm.feed(opcode, True, b"x" * 10)) == 10  # type: ignore[arg-type]


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_too_big_single_frame_is_1009(opcode: int):
    asm = MessageAssembler(10)
    assert frame_error(asm, opcode, True, b"x" * 11).code == CLOSE_MESSAGE_TOO_BIG
    assert_usable(asm)


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_fragmented_message_at_limit_is_accepted(opcode: int):
    asm = MessageAssembler(10)
    assert asm.feed(opcode, False, b"x" * 4) is None
    assert asm.feed(CONT, False, b"y" * 4) is None
    message = asm.feed(CONT, True, b"z" * 2)
    assert message in ("xxxxyyyyzz", b"xxxxyyyyzz")


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
@pytest.mark.parametrize("fin", [True, False])
def test_too_big_fragmented_message_is_1009(opcode: int, fin: bool):
    asm = MessageAssembler(10)
    assert asm.feed(opcode, False, b"x" * 6) is None
    assert frame_error(asm, CONT, fin, b"y" * 5).code == CLOSE_MESSAGE_TOO_BIG
    assert_usable(asm)


def test_too_big_first_fragment_is_1009():
    asm = MessageAssembler(10)
    assert frame_error(asm, TEXT, False, b"x" * 11).code == CLOSE_MESSAGE_TOO_BIG
    assert_usable(asm)


def test_size_limit_applies_per_message_not_per_assembler():
    asm = MessageAssembler(10)
    for _ in range(5):
        assert asm.feed(TEXT, False, b"x" * 5) is None
        assert asm.feed(CONT, True, b"y" * 5) == "xxxxxyyyyy"


# -- the assembler is reusable after every kind of error -----------------------------------


def _bad_utf8_single(a: MessageAssembler) -> None:
    a.feed(TEXT, True, b"\xff")


def _bad_utf8_fragment(a: MessageAssembler) -> None:
    a.feed(TEXT, False, b"a")
    a.feed(CONT, False, b"\xff")


def _orphan_continuation(a: MessageAssembler) -> None:
    a.feed(CONT, True, b"x")


def _nested_text(a: MessageAssembler) -> None:
    a.feed(TEXT, False, b"a")
    a.feed(TEXT, True, b"b")


def _too_big_single(a: MessageAssembler) -> None:
    a.feed(BINARY, True, b"x" * (MAX + 1))


def _too_big_fragmented(a: MessageAssembler) -> None:
    a.feed(BINARY, False, b"x" * MAX)
    a.feed(CONT, True, b"x")


ERRORS: dict[str, Callable[[MessageAssembler], None]] = {
    "bad utf8 single": _bad_utf8_single,
    "bad utf8 fragment": _bad_utf8_fragment,
    "orphan continuation": _orphan_continuation,
    "nested text": _nested_text,
    "too big single": _too_big_single,
    "too big fragmented": _too_big_fragmented,
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_assembler_usable_after_each_error(name: str):
    asm = MessageAssembler(MAX)
    with pytest.raises(FrameError):
        ERRORS[name](asm)
    assert_usable(asm)


def test_assembler_usable_after_all_errors_one_after_another():
    asm = MessageAssembler(MAX)
    for name, cause in ERRORS.items():
        with pytest.raises(FrameError):
            cause(asm)
        assert not asm.in_progress, name
        assert asm.feed(TEXT, True, name.encode()) == name


# -- property: any split of valid UTF-8 reassembles exactly --------------------------------


@st.composite
def split_text(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    text = draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=200))
    data = text.encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return text, [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(split_text())
def test_random_splits_of_valid_utf8_reassemble_exactly(case: tuple[str, list[bytes]]):
    text, chunks = case
    size = len(text.encode())
    asm = MessageAssembler(size)  # exactly at the limit
    results = []
    for i, chunk in enumerate(chunks):
        opcode = TEXT if i == 0 else CONT
        results.append(asm.feed(opcode, i == len(chunks) - 1, chunk))
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == text
    assert not asm.in_progress


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_random_splits_of_binary_reassemble_exactly(data: bytes, cuts: list[int]):
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    asm = MessageAssembler(max(len(data), 1))
    message = None
    for i, chunk in enumerate(chunks):
        message = asm.feed(BINARY if i == 0 else CONT, i == len(chunks) - 1, chunk)
    assert message == data
