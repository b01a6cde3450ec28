"""Real-node test harness: chopsticks serving real Substrate runtimes.

Tier 3 of ``../shared/DESIGN.md``. A session-scoped fixture starts chopsticks
(``@acala-network/chopsticks``, installed by ``scripts/setup-realnode.sh`` into
``.realnode/``) on a chain spec from ``../shared/fixtures/`` and yields its
``ws://127.0.0.1:PORT`` URL. Real clients (``substrate-interface``,
``@polkadot/api``, the Midnight wallet SDK node client) then talk to the URL
that :func:`rpc_url_for` gives for that node; the tests use only
``solochain_rpc_url`` and ``midnight_rpc_url``.

Missing prerequisites (node, the npm install, the chain specs, the Python
client) skip these tests with the reason, or fail them when
``RELAY_REQUIRE_REAL_NODE=1`` (as CI sets it): see :func:`require`.

Invariants: every wait is bounded; every process started here is ended here,
by its own PID; nothing listens or connects beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest
from websockets.sync.client import connect

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIXTURES = ROOT / ".." / "shared" / "fixtures"
REALNODE = ROOT / ".realnode"
CHOPSTICKS = REALNODE / "node_modules" / "@acala-network" / "chopsticks" / "chopsticks.cjs"
JS_SRC = HERE / "js"
JS_RUN = REALNODE / "js"  # scripts run from here, so that ESM imports find .realnode/node_modules
LOGS = REALNODE / "logs"
PACKAGE_JSON = JS_SRC / "package.json"  # the pinned npm versions
INSTALL_STAMP = REALNODE / ".installed-package-json.sha256"  # written by setup-realnode.sh

SOLOCHAIN_SPEC = FIXTURES / "solochain-local-raw.json"
MIDNIGHT_SPEC = FIXTURES / "midnight-node-dev-01-chain-spec-raw.json"

STARTUP_DEADLINE_S = 90.0
STOP_GRACE_S = 10.0
LISTENING = re.compile(r"RPC listening on .*?(ws://127\.0\.0\.1:\d+)")
RESULT_PREFIX = "RESULT "  # the one line a js/ script prints on success (see js/common.mjs)
SETUP_HINT = "run scripts/setup-realnode.sh"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder ``realnode`` (deselect with ``-m 'not realnode'``)."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.realnode)


def require(reason: str) -> NoReturn:
    """A prerequisite is missing: skip, or fail when ``RELAY_REQUIRE_REAL_NODE=1``."""
    if os.environ.get("RELAY_REQUIRE_REAL_NODE") == "1":
        pytest.fail(f"real-node prerequisite missing (RELAY_REQUIRE_REAL_NODE=1): {reason}")
    pytest.skip(f"real-node prerequisite missing: {reason}")


def node_binary() -> str:
    """Path of ``node``, or :func:`require`."""
    node = shutil.which("node")
    if node is None:
        require(f"`node` (Node.js 20+) is not on PATH; install it, then {SETUP_HINT}")
    return node


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        require(f"{what} not found at {path.resolve()}")
    return path


def require_npm_install() -> None:
    """The npm packages of js/package.json are installed in .realnode/, and current."""
    require_file(CHOPSTICKS, f"chopsticks ({SETUP_HINT})")
    want = hashlib.sha256(PACKAGE_JSON.read_bytes()).hexdigest()
    have = INSTALL_STAMP.read_text().strip() if INSTALL_STAMP.is_file() else None
    if have != want:
        require(f"{INSTALL_STAMP} does not match {PACKAGE_JSON} ({SETUP_HINT})")


# --------------------------------------------------------------------------- chopsticks


class Chopsticks:
    """One chopsticks process: started, drained to a log file, stopped by its own PID."""

    def __init__(self, name: str, spec: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.log_path = LOGS / f"chopsticks-{name}.log"
        self.url: str | None = None
        self._ready = threading.Event()
        self._tail: deque[str] = deque(maxlen=40)
        node = node_binary()
        require_npm_install()
        argv = [
            node,
            str(CHOPSTICKS),
            "--genesis",
            str(require_file(spec, "chain spec fixture").resolve()),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--build-block-mode",
            "Instant",
            *extra_args,
        ]
        LOGS.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no terminal signals; we stop it ourselves
            preexec_fn=_DIE_WITH_PARENT,
        )
        self._drain = threading.Thread(target=self._read, name=f"chopsticks-{name}", daemon=True)
        self._drain.start()

    def _read(self) -> None:
        """Copy stdout to the log until EOF, so the pipe never fills; spot the URL."""
        assert self.proc.stdout is not None
        with self.log_path.open("wb") as log:
            for raw in self.proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", "replace").rstrip()
                self._tail.append(line)
                if self.url is None and (m := LISTENING.search(line)):
                    self.url = m.group(1)
                    self._ready.set()
        self._ready.set()  # EOF: wake the waiter, which sees no URL

    def wait_ready(self, deadline_s: float = STARTUP_DEADLINE_S) -> str:
        self._ready.wait(deadline_s)
        if self.url is None:
            code = self.proc.poll()
            why = f"exited with {code}" if code is not None else f"not ready in {deadline_s:.0f} s"
            self.stop()
            tail = "\n".join(self._tail)
            pytest.fail(f"chopsticks ({self.name}) {why}; log {self.log_path}:\n{tail}")
        return self.url

    def stop(self) -> None:
        stop_process(self.proc)
        self._drain.join(STOP_GRACE_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM a process we started (by its PID), wait, then SIGKILL it if needed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_GRACE_S)


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn: the child gets SIGTERM if pytest dies without teardown (Linux only).

    libc is loaded here, in the parent, so the child only makes one call.
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook


_DIE_WITH_PARENT = _die_with_parent_hook()


@contextlib.contextmanager
def chopsticks(name: str, spec: Path, *extra_args: str) -> Iterator[str]:
    node = Chopsticks(name, spec, extra_args)
    try:
        yield node.wait_ready()
    finally:
        node.stop()


def wait_past_genesis(url: str, deadline_s: float = 30.0) -> None:
    """Wait (bounded) until the chain's best and finalized blocks are past genesis.

    chopsticks builds block 1 as it starts. A client that signs before then signs its
    mortal transaction against the genesis header, whose own hash differs from the
    genesis hash the runtime keeps (FRAME's 0x4545... placeholder, which chopsticks also
    reports for block 0), and the node rejects the signature with ``1010 badProof``. One
    cold CI run got exactly that on its first transfer (not reproduced in 30 warm reruns);
    this is the one way we found for it to happen. Real networks are never at genesis.
    """
    deadline = time.monotonic() + deadline_s
    with connect(url, open_timeout=10) as ws:

        def call(method: str, *params: Any) -> Any:
            ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
            return json.loads(ws.recv(timeout=10))["result"]

        while True:
            best = int(call("chain_getHeader")["number"], 16)
            final = int(call("chain_getHeader", call("chain_getFinalizedHead"))["number"], 16)
            if min(best, final) >= 1:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"chopsticks stayed at genesis for {deadline_s:.0f} s")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def solochain_node_url() -> Iterator[str]:
    """chopsticks on the solochain template spec: builds blocks, takes signed extrinsics."""
    with chopsticks("solochain", SOLOCHAIN_SPEC) as url:
        wait_past_genesis(url)
        yield url


@pytest.fixture(scope="session")
def midnight_node_url() -> Iterator[str]:
    """chopsticks on the real Midnight spec: read-only (its ledger host functions are missing)."""
    with chopsticks("midnight", MIDNIGHT_SPEC, "--allow-unresolved-imports") as url:
        yield url


# --------------------------------------------------------------------------- client URLs


class RelayUnderTest:
    """``ghostcloak-relay serve`` in front of one node, as a child process."""

    def __init__(self, node_url: str, log_dir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"relay-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {
            **os.environ,
            "MIDNIGHT_NODE": node_url,
            "PORT": str(self.port),
            "RELAY_HOST": "127.0.0.1",
            "RELAY_LOG_LEVEL": "info",
        }
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ghostcloak-relay"), "serve"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_DIE_WITH_PARENT,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"relay exited: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail("relay did not start listening")
                time.sleep(0.05)

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture(scope="session")
def relay_for() -> Iterator[Callable[[str], RelayUnderTest]]:
    """One relay per node URL, started on first use, stopped (by its PID) at the end."""
    relays: dict[str, RelayUnderTest] = {}

    def get(node_url: str) -> RelayUnderTest:
        if node_url not in relays:
            relays[node_url] = RelayUnderTest(node_url, LOGS)
        return relays[node_url]

    yield get
    for relay in relays.values():
        relay.stop()


@pytest.fixture(scope="session")
def rpc_url_for(relay_for: Callable[[str], RelayUnderTest]) -> Callable[[str], str]:
    """Map a node URL to the relay's drop-in ``/rpc`` URL in front of that node."""
    return lambda node_url: relay_for(node_url).url("/rpc")


@pytest.fixture(scope="session")
def relay_url_for(relay_for: Callable[[str], RelayUnderTest]) -> Callable[[str], str]:
    """Map a node URL to the relay's envelope ``/relay`` URL in front of that node."""
    return lambda node_url: relay_for(node_url).url("/relay")


@pytest.fixture(scope="session")
def solochain_relay_url(relay_url_for: Callable[[str], str], solochain_node_url: str) -> str:
    return relay_url_for(solochain_node_url)


@pytest.fixture(scope="session")
def solochain_rpc_url(rpc_url_for: Callable[[str], str], solochain_node_url: str) -> str:
    return rpc_url_for(solochain_node_url)


@pytest.fixture(scope="session")
def midnight_rpc_url(rpc_url_for: Callable[[str], str], midnight_node_url: str) -> str:
    return rpc_url_for(midnight_node_url)


# --------------------------------------------------------------------------- clients


def _jsonrpc(url: str, method: str, params: list[Any] | None = None, timeout: float = 20.0) -> Any:
    with connect(url, open_timeout=timeout, close_timeout=5) as ws:
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}))
        while True:
            reply = json.loads(ws.recv(timeout=timeout))
            if reply.get("id") == 1:
                break
    assert "error" not in reply, f"{method}: {reply['error']}"
    return reply["result"]


@pytest.fixture(scope="session")
def jsonrpc() -> Callable[..., Any]:
    """``jsonrpc(url, method, params=None, timeout=20.0)``: one call on a fresh WebSocket.

    Returns the result; an error answer fails the assertion. Tests use it as a
    control channel to the node (``dev_newBlock``) and to cross-check values.
    """
    return _jsonrpc


@pytest.fixture(scope="session")
def substrateinterface() -> ModuleType:
    """The ``substrateinterface`` module (PyPI ``substrate-interface==1.8.1``)."""
    try:
        return importlib.import_module("substrateinterface")
    except ImportError:
        require("Python package substrate-interface is not installed (scripts/setup.sh test)")


@pytest.fixture(scope="session")
def node_script() -> Callable[..., dict[str, Any]]:
    """Run ``js/NAME URL`` with ``node``; return its RESULT object, or fail with its stderr."""
    node = node_binary()
    require_npm_install()
    JS_RUN.mkdir(parents=True, exist_ok=True)
    for script in JS_SRC.glob("*.mjs"):
        shutil.copyfile(script, JS_RUN / script.name)

    def run(name: str, url: str, timeout: float = 90.0) -> dict[str, Any]:
        try:
            done = subprocess.run(
                [node, str(JS_RUN / name), url],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{name} did not finish in {timeout:.0f} s; stderr:\n{exc.stderr}")
        results = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
        if done.returncode != 0 or len(results) != 1:
            pytest.fail(
                f"{name} {url} exited {done.returncode}\n"
                f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
            )
        result: dict[str, Any] = json.loads(results[0].removeprefix(RESULT_PREFIX))
        return result

    return run
