"""The monitoring line's memory figures, and logging that cannot identify a wallet."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ghostcloak_relay import logs
from ghostcloak_relay.logs import configure_logging, ref, safe_exception
from ghostcloak_relay.memory import MemoryReading, _parse_status, read_memory, status_line

MB = 2**20
STATUS_LINE = re.compile(r"^Active sessions: \d+, RSS: \d+MB, Heap: \d+MB/\d+MB$")

SAMPLE_STATUS = """\
Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4242
Pid:\t4242
VmPeak:\t  412345 kB
VmSize:\t  398765 kB
VmLck:\t       0 kB
VmHWM:\t   51200 kB
VmRSS:\t   46080 kB
RssAnon:\t   32768 kB
RssFile:\t   13312 kB
RssShmem:\t       0 kB
VmData:\t   65536 kB
VmStk:\t     132 kB
VmExe:\t       4 kB
VmLib:\t   12000 kB
VmSwap:\t       0 kB
Threads:\t4
voluntary_ctxt_switches:\t150
"""


# -- memory --------------------------------------------------------------------------------


def test_parse_status_reads_rss_anon_and_data_in_bytes():
    assert _parse_status(SAMPLE_STATUS) == MemoryReading(
        rss=46080 * 1024, heap_used=32768 * 1024, heap_total=65536 * 1024
    )


def test_parse_status_ignores_similar_field_names():
    # VmRSS must not be confused with VmHWM/VmPeak, RssAnon with RssFile
    reading = _parse_status(SAMPLE_STATUS)
    assert reading.rss != 51200 * 1024
    assert reading.rss != 412345 * 1024
    assert reading.heap_used != 13312 * 1024


def test_parse_status_without_heap_fields_falls_back_to_rss():
    text = "Name:\tpython3\nVmRSS:\t  2048 kB\nThreads:\t1\n"
    assert _parse_status(text) == MemoryReading(2048 * 1024, 2048 * 1024, 2048 * 1024)


def test_read_memory_on_linux_matches_proc():
    reading = read_memory()
    assert reading.heap_used <= reading.rss  # RssAnon is part of VmRSS
    with open("/proc/self/status") as f:
        data_kb = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
    assert abs(reading.heap_total - data_kb * 1024) < 64 * MB


def test_read_memory_returns_positive_values():
    reading = read_memory()
    assert isinstance(reading, MemoryReading)
    assert reading.rss > 0
    assert reading.heap_used > 0
    assert reading.heap_total > 0
    assert reading.rss < 64 * 2**30  # bytes, not kB misread as bytes times 1024 again


def test_read_memory_follows_allocation():
    before = read_memory()
    block = b"\x01" * (64 * MB)  # touched pages: resident and anonymous
    after = read_memory()
    assert len(block) == 64 * MB
    assert after.rss - before.rss > 48 * MB
    assert after.heap_used - before.heap_used > 48 * MB
    del block


def test_status_line_exact_original_form():
    line = status_line(3, MemoryReading(45 * MB, 32 * MB, 64 * MB))
    assert line == "Active sessions: 3, RSS: 45MB, Heap: 32MB/64MB"
    assert STATUS_LINE.match(line)


@pytest.mark.parametrize(
    ("sessions", "reading", "expected"),
    [
        (0, MemoryReading(0, 0, 0), "Active sessions: 0, RSS: 0MB, Heap: 0MB/0MB"),
        (
            1234,
            MemoryReading(2048 * MB, 1500 * MB, 4096 * MB),
            "Active sessions: 1234, RSS: 2048MB, Heap: 1500MB/4096MB",
        ),
        (
            7,
            MemoryReading(45 * MB + MB // 4, 32 * MB - MB // 4, 64 * MB),
            "Active sessions: 7, RSS: 45MB, Heap: 32MB/64MB",
        ),
    ],
)
def test_status_line_values(sessions: int, reading: MemoryReading, expected: str):
    line = status_line(sessions, reading)
    assert line == expected
    assert STATUS_LINE.match(line)


def test_status_line_of_real_reading_matches_the_form():
    line = status_line(5, read_memory())
    assert STATUS_LINE.match(line), line


# -- ref -----------------------------------------------------------------------------------

SIDS = [
    "3f2b8c1e-9d4a-4e6f-8a7b-1c2d3e4f5a6b",
    "wallet-session-0001",
    "0123456789abcdef0123456789abcdef",
    "10.0.0.7:51234",
]


@pytest.mark.parametrize("value", SIDS)
def test_ref_is_stable_short_hex_and_hides_the_input(value: str):
    token = ref(value)
    assert token == ref(value)
    assert re.fullmatch(r"[0-9a-f]{12}", token)
    assert value not in token
    assert token not in value


def test_ref_differs_for_different_inputs():
    values = [f"session-{i:08d}" for i in range(2000)] + SIDS
    tokens = {ref(v) for v in values}
    assert len(tokens) == len(values)
    assert ref("abcdefgh") != ref("abcdefgi")


def test_ref_is_keyed_not_a_plain_hash():
    import hashlib

    value = SIDS[0]
    for digest_size in (6, 32, 64):
        plain = hashlib.blake2b(value.encode(), digest_size=digest_size).hexdigest()
        assert ref(value) not in plain
    for name in ("sha256", "sha1", "md5"):
        assert ref(value) not in hashlib.new(name, value.encode()).hexdigest()


def test_ref_key_differs_between_processes():
    code = f"from ghostcloak_relay.logs import ref; print(ref({SIDS[0]!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", out)
    assert out != ref(SIDS[0])


# -- safe_exception ------------------------------------------------------------------------

SECRET = "wallet 10.1.2.3:4444 sent eth_sendRawTransaction 0xdeadbeefcafe"


class WalletLeak(Exception):
    pass


def _fail_deep() -> None:
    raise WalletLeak(SECRET)  # the line reported


def _raise_here() -> int:
    try:
        _fail_deep()
    except WalletLeak as exc:
        return exc.__traceback__.tb_next.tb_lineno  # type: ignore[union-attr]
    raise AssertionError("not raised")


def test_safe_exception_gives_type_and_location_without_message():
    lineno = _raise_here()
    try:
        _fail_deep()
    except WalletLeak as exc:
        text = safe_exception(exc)
    assert text == f"WalletLeak at test_memory_logs.py:{lineno}"
    assert SECRET not in text
    assert "10.1.2.3" not in text
    assert "deadbeef" not in text


@pytest.mark.parametrize(
    "exc",
    [
        ValueError(SECRET),
        KeyError(SECRET),
        OSError(104, SECRET),
        UnicodeDecodeError("utf-8", SECRET.encode(), 0, 1, SECRET),
    ],
)
def test_safe_exception_never_contains_the_message(exc: BaseException):
    try:
        raise exc
    except BaseException as caught:
        text = safe_exception(caught)
    assert text.startswith(type(exc).__name__ + " at test_memory_logs.py:")
    assert SECRET not in text
    for fragment in ("10.1.2.3", "4444", "deadbeef"):
        assert fragment not in text


def test_safe_exception_of_unraised_exception_is_its_type():
    assert safe_exception(RuntimeError(SECRET)) == "RuntimeError"


def test_safe_exception_location_is_where_it_was_raised_not_caught():
    def inner() -> None:
        raise KeyError(SECRET)

    try:
        inner()
    except KeyError as exc:
        text = safe_exception(exc)
    raise_line = inner.__code__.co_firstlineno + 1
    assert text == f"KeyError at test_memory_logs.py:{raise_line}"


# -- configured logging never prints exception text ----------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    names = ("picows", "asyncio")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_logged_exception_shows_type_and_location_but_not_message(
    monkeypatch: pytest.MonkeyPatch,
):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info")
    log = logging.getLogger("ghostcloak_relay.test")
    try:
        _fail_deep()
    except WalletLeak:
        log.exception("upstream failed")
    log.debug("hidden at info level")
    output = stream.getvalue()
    assert "upstream failed" in output
    assert "WalletLeak at test_memory_logs.py:" in output
    assert SECRET not in output
    assert "10.1.2.3" not in output
    assert "deadbeef" not in output
    assert "hidden at info level" not in output


def test_silent_logger_drops_everything():
    assert logs.SILENT.logger.disabled
    assert not logs.SILENT.logger.propagate
    assert not logs.SILENT.isEnabledFor(logging.CRITICAL)
    # an adapter, so that picows does not make a child Logger per connection
    assert not isinstance(logs.SILENT, logging.Logger)


def test_configure_logging_silences_library_loggers(capsys: pytest.CaptureFixture[str]) -> None:
    """picows logs peer addresses and asyncio prints exception text: neither may reach
    the relay's output, even at debug level."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure_logging("debug")
        logging.getLogger("picows.server").warning("New connection accepted: 127.0.0.9:5555")
        logging.getLogger("asyncio").error("Task exception: secret payload 127.0.0.9")
        logging.getLogger("ghostcloak_relay.test").debug("relay line")
        err = capsys.readouterr().err
        assert "relay line" in err
        assert "127.0.0.9" not in err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("picows").setLevel(logging.NOTSET)
        logging.getLogger("asyncio").setLevel(logging.NOTSET)
