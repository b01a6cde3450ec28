"""Processes of a benchmark run: the upstream, nginx, the relay and the load generators.

Every process is started here, remembered by PID and stopped by PID (SIGTERM, then
SIGKILL after a grace period); nothing is ever stopped by name. Every wait is bounded.
All sockets are on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from .procfs import children_of

__all__ = [
    "RELAY_BENCH_ENV",
    "GenProc",
    "HarnessError",
    "Server",
    "free_port",
    "health",
    "nginx_config",
    "nofile_limits",
    "start_nginx",
    "start_relay",
    "start_upstream",
]

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

#: Relay settings for the benchmark: limits out of the way, one process, quiet logs.
RELAY_BENCH_ENV = {
    "RELAY_HOST": HOST,
    "RELAY_LOG_LEVEL": "warning",
    "RELAY_WORKERS": "1",
    "RELAY_RATE_LIMIT": "0",
    "RELAY_RATE_LIMIT_PER_CLIENT": "0",
    "RELAY_MAX_CONNECTIONS_PER_CLIENT": "100000",
    "RELAY_MAX_SESSIONS_PER_CONNECTION": "16",
    "RELAY_MAX_CONNECTIONS": "100000",
    "RELAY_MAX_SESSIONS": "100000",
    "RELAY_SHUTDOWN_TIMEOUT": "3",
}


class HarnessError(RuntimeError):
    """A process did not start or answer in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _preexec(cpus: set[int] | None, soft_nofile: int | None = None) -> Callable[[], None] | None:
    """Pin the child to ``cpus`` and, if asked, lower its soft open-file limit."""
    if not cpus and soft_nofile is None:
        return None
    chosen = set(cpus or ())

    def setup() -> None:
        if chosen:
            os.sched_setaffinity(0, chosen)
        if soft_nofile is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft_nofile, hard), hard))

    return setup


def set_affinity(pids: Iterable[int], cpus: set[int]) -> None:
    """Move every thread of each running process in ``pids`` to ``cpus``."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue  # gone: the phase reports it
        for tid in tids:
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(tid, cpus)


def nofile_limits(pid: int) -> tuple[int, int] | None:
    """(soft, hard) ``Max open files`` of a running process, from /proc/<pid>/limits."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    return int(soft), int(hard)
    except (OSError, ValueError):
        return None
    return None


def _stop(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Server:
    """A server process we started (upstream, nginx master or relay)."""

    name: str
    proc: subprocess.Popen[Any]
    port: int
    log: Path
    with_children: bool = False  # nginx: the master and its workers
    extra: dict[str, Any] = field(default_factory=dict)

    def pids(self) -> list[int]:
        pids = [self.proc.pid]
        if self.with_children:
            pids += children_of(self.proc.pid)
        return pids

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        _stop(self.proc)

    def log_tail(self) -> str:
        return _tail(self.log)


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a child's stdout, or raise after ``timeout`` seconds."""
    box: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: box.put(stream.readline()), daemon=True).start()
    try:
        return box.get(timeout=timeout)
    except queue.Empty:
        raise HarnessError("no answer in time") from None


def start_upstream(work: Path, cpus: set[int] | None) -> Server:
    log = work / "upstream.log"
    cmd = [sys.executable, "-m", "bench.upstream", "--host", HOST, "--port", "0"]
    for cpu in sorted(cpus or ()):
        cmd += ["--cpu", str(cpu)]
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    try:
        line = _read_line(proc.stdout, 20.0).decode().split()
    except HarnessError:
        _stop(proc)
        raise HarnessError(f"upstream did not start: {_tail(log)}") from None
    if len(line) != 2 or line[0] != "PORT":
        _stop(proc)
        raise HarnessError(f"upstream did not start: {_tail(log)}")
    return Server("upstream", proc, int(line[1]), log)


def _wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise HarnessError("did not answer in time")


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as resp:
        data: dict[str, Any] = orjson.loads(resp.read())
        return data


def start_relay(
    work: Path,
    upstream_port: int,
    cpus: set[int] | None,
    tag: str = "",
    soft_nofile: int | None = None,
    pure: bool = False,
) -> Server:
    """The relay as an operator runs it: ``ghostcloak-relay serve`` with environment
    settings. ``soft_nofile`` starts it with a low soft open-file limit (as a default
    shell would), to check that the relay raises its own limit. ``pure``: with
    ``RELAY_PURE_PYTHON=1`` (the interpreter instead of the compiled data plane)."""
    port = free_port()
    log = work / f"relay{tag}.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("RELAY_") or k in ("PORT", "MIDNIGHT_NODE"))
    }
    env.update(RELAY_BENCH_ENV)
    env["PORT"] = str(port)
    env["MIDNIGHT_NODE"] = f"ws://{HOST}:{upstream_port}"
    if pure:
        env["RELAY_PURE_PYTHON"] = "1"
    exe = Path(sys.executable).parent / "ghostcloak-relay"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(exe), "serve"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_preexec(cpus, soft_nofile),
        )
    try:
        _wait_http(port, "/health", 30.0, proc)
    except HarnessError as exc:
        _stop(proc)
        raise HarnessError(f"relay did not start ({exc}): {_tail(log)}") from None
    name = "relay-py" if pure else "relay"
    return Server(name, proc, port, log, extra={"env": {**RELAY_BENCH_ENV}, "pure": pure})


def nginx_config(work: Path, port: int, upstream_port: int, nofile: int) -> str:
    """A plain WebSocket reverse proxy: one worker, no access log, long timeouts."""
    connections = max(1024, nofile - 64)
    return f"""# generated by bench/harness.py
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    tcp_nodelay on;
    upstream node {{
        server {HOST}:{upstream_port};
    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{
            proxy_pass http://node;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            proxy_buffering off;
            tcp_nodelay on;
        }}
    }}
}}
"""


def start_nginx(
    nginx: str, work: Path, upstream_port: int, cpus: set[int] | None, nofile: int, tag: str = ""
) -> Server:
    port = free_port()
    home = (work / f"nginx{tag}").resolve()
    home.mkdir(parents=True, exist_ok=True)
    conf = home / "nginx.conf"
    conf.write_text(nginx_config(home, port, upstream_port, nofile))
    log = home / "nginx-error.log"
    with open(home / "nginx.out", "ab") as out:
        proc = subprocess.Popen(
            [nginx, "-p", str(home), "-c", str(conf), "-e", str(log)],
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_preexec(cpus),
        )
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"nginx exited ({proc.returncode}): {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            if children_of(proc.pid):
                return Server("nginx", proc, port, log, with_children=True)
        time.sleep(0.1)
    _stop(proc)
    raise HarnessError(f"nginx did not start: {_tail(log)}")


class GenProc:
    """One load generator process (``bench.loadgen``), driven over its stdio."""

    def __init__(self, cfg: dict[str, Any], log: Path) -> None:
        self.cfg = cfg
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen", orjson.dumps(cfg).decode()],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(b"")

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"load generator: no {event!r} within {timeout:.0f} s")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if not line:
                raise HarnessError(f"load generator exited: {_tail(self.log)}")
            msg: dict[str, Any] = orjson.loads(line)
            if msg.get("event") == event:
                return msg

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise HarnessError(f"load generator gone: {_tail(self.log)}") from exc

    def close(self) -> None:
        """Ask it to close its connections and exit; stop it by PID if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(HarnessError):
                self.send("close")
                self.expect("closed", 15.0)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                _stop(self.proc, 1.0)


def close_all(gens: Iterable[GenProc]) -> None:
    for gen in gens:
        gen.close()
