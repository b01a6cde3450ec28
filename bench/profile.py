"""Sampling the relay with py-spy during a load phase, and summarizing where time goes.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``). The
summary ranks functions by *self* samples (the leaf frame: where the CPU was) and by
*inclusive* samples (anywhere on the stack), with line numbers dropped so one function
is one row. Idle samples (the event loop waiting in ``epoll``) are excluded by py-spy.
The phase that is profiled is an extra one, never part of the medians: py-spy pauses the
process briefly for each sample.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["record", "summarize"]

_LINE = re.compile(r":\d+\)$")
_TOP = "ghostcloak_relay/cli.py"  # start-up frames, on every stack
#: libc entry points of the kernel's socket and polling calls.
SOCKET_CALLS = frozenset(
    {"send", "sendto", "sendmsg", "write", "writev", "recv", "recvfrom", "read", "epoll_pwait"}
)


def record(pyspy: str, pid: int, seconds: float, out: Path, rate: int = 250) -> str | None:
    """Sample ``pid`` for ``seconds`` into ``out``; return None, or why it failed."""
    base = [pyspy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    base += ["--rate", str(rate), "--format", "raw", "--output", str(out)]
    why = "py-spy failed"
    for extra in (["--native"], []):  # native frames show time inside picows/uvloop
        try:
            done = subprocess.run(
                base + extra, capture_output=True, timeout=seconds + 60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = f"py-spy: {type(exc).__name__}"
            continue
        if done.returncode == 0 and out.exists() and out.stat().st_size > 0:
            return None
        why = "py-spy: " + done.stderr.decode(errors="replace").strip()[-300:]
    return why


_COMPILED = re.compile(r"^CPy(?:Def|Py)_(\w+?) \(")
_LISTENER_METHOD = re.compile(r"^(\w+)_([A-Z]\w*)_obj$")
_CYTHON = re.compile(r"^__pyx_(?:f|pf|pw)_16ghostcloak_relay_(\w+) \(")
_LENGTH = re.compile(r"^(\d+)")


def _cython_name(mangled: str) -> str | None:
    """A Cython function's C symbol (after its package part) as the method it was
    compiled from: ``10frame_gate_9FrameGate_on_ws_frame`` ->
    ``FrameGate.on_ws_frame (ghostcloak_relay/frame_gate.pyx, compiled)`` (Cython writes
    each name with its length in front; ``__pyx_f_`` is the C function, ``__pyx_pw_`` the
    wrapper Python calls: one row)."""
    names: list[str] = []
    rest = mangled
    for _ in range(2):  # module, class
        m = _LENGTH.match(rest)
        if m is None:
            return None
        n = int(m.group(1))
        start = len(m.group(1))
        names.append(rest[start : start + n])
        rest = rest[start + n + 1 :]
    method = re.sub(r"^\d+", "", rest)  # the wrapper numbers its methods: 3on_ws_frame
    if not names[1] or not method:
        return None
    return f"{names[1]}.{method} (ghostcloak_relay/{names[0]}.pyx, compiled)"


def _compiled_name(symbol: str) -> str | None:
    """A mypyc function's C symbol as the Python function it was compiled from:
    ``CPyDef_session___UpstreamSession___from_client`` -> ``UpstreamSession.from_client``
    and ``CPyDef_connection___on_ws_frame_ClientConnection_obj_____call__`` (a method of
    a non-native class) -> ``ClientConnection.on_ws_frame``. CPyPy_ (the wrapper Python
    calls) and CPyDef_ (the function) are one row."""
    parts = symbol.split("___")
    if len(parts) < 2:
        return None
    module, rest = parts[0], parts[1:]
    if rest[-1] == "__call__" and len(rest) == 2:
        m = _LISTENER_METHOD.match(rest[0])
        if m is None:
            return None
        qualname = f"{m.group(2)}.{m.group(1)}"
    elif len(rest) == 2:
        qualname = f"{rest[0]}.{rest[1]}"
    elif len(rest) == 1:
        qualname = rest[0]
    else:
        return None
    return f"{qualname} (ghostcloak_relay/{module}.py, compiled)"


def _name(frame: str) -> str:
    frame = frame.strip()
    m = _COMPILED.match(frame)
    if m is not None:
        name = _compiled_name(m.group(1))
        if name is not None:
            return name
    m = _CYTHON.match(frame)
    if m is not None:
        name = _cython_name(m.group(1))
        if name is not None:
            return name
    return _LINE.sub(")", frame)


def _is_python(frame: str) -> bool:
    return ".py)" in frame or ".py:" in frame or ", compiled)" in frame


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Rank functions three ways: own samples (innermost frame, native included), by
    innermost *Python* function (its C calls, such as a socket send, included), and
    inclusive samples of the relay's own code (``ghostcloak_relay``)."""
    own: Counter[str] = Counter()
    python: Counter[str] = Counter()
    relay_incl: Counter[str] = Counter()
    syscalls = 0
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";") if f]
        # a compiled call appears twice (CPyPy_ wrapper, then CPyDef_): keep one
        frames = [f for i, f in enumerate(frames) if i == 0 or f != frames[i - 1]]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        if frames[-1].split(" ", 1)[0] in SOCKET_CALLS:
            syscalls += count
        inner = next((f for f in reversed(frames) if _is_python(f)), frames[-1])
        python[inner] += count
        for name in {f for f in frames if "ghostcloak_relay/" in f and _TOP not in f}:
            relay_incl[name] += count

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "share": n / total if total else 0.0}
            for name, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "socket_call_share": syscalls / total if total else 0.0,
        "self": rows(own),
        "python": rows(python),
        "relay_inclusive": rows(relay_incl),
    }
