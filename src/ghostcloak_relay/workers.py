"""``RELAY_WORKERS``: several relay processes on one port, supervised.

The supervisor (the process started as ``ghostcloak-relay serve``) maps the shared
:class:`~.board.Board`, picks the port if ``PORT=0``, and forks the workers; each runs
the normal relay on the same port with SO_REUSEPORT, so the kernel spreads connections
over them. The supervisor runs no event loop: it waits for children and handles
signals. A worker that dies is logged and started again (with a growing pause if it
keeps dying). SIGTERM/SIGINT are passed to every worker, which drain as one server would;
the supervisor exits 0 when all have exited 0. SIGHUP (certificate reload) is passed on.
A worker whose supervisor is gone without passing anything on (SIGKILL, the OOM killer)
gets SIGTERM from the kernel and drains too, instead of serving on unsupervised.

Limits that are per process stay per worker: sessions per connection, per-client
connection and rate limits (a client's connections may land on different workers), and
``sessionId`` uniqueness for client-chosen ids across workers (relay-made ids are random).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from types import FrameType

from .board import Board
from .config import Settings

__all__ = ["SIGNALS", "run_workers", "worker_count"]

#: The signals the supervisor passes on to its workers.
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}

log = logging.getLogger("ghostcloak_relay.workers")


def worker_count(setting: int) -> int:
    return setting if setting > 0 else (os.cpu_count() or 1)


def _reserve_port(host: str, port: int) -> tuple[socket.socket | None, int]:
    """With ``PORT=0``, hold a SO_REUSEPORT socket on a free port so workers share it."""
    if port != 0:
        return None, port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock, int(sock.getsockname()[1])


def run_workers(settings: Settings, serve: Callable[[Settings, Board, int], int]) -> int:
    """Fork ``settings.workers`` workers running ``serve(settings, board, index)``."""
    count = worker_count(settings.workers)
    board = Board(count)
    reserved, port = _reserve_port(settings.host, settings.port)
    settings = replace(settings, port=port)
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False
    crashes: dict[int, list[float]] = {i: [] for i in range(count)}

    supervisor = os.getpid()

    def spawn(index: int) -> None:
        # Signals stay blocked across the fork: the supervisor cannot miss the new child,
        # and the child keeps them pending until its event loop handles them (run()).
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            _drain_when_orphaned(supervisor)
            code = 1
            try:
                code = serve(settings, board, index)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            if stopping:  # a second signal: stop now
                for pid in children:
                    _kill(pid, signal.SIGKILL)
                os._exit(1)
            stopping = True
            log.info(
                "received %s: draining %d worker(s)", signal.Signals(signum).name, len(children)
            )
        for pid in list(children):
            _kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    log.info("starting %d workers on port %d (SO_REUSEPORT)", count, port)
    for index in range(count):
        spawn(index)
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        index = children.pop(pid)
        board.worker_gone(index)
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            status = status or (code if code > 0 else 0 if code == 0 else 1)
            continue
        log.error("worker %d exited (status %d); starting it again", index, code)
        now = time.monotonic()
        recent = [t for t in crashes[index] if now - t < 60] + [now]
        crashes[index] = recent
        time.sleep(min(5.0, 0.1 * 2 ** (len(recent) - 1)))  # back off a crash loop
        if not stopping:
            spawn(index)
    if reserved is not None:
        reserved.close()
    log.info("all workers stopped")
    return status


def _drain_when_orphaned(supervisor: int) -> None:
    """In a new worker: have the kernel send SIGTERM when the supervisor dies (Linux
    ``PR_SET_PDEATHSIG``), so the worker drains as on an ordinary SIGTERM. A supervisor
    that died before this call is caught by the parent check after it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)  # pending until the event loop handles it


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
