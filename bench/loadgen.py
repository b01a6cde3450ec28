"""The load generator process (``python -m bench.loadgen CONFIG_JSON``), driven over stdio.

picows clients with all the work in the ``on_ws_frame`` callbacks: requests are
pre-encoded bytes (8 per session, cycling ids), the loop is closed (a session sends its
next request when the previous answer arrives), and the latency of each pair is one
``perf_counter_ns`` difference appended to an ``array``. Answers are checked with one
byte search for ``"result"`` (anything else counts as an error).

Two client shapes:

* plain (``direct``, ``nginx``, ``rpc``): one WebSocket connection is one session;
* envelope (``relay``): up to ``per_conn`` sessions share a connection to ``/relay``;
  answers are routed to their session by the fixed-length ``sessionId`` at a fixed
  offset of the relay's ``proxy`` envelope (anything else is parsed with orjson).

Protocol with the orchestrator (one JSON object per line on stdout, commands on stdin):

* after opening every session (``mode=load``) or opening them and doing one round trip
  each (``mode=hold``): ``{"event": "ready", ...}``;
* ``go T0 T1`` (``time.monotonic()`` seconds, shared by all processes on Linux): start
  the closed loop at once (warm-up), snapshot counters and CPU times at T0 and T1, stop
  sending at T1, write the latencies of the pairs answered in [T0, T1) to ``lat_file``
  and answer ``{"event": "done", ...}``;
* ``check``: ``{"event": "alive", ...}`` (sessions still open);
* ``close``: close every connection (``{"event": "closed"}``) and exit.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import sys
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from .procfs import cpu_seconds, cpu_split, machine_busy_seconds, raise_nofile
from .upstream import BENCH_METHOD

__all__ = ["GenConfig", "envelope", "plain_requests", "session_id"]

_TEXT = WSMsgType.TEXT
_RESULT = b'"result"'
_PROXY_HEAD = b'{"type":"proxy","sessionId":"'
_SID_AT = len(_PROXY_HEAD)
REQUESTS_PER_SESSION = 8  # pre-encoded requests per session (ids 1..8, cycling)
_MASK = REQUESTS_PER_SESSION - 1

perf_ns = time.perf_counter_ns


def plain_requests() -> list[bytes]:
    return [
        b'{"jsonrpc":"2.0","id":%d,"method":"%s","params":[1]}' % (i + 1, BENCH_METHOD.encode())
        for i in range(REQUESTS_PER_SESSION)
    ]


def session_id(gen: int, conn: int, k: int) -> str:
    """Fixed-length session ids (16 characters), so answers can be routed by offset."""
    return f"bench-{gen % 10}-{conn:05d}-{k:02d}"


SID_LEN = len(session_id(0, 0, 0))


def envelope(sid: str, payload: bytes) -> bytes:
    return b'{"type":"proxy","sessionId":"' + sid.encode() + b'","payload":' + payload + b"}"


@dataclass(slots=True)
class GenConfig:
    mode: str  # "load" or "hold"
    url: str
    envelope: bool
    sessions: int
    index: int = 0
    per_conn: int = 16
    cpus: list[int] | None = None
    sample_pids: list[int] = field(default_factory=list)  # the proxy's processes
    upstream_pids: list[int] = field(default_factory=list)
    lat_file: str = ""
    concurrency: int = 100
    timeout: float = 60.0


class Gen:
    """State shared by every client of this process."""

    def __init__(self, cfg: GenConfig) -> None:
        self.cfg = cfg
        self.lat: array[int] = array("q")
        self.running = False
        self.closing = False
        self.errors = 0
        self.lost = 0
        self.failures: Counter[str] = Counter()  # sessions that could not be opened, by why
        self.ended: Counter[str] = Counter()  # session_ended reasons received
        self.listeners: list[PlainClient | RelayConn] = []
        self.disconnected = 0
        self.all_gone: asyncio.Future[None] | None = None

    def gone(self) -> None:
        self.disconnected += 1
        if not self.closing:
            self.lost += 1
        if (
            self.all_gone is not None
            and self.disconnected >= len(self.listeners)
            and not self.all_gone.done()
        ):
            self.all_gone.set_result(None)


class PlainClient(WSListener):
    """One connection = one session (``direct``, ``nginx``, ``/rpc``)."""

    def __init__(self, gen: Gen, requests: list[bytes]) -> None:
        super().__init__()
        self.gen = gen
        self.lat_append = gen.lat.append
        self.reqs = requests
        self.i = 0
        self.sent = 0
        self.waiting = False
        self.open = False
        self.transport: WSTransport | None = None
        self.waiter: asyncio.Future[None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.open = True

    def kick(self) -> None:
        transport = self.transport
        if transport is None or not self.open:
            return
        i = (self.i + 1) & _MASK
        self.i = i
        self.waiting = True
        self.sent = perf_ns()
        transport.send(_TEXT, self.reqs[i])

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = perf_ns()
        if frame.msg_type is not _TEXT:
            _control(transport, frame)
            return
        self.waiting = False
        self.lat_append(now - self.sent)
        gen = self.gen
        if _RESULT not in frame.get_payload_as_bytes():
            gen.errors += 1
        if gen.running:
            i = (self.i + 1) & _MASK
            self.i = i
            self.waiting = True
            self.sent = perf_ns()
            transport.send(_TEXT, self.reqs[i])
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.open = False
        self.waiting = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))
        self.gen.gone()

    async def round_trip(self, timeout: float) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        self.kick()
        async with asyncio.timeout(timeout):
            await self.waiter

    def alive(self) -> int:
        return 1 if self.open else 0


class RelaySession:
    __slots__ = ("ended", "failed", "i", "reqs", "sent", "sid", "started", "waiter", "waiting")

    def __init__(self, sid: str, requests: list[bytes]) -> None:
        self.sid = sid
        self.reqs = [envelope(sid, r) for r in requests]
        self.i = 0
        self.sent = 0
        self.waiting = False
        self.started = False
        self.failed = False
        self.ended = False
        self.waiter: asyncio.Future[None] | None = None


class RelayConn(WSListener):
    """One ``/relay`` connection carrying several envelope sessions."""

    def __init__(self, gen: Gen, sids: list[str], requests: list[bytes]) -> None:
        super().__init__()
        self.gen = gen
        self.lat_append = gen.lat.append
        self.by_sid = {s.encode(): RelaySession(s, requests) for s in sids}
        self.open = False
        self.transport: WSTransport | None = None
        self.pending_starts = 0
        self.starts_done: asyncio.Future[None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.open = True

    def start_sessions(self) -> asyncio.Future[None]:
        self.starts_done = asyncio.get_running_loop().create_future()
        self.pending_starts = len(self.by_sid)
        assert self.transport is not None
        for s in self.by_sid.values():
            msg = orjson.dumps({"type": "session_start", "sessionId": s.sid})
            self.transport.send(_TEXT, msg)
        return self.starts_done

    def _start_settled(self) -> None:
        self.pending_starts -= 1
        done = self.starts_done
        if self.pending_starts <= 0 and done is not None and not done.done():
            done.set_result(None)

    def kick(self) -> None:
        transport = self.transport
        if transport is None or not self.open:
            return
        for s in self.by_sid.values():
            if s.started and not s.ended:
                i = (s.i + 1) & _MASK
                s.i = i
                s.waiting = True
                s.sent = perf_ns()
                transport.send(_TEXT, s.reqs[i])

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = perf_ns()
        if frame.msg_type is not _TEXT:
            _control(transport, frame)
            return
        data = frame.get_payload_as_bytes()
        if data.startswith(_PROXY_HEAD):
            s = self.by_sid.get(data[_SID_AT : _SID_AT + SID_LEN])
            if s is not None:
                s.waiting = False
                self.lat_append(now - s.sent)
                gen = self.gen
                if _RESULT not in data:
                    gen.errors += 1
                if gen.running:
                    i = (s.i + 1) & _MASK
                    s.i = i
                    s.waiting = True
                    s.sent = perf_ns()
                    transport.send(_TEXT, s.reqs[i])
                elif s.waiter is not None and not s.waiter.done():
                    s.waiter.set_result(None)
                return
        self._other(data)

    def _other(self, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.gen.failures["bad_json_from_relay"] += 1
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        sid = msg.get("sessionId") if isinstance(msg, dict) else None
        s = self.by_sid.get(sid.encode()) if isinstance(sid, str) else None
        if kind == "session_started" and s is not None:
            s.started = True
            self._start_settled()
        elif kind == "error":
            if s is not None and not s.started and not s.failed:
                s.failed = True
                self.gen.failures[f"error:{msg.get('code')}"] += 1
                self._start_settled()
            else:
                self.gen.errors += 1
        elif kind == "session_ended" and s is not None:
            s.ended = True
            s.waiting = False
            self.gen.ended[str(msg.get("reason"))] += 1
        else:
            self.gen.errors += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.open = False
        for s in self.by_sid.values():
            s.waiting = False
            if s.waiter is not None and not s.waiter.done():
                s.waiter.set_exception(ConnectionError("closed"))
        if self.starts_done is not None and not self.starts_done.done():
            self.starts_done.set_exception(ConnectionError("closed"))
        self.gen.gone()

    async def round_trip(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        waiters = []
        for s in self.by_sid.values():
            if s.started:
                s.waiter = loop.create_future()
                waiters.append(s.waiter)
        self.kick()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*waiters)

    def alive(self) -> int:
        if not self.open:
            return 0
        return sum(1 for s in self.by_sid.values() if s.started and not s.ended)


def _control(transport: WSTransport, frame: WSFrame) -> None:
    if frame.msg_type is WSMsgType.CLOSE:
        code = frame.get_close_code()
        transport.send_close(code if code is not WSCloseCode.NO_INFO else WSCloseCode.OK)
        transport.disconnect()


def _write_samples(path: str, samples: array[int]) -> None:
    with open(path, "wb") as f:
        samples.tofile(f)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Runner:
    def __init__(self, cfg: GenConfig) -> None:
        self.cfg = cfg
        self.gen = Gen(cfg)
        self.requests = plain_requests()

    async def open_all(self, round_trip: bool) -> None:
        cfg = self.cfg
        sem = asyncio.Semaphore(cfg.concurrency)
        units: list[Callable[[], Awaitable[None]]] = []
        if cfg.envelope:
            n_conns = -(-cfg.sessions // cfg.per_conn)
            for c in range(n_conns):
                k = min(cfg.per_conn, cfg.sessions - c * cfg.per_conn)
                sids = [session_id(cfg.index, c, j) for j in range(k)]
                units.append(self._unit(sem, sids, round_trip))
        else:
            units = [self._unit(sem, None, round_trip) for _ in range(cfg.sessions)]
        await asyncio.gather(*(u() for u in units))

    def _unit(
        self, sem: asyncio.Semaphore, sids: list[str] | None, round_trip: bool
    ) -> Callable[[], Awaitable[None]]:
        cfg, gen = self.cfg, self.gen
        weight = 1 if sids is None else len(sids)

        def factory() -> WSListener:
            if sids is None:
                return PlainClient(gen, self.requests)
            return RelayConn(gen, sids, self.requests)

        async def run() -> None:
            async with sem:
                try:
                    _, listener = await ws_connect(
                        factory,
                        cfg.url,
                        websocket_handshake_timeout=cfg.timeout,
                        enable_auto_ping=False,
                        read_buffer_init_size=4096,
                        logger_name="bench.loadgen",
                        max_redirects=0,
                    )
                except Exception as exc:
                    gen.failures[f"connect:{type(exc).__name__}"] += weight
                    return
                assert isinstance(listener, PlainClient | RelayConn)
                gen.listeners.append(listener)
                try:
                    if isinstance(listener, RelayConn):
                        async with asyncio.timeout(cfg.timeout):
                            await listener.start_sessions()
                    if round_trip:
                        await listener.round_trip(cfg.timeout)
                except (TimeoutError, ConnectionError) as exc:
                    gen.failures[f"open:{type(exc).__name__}"] += 1

        return run

    def alive(self) -> int:
        return sum(listener.alive() for listener in self.gen.listeners)

    def snapshot(self) -> dict[str, float]:
        cfg = self.cfg
        busy, total = machine_busy_seconds()
        proxy_user, proxy_sys = cpu_split(cfg.sample_pids)
        return {
            "t": time.monotonic(),
            "idx": float(len(self.gen.lat)),
            "gen_cpu": self_cpu(),
            "proxy_cpu": proxy_user + proxy_sys,
            "proxy_user": proxy_user,
            "proxy_sys": proxy_sys,
            "upstream_cpu": cpu_seconds(cfg.upstream_pids),
            "busy": busy,
            "total": total,
        }

    async def measure(self, t0: float, t1: float) -> dict[str, Any]:
        gen = self.gen
        gen.running = True
        for listener in gen.listeners:
            listener.kick()
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        a = self.snapshot()
        await asyncio.sleep(max(0.0, t1 - time.monotonic()))
        b = self.snapshot()
        gen.running = False
        i0, i1 = int(a["idx"]), int(b["idx"])
        _write_samples(self.cfg.lat_file, gen.lat[i0:i1])
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and self._waiting():  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
        result = {
            "event": "done",
            "pairs": i1 - i0,
            "window_s": b["t"] - a["t"],
            "errors": gen.errors,
            "lost": gen.lost,
            "still_waiting": self._waiting(),
            "sessions": self.alive(),
            "ended": dict(gen.ended),
        }
        for key in (
            "gen_cpu",
            "proxy_cpu",
            "proxy_user",
            "proxy_sys",
            "upstream_cpu",
            "busy",
            "total",
        ):
            result[key] = b[key] - a[key]
        del gen.lat[:]
        return result

    def _waiting(self) -> int:
        n = 0
        for listener in self.gen.listeners:
            if isinstance(listener, PlainClient):
                n += listener.waiting
            else:
                n += sum(1 for s in listener.by_sid.values() if s.waiting)
        return n

    async def close_all(self) -> None:
        gen = self.gen
        gen.closing = True
        gen.running = False
        open_ones = [x for x in gen.listeners if x.open and x.transport is not None]
        gen.all_gone = asyncio.get_running_loop().create_future()
        gen.disconnected = len(gen.listeners) - len(open_ones)
        for listener in open_ones:
            assert listener.transport is not None
            listener.transport.send_close(WSCloseCode.OK)
        if open_ones:
            try:
                async with asyncio.timeout(5.0):
                    await gen.all_gone
            except TimeoutError:
                pass
        for listener in open_ones:
            if listener.transport is not None and not listener.transport.is_disconnected:
                listener.transport.disconnect(graceful=False)

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        cfg = self.cfg
        started = time.monotonic()
        cpu0 = self_cpu()
        await self.open_all(round_trip=cfg.mode == "hold")
        gc.collect()
        gc.freeze()
        gc.disable()  # no collector pauses inside the timed phase (the loop makes no cycles)
        emit(
            {
                "event": "ready",
                "sessions": self.alive(),
                "connections": len(self.gen.listeners),
                "failures": dict(self.gen.failures),
                "setup_s": time.monotonic() - started,
                "setup_cpu_s": self_cpu() - cpu0,
                "errors": self.gen.errors,
            }
        )
        while True:
            try:
                async with asyncio.timeout(1800):
                    line = (await reader.readline()).decode().split()
            except TimeoutError:
                line = []
            if not line or line[0] == "close":
                await self.close_all()
                emit({"event": "closed"})
                return 0
            if line[0] == "go":
                emit(await self.measure(float(line[1]), float(line[2])))
            elif line[0] == "check":
                emit(
                    {
                        "event": "alive",
                        "sessions": self.alive(),
                        "lost": self.gen.lost,
                        "ended": dict(self.gen.ended),
                    }
                )


def main(argv: list[str]) -> int:
    cfg = GenConfig(**orjson.loads(argv[1]))
    raise_nofile()
    if cfg.cpus:
        os.sched_setaffinity(0, set(cfg.cpus))
    import uvloop

    return uvloop.run(Runner(cfg).main())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
