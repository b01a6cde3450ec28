"""The compiled data plane (ghostcloak_relay/native.py): used only when current, and the
pure-Python relay still works.

The rest of the suite runs against whichever the setup produced: compiled in CI
(``RELAY_REQUIRE_NATIVE=1``), so the tests prove the code users run.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import ghostcloak_relay
from ghostcloak_relay import native, stats
from ghostcloak_relay.devnode import DevNode

from .conftest import ROOT, Client, free_port

REQUIRED = os.environ.get("RELAY_REQUIRE_NATIVE") == "1"
BUILT = (native.NATIVE_DIR / native.STAMP).is_file()


def _probe(package_parent: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Import the package found in ``package_parent`` in a fresh interpreter and report
    whether it runs compiled and where each hot-path module came from."""
    code = (
        "import json, importlib, ghostcloak_relay as g\n"
        "files = {m: importlib.import_module('ghostcloak_relay.' + m).__file__"
        f" for m in {native.MODULES + native.CYTHON_MODULES!r}}}\n"
        "print(json.dumps({'native': g.NATIVE, 'files': files}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(package_parent), **(env or {})},
        cwd=package_parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = orjson.loads(out.stdout)
    return result


def _compiled(files: dict[str, str]) -> set[str]:
    return {m for m, f in files.items() if not f.endswith(".py")}


def test_the_data_plane_is_compiled_when_required_and_all_or_nothing() -> None:
    here = _probe(ROOT / "src")
    compiled = _compiled(here["files"])
    assert compiled in (set(), {*native.MODULES, *native.CYTHON_MODULES})  # never a mix
    assert here["native"] == bool(compiled) == ghostcloak_relay.NATIVE
    if REQUIRED:
        assert here["native"], "RELAY_REQUIRE_NATIVE=1 but the compiled modules are not used"


@pytest.mark.skipif(not BUILT and not REQUIRED, reason="no compiled build (no C compiler?)")
@pytest.mark.parametrize("source", ["session.py", "frame_gate.pyx"])
def test_an_edited_source_never_runs_as_stale_compiled_code(tmp_path: Path, source: str) -> None:
    copy = tmp_path / "ghostcloak_relay"
    shutil.copytree(native.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    assert _probe(tmp_path)["native"] is True  # the same build, moved: still current

    edited = copy / source
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    stale = _probe(tmp_path)
    assert stale["native"] is False
    assert _compiled(stale["files"]) == set()


@pytest.mark.skipif(not BUILT and not REQUIRED, reason="no compiled build (no C compiler?)")
@pytest.mark.parametrize("pattern", [f"{native.SHARED_LIBRARY}.*", "ghostcloak_relay/frame_gate.*"])
def test_a_shared_library_that_cannot_load_means_pure_python(tmp_path: Path, pattern: str) -> None:
    """A current stamp is not enough: when a library itself does not load here (built
    against another libc, say), the relay runs as pure Python instead of failing; that
    goes for the mypyc library and the Cython frame gate alike (never a mix)."""
    copy = tmp_path / "ghostcloak_relay"
    shutil.copytree(native.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (library,) = (copy / "_native").glob(pattern)
    library.write_bytes(b"not an ELF file")
    broken = _probe(tmp_path)
    assert broken["native"] is False
    assert _compiled(broken["files"]) == set()


@pytest.mark.slow
def test_the_core_suites_pass_as_pure_python() -> None:
    """CI runs everything against the compiled build; the interpreter (what a machine
    without a C compiler runs) must pass the core behaviour suites too."""
    suites = [
        "test_relay.py",
        "test_rpc_endpoint.py",
        "test_policy.py",
        "test_limits.py",
        "test_backpressure.py",
        "test_privacy.py",
        "test_protocol.py",
        "test_frames.py",
        "test_frame_gate.py",
        "test_drain.py",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]
        + [f"tests/{name}" for name in suites],
        env={**os.environ, "RELAY_PURE_PYTHON": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]
    assert "failed" not in run.stdout.splitlines()[-1]


def test_a_build_is_only_valid_for_the_picows_it_was_compiled_against() -> None:
    """The Cython gate is compiled against picows' C structs: after a picows upgrade the
    stamp no longer matches (pure Python until the next build) instead of crashing."""
    picows = importlib.metadata.version("picows")
    assert native.build_tag().endswith(f"-picows{picows}")


def test_relay_pure_python_turns_the_compiled_modules_off() -> None:
    pure = _probe(ROOT / "src", {"RELAY_PURE_PYTHON": "1"})
    assert pure["native"] is False
    assert _compiled(pure["files"]) == set()


async def test_the_pure_python_relay_serves_both_endpoints(
    relay_process: Callable[..., Any],
    devnode: DevNode,
    client_factory: Callable[..., Awaitable[Client]],
) -> None:
    port = free_port()
    proc = relay_process(
        {"MIDNIGHT_NODE": devnode.url, "PORT": str(port), "RELAY_PURE_PYTHON": "1"}
    )
    await proc.wait_listening()
    assert "pure-Python data plane" in proc.output
    relay = await client_factory(f"ws://127.0.0.1:{port}/relay")
    await relay.start("pure-session-1")
    assert (await relay.call("pure-session-1", "system_chain"))["result"] == "GhostCloak Dev"
    rpc = await client_factory(f"ws://127.0.0.1:{port}/rpc")
    await rpc.send({"jsonrpc": "2.0", "id": 7, "method": "system_chain"})
    assert await rpc.recv() == {"jsonrpc": "2.0", "id": 7, "result": "GhostCloak Dev"}
    await rpc.send({"jsonrpc": "2.0", "id": 8, "method": "author_rotateKeys"})
    assert (await rpc.recv())["error"]["code"] == -32601


def test_stats_fields_list_every_counter() -> None:
    """Compiled classes have no ``__dict__``: worker snapshots use ``stats.FIELDS``, which
    must name every attribute ``Stats.__init__`` sets."""
    tree = ast.parse((native.PACKAGE_DIR / "stats.py").read_text())
    init = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "__init__"
    )
    assigned = {
        t.attr
        for n in ast.walk(init)
        for t in (n.targets if isinstance(n, ast.Assign) else [getattr(n, "target", None)])
        if isinstance(t, ast.Attribute)
    }
    assert assigned == set(stats.FIELDS)
    s = stats.Stats(2)
    s.msgs_to_node, s.rtt_sum = 3, 0.5
    s.refused["queue_full"] += 1
    merged = s.merged([s.snapshot()])
    assert (merged.msgs_to_node, merged.rtt_sum, merged.refused["queue_full"]) == (6, 1.0, 2)


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        (0.0, 0),
        (0.0001, 0),
        (0.001, 0),  # a bound belongs to its bucket (Prometheus "le")
        (0.0010001, 1),
        (0.0025, 1),
        (0.7, 9),
        (60.0, len(stats.RTT_BUCKETS) - 1),
        (60.5, len(stats.RTT_BUCKETS)),  # +Inf
    ],
)
def test_round_trip_buckets_are_le_bounds(seconds: float, bucket: int) -> None:
    """The hot-path histogram (a scan, not bisect, when compiled) puts each round trip in
    the first bucket whose bound is >= it, as bisect_left and Prometheus' le do."""
    s = stats.Stats(1)
    s.observe_rtt(seconds)
    assert s.rtt_counts.index(1) == bucket
    assert sum(s.rtt_counts) == 1
    assert s.rtt_sum == seconds
