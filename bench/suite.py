"""The benchmark suite: set up, run the interleaved rounds, measure memory, write the report.

Order of a run:

1. dependencies (nginx from Debian, matplotlib and tqdm into this environment);
2. long-lived servers, each pinned to its CPU: the echo upstream, nginx, the relay;
3. ``--rounds`` rounds; in each, every level (1, 50, 500 sessions) runs every variant
   (``direct``, ``nginx``, ``rpc``, ``relay``) in an order rotated by round and level,
   each phase with fresh generator processes: connect, warm up, timed phase, close;
4. ``--profile``: one extra ``/relay`` phase at 50 sessions under py-spy (not in medians);
5. memory: for ``nginx``, ``rpc`` and ``relay``, a *fresh* proxy, then ``--idle-sessions``
   idle sessions (one round trip each), RSS before and after;
6. ``--scale N``: N concurrent ``/relay`` sessions in a fresh relay, held open;
7. Markdown, JSON and PNG to ``bench/results/<date>-<commit>`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import deps
from .cli import PURE_VARIANTS, VARIANTS
from .harness import (
    REPO,
    GenProc,
    HarnessError,
    Server,
    close_all,
    health,
    nofile_limits,
    set_affinity,
    start_nginx,
    start_relay,
    start_upstream,
)
from .procfs import cpu_seconds, fd_count, machine_busy_seconds, raise_nofile, rss_kb
from .report import (
    MemoryResult,
    PhaseResult,
    latency_stats,
    summarize,
    targets,
    write_outputs,
)

__all__ = ["Bench"]

MEMORY_VARIANTS = ("nginx", "rpc", "relay")
SCALE_START_NOFILE = 1024  # the scale relay starts with a default shell's soft limit
QUIET_CORES = 0.25  # "quiet": other processes use less than this many CPUs
PER_CONN = 16  # /relay sessions per connection (RELAY_MAX_SESSIONS_PER_CONNECTION)

Hook = Callable[[float, float], None]


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.decode().strip() if done.returncode == 0 else ""


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _loadavg() -> str:
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
    return "?"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _nginx_version(nginx: str) -> str:
    try:
        done = subprocess.run([nginx, "-v"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "nginx ?"
    return done.stderr.decode().strip().replace("nginx version: ", "")


class Placement:
    """Which CPUs each process may use.

    At 50 and 500 sessions the proxy has a CPU of its own, so its CPU use is its own. At 1
    session (unless ``separate_at_1``) every process shares the upstream's CPU: ``direct``
    (generator and upstream) already runs on one CPU, and a proxy on another CPU would pay
    a cross-CPU wake-up on each of its four hops per pair, which in a VM costs tens of
    microseconds (the hypervisor's, not the proxy's) and would be counted as latency the
    proxy adds. On one CPU the figure is the proxy's own work plus its context switches.
    """

    def __init__(self, pin: bool, separate_at_1: bool = False) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.pinned = pin and len(cpus) >= 2
        self.proxy: set[int] | None = None
        self.upstream: set[int] | None = None
        self.gen: set[int] | None = None
        #: where every process runs at 1 session (None: the usual placement)
        self.one_cpu: set[int] | None = None
        self.gen_cpus = len(cpus)
        self.text = "not pinned"
        if not self.pinned:
            return
        gen = set(cpus[2:]) or {cpus[1]}
        self.proxy, self.upstream, self.gen = {cpus[0]}, {cpus[1]}, gen
        self.gen_cpus = max(1, len(cpus) - 2)
        shared = " (shared with the upstream)" if len(cpus) == 2 else ""
        self.text = (
            f"proxy on CPU {cpus[0]}, upstream on CPU {cpus[1]}, "
            f"generator on CPU {','.join(map(str, sorted(gen)))}{shared}"
        )
        if separate_at_1:
            self.text += "; the same at 1 session"
        else:
            self.one_cpu = {cpus[1]}
            self.text += f"; at 1 session every process on CPU {cpus[1]} (bench/README.md)"


class Bench:
    def __init__(self, args: argparse.Namespace, argv: Sequence[str], installed: list[str]) -> None:
        self.args = args
        quick = bool(args.quick)
        self.rounds: int = args.rounds if args.rounds is not None else (2 if quick else 5)
        self.warmup: float = args.warmup if args.warmup is not None else (0.5 if quick else 1.5)
        self.duration: float = (
            args.duration if args.duration is not None else (1.5 if quick else 4.0)
        )
        self.idle: int = (
            args.idle_sessions if args.idle_sessions is not None else (1000 if quick else 5000)
        )
        self.scale_hold: float = (
            args.scale_hold if args.scale_hold is not None else (3.0 if quick else 10.0)
        )
        self.quiet_wait: float = (
            args.quiet_wait if args.quiet_wait is not None else (10.0 if quick else 60.0)
        )
        self.levels = [int(x) for x in args.levels.split(",") if x.strip()]
        self.profile_levels = [int(x) for x in args.profile.split(",") if x.strip()]
        self.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if args.with_pure:
            self.variants += [v for v in PURE_VARIANTS if v not in self.variants]
        unknown = set(self.variants) - set(VARIANTS) - set(PURE_VARIANTS)
        if unknown:
            raise SystemExit(f"unknown variant(s): {', '.join(sorted(unknown))}")
        self.place = Placement(not args.no_pin, args.separate_cpus_at_1)
        if args.generators == "auto":
            self.generators = 2 if self.place.gen_cpus >= 2 else 1
        else:
            self.generators = max(1, int(args.generators))
        self.command = shlex.join([".venv/bin/python", "-m", "bench", *argv])
        self.notes: list[str] = []
        self.installed = list(installed)
        self.phases: list[PhaseResult] = []
        self.cdfs: dict[str, dict[str, list[float]]] = {}
        self.servers: dict[str, Server] = {}
        self.work = Path()
        self.nginx = ""
        self.nofile = (0, 0)

    # -- setup and teardown ---------------------------------------------------------------

    def setup(self) -> None:
        self.nofile = raise_nofile()
        if self.nofile[0] < 12000:
            self.notes.append(
                f"open-file limit is {self.nofile[0]} (hard {self.nofile[1]}): the memory and "
                "scale phases need about two descriptors per session in the relay"
            )
        need_nginx = "nginx" in self.variants or self.idle > 0
        if need_nginx:
            self.nginx, added = deps.ensure_nginx()
            self.installed += added
        base = REPO / "bench" / ".work"
        base.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="run-", dir=base))
        self.servers["upstream"] = start_upstream(self.work, self.place.upstream)
        if "nginx" in self.variants:
            self.servers["nginx"] = self._start("nginx")
        if {"rpc", "relay"} & set(self.variants) or self.profile_levels:
            self.servers["relay"] = self._start("relay")
        if set(PURE_VARIANTS) & set(self.variants):
            self.servers["relay-py"] = self._start("relay-py")

    def _start(self, kind: str, tag: str = "", soft_nofile: int | None = None) -> Server:
        upstream = self.servers["upstream"].port
        if kind == "nginx":
            return start_nginx(
                self.nginx, self.work, upstream, self.place.proxy, self.nofile[0], tag
            )
        pure = kind == "relay-py"
        return start_relay(
            self.work, upstream, self.place.proxy, tag + ("-py" if pure else ""), soft_nofile, pure
        )

    def teardown(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()
        if not self.args.keep_work and self.work != Path():
            shutil.rmtree(self.work, ignore_errors=True)

    def _ensure_alive(self, name: str) -> None:
        server = self.servers.get(name)
        if server is not None and not server.alive():
            self.notes.append(
                f"{name} exited (status {server.proc.returncode}) and was restarted; "
                f"its log: {server.log_tail()!r}"
            )
            if name == "upstream":
                self.servers[name] = start_upstream(self.work, self.place.upstream)
            else:
                self.servers[name] = self._start(name)

    def wait_quiet(self, what: str) -> None:
        """Wait (bounded) until other processes use less than ``QUIET_CORES`` of a CPU."""
        deadline = time.monotonic() + self.quiet_wait
        while True:
            ours = [pid for server in self.servers.values() for pid in server.pids()]
            busy0, cpu0, t0 = machine_busy_seconds()[0], cpu_seconds(ours), time.monotonic()
            time.sleep(1.0)
            busy1, cpu1, t1 = machine_busy_seconds()[0], cpu_seconds(ours), time.monotonic()
            foreign = max(0.0, (busy1 - busy0) - (cpu1 - cpu0)) / (t1 - t0)
            if foreign < QUIET_CORES:
                return
            if time.monotonic() >= deadline:
                self.notes.append(
                    f"{what} started while other processes used {foreign * 100:.0f}% of a CPU "
                    f"(waited {self.quiet_wait:g} s for the machine to quiet down)"
                )
                return

    # -- phases ---------------------------------------------------------------------------

    def _target(self, variant: str) -> tuple[str, bool, Server | None]:
        up = self.servers["upstream"]
        if variant == "direct":
            return f"ws://127.0.0.1:{up.port}/", False, None
        if variant == "nginx":
            ng = self.servers["nginx"]
            return f"ws://127.0.0.1:{ng.port}/", False, ng
        pure = variant in PURE_VARIANTS
        relay = self.servers["relay-py" if pure else "relay"]
        endpoint = variant.removesuffix("-py")
        path = "/rpc" if endpoint == "rpc" else "/relay"
        return f"ws://127.0.0.1:{relay.port}{path}", endpoint == "relay", relay

    def load_phase(
        self, variant: str, level: int, rnd: int, hook: Hook | None = None
    ) -> PhaseResult:
        needs = {"direct": (), "nginx": ("nginx",)}.get(
            variant, ("relay-py",) if variant in PURE_VARIANTS else ("relay",)
        )
        for name in ("upstream", *needs):
            self._ensure_alive(name)
        url, env_mode, proxy = self._target(variant)
        one_cpu = self.place.one_cpu if level == 1 else None
        gen_cpus = one_cpu or self.place.gen
        moved = proxy.pids() if (one_cpu is not None and proxy is not None) else []
        if one_cpu is not None:
            set_affinity(moved, one_cpu)
        n_gen = min(level, self.generators if level >= 100 else 1)
        shares = [level // n_gen + (1 if k < level % n_gen else 0) for k in range(n_gen)]
        gens: list[GenProc] = []
        lat_files = [self.work / f"lat-{variant}-{level}-{rnd}-{k}.bin" for k in range(n_gen)]
        try:
            for k, share in enumerate(shares):
                cfg = {
                    "mode": "load",
                    "url": url,
                    "envelope": env_mode,
                    "sessions": share,
                    "index": k,
                    "per_conn": PER_CONN,
                    "cpus": sorted(gen_cpus) if gen_cpus else None,
                    "sample_pids": proxy.pids() if (proxy is not None and k == 0) else [],
                    "upstream_pids": [self.servers["upstream"].proc.pid] if k == 0 else [],
                    "lat_file": str(lat_files[k]),
                    "concurrency": 100,
                    "timeout": 30.0,
                }
                gens.append(GenProc(cfg, self.work / f"gen-{variant}-{level}-{rnd}-{k}.log"))
            readies = [g.expect("ready", 60 + level / 20) for g in gens]
            opened = sum(r["sessions"] for r in readies)
            failures: dict[str, int] = {}
            for r in readies:
                for key, n in r["failures"].items():
                    failures[key] = failures.get(key, 0) + n
            if opened < level:
                self.notes.append(
                    f"round {rnd + 1} {variant}@{level}: only {opened} of {level} sessions "
                    f"opened ({failures})"
                )
            t0 = time.monotonic() + 0.05 + self.warmup
            t1 = t0 + self.duration
            for g in gens:
                g.send(f"go {t0!r} {t1!r}")
            if hook is not None:
                hook(t0, t1)
            dones = [g.expect("done", self.warmup + self.duration + 60) for g in gens]
        finally:
            close_all(gens)
            if moved and self.place.proxy is not None:
                set_affinity(moved, self.place.proxy)
        lat = np.concatenate(
            [
                np.fromfile(f, dtype=np.int64) if f.exists() else np.empty(0, np.int64)
                for f in lat_files
            ]
        )
        for f in lat_files:
            f.unlink(missing_ok=True)
        stats = latency_stats(lat)
        first = dones[0]
        return PhaseResult(
            variant=variant,
            level=level,
            round=rnd,
            sessions=opened,
            pairs=sum(d["pairs"] for d in dones),
            window_s=first["window_s"],
            errors=sum(d["errors"] for d in dones),
            lost=sum(d["lost"] for d in dones),
            proxy_cpu_s=first["proxy_cpu"] if proxy is not None else None,
            proxy_user_s=first["proxy_user"] if proxy is not None else None,
            gen_cpu_s=sum(d["gen_cpu"] for d in dones),
            upstream_cpu_s=first["upstream_cpu"],
            machine_busy_s=first["busy"],
            generators=n_gen,
            p50_us=stats["p50"],
            p90_us=stats["p90"],
            p99_us=stats["p99"],
            p999_us=stats["p999"],
            mean_us=stats["mean"],
            failures=failures,
            cdf_us=stats["cdf"],
        )

    def hold(
        self, url: str, env_mode: bool, sessions: int, tag: str, concurrency: int = 100
    ) -> tuple[GenProc, dict[str, Any]]:
        cfg = {
            "mode": "hold",
            "url": url,
            "envelope": env_mode,
            "sessions": sessions,
            "per_conn": PER_CONN,
            "cpus": sorted(self.place.gen) if self.place.gen else None,
            "lat_file": "",
            "concurrency": concurrency,
            "timeout": 60.0,
        }
        gen = GenProc(cfg, self.work / f"gen-hold-{tag}.log")
        try:
            ready = gen.expect("ready", 120 + sessions / 20)
        except HarnessError:
            gen.close()
            raise
        return gen, ready

    def memory_phase(self, variant: str) -> MemoryResult:
        kind = "nginx" if variant == "nginx" else "relay"
        server = self._start(kind, tag=f"-mem-{variant}")
        try:
            url = f"ws://127.0.0.1:{server.port}/" + ("" if kind == "nginx" else variant)
            env_mode = variant == "relay"
            warm, _ = self.hold(url, env_mode, PER_CONN, f"{variant}-warm")
            warm.close()
            time.sleep(0.5)
            before = rss_kb(server.pids())
            gen, ready = self.hold(url, env_mode, self.idle, f"{variant}-idle")
            try:
                time.sleep(1.0)
                after = rss_kb(server.pids())
                fds = sum(fd_count(pid) for pid in server.pids())
            finally:
                gen.close()
        finally:
            server.stop()
        return MemoryResult(
            variant=variant,
            sessions_wanted=self.idle,
            sessions=ready["sessions"],
            connections=ready["connections"],
            rss_before_kb=before,
            rss_after_kb=after,
            fds=fds,
            setup_s=ready["setup_s"],
            failures=ready["failures"],
        )

    def scale_phase(self, sessions: int) -> dict[str, Any]:
        relay = self._start("relay", tag="-scale", soft_nofile=SCALE_START_NOFILE)
        report: dict[str, Any] = {}
        data: dict[str, Any] = {"sessions_wanted": sessions, "report": report}
        limits = nofile_limits(relay.proc.pid)
        data["relay_nofile"] = limits
        now = f"soft {limits[0]}, hard {limits[1]}" if limits else "unknown"
        report["relay open-file limit"] = (
            f"started with soft limit {SCALE_START_NOFILE}; the running relay has {now}"
        )
        try:
            url = f"ws://127.0.0.1:{relay.port}/relay"
            warm, _ = self.hold(url, True, PER_CONN, "scale-warm")
            warm.close()
            time.sleep(0.5)
            before = rss_kb(relay.pids())
            up_before = rss_kb(self.servers["upstream"].pids())
            t = time.monotonic()
            gen, ready = self.hold(url, True, sessions, "scale", concurrency=100)
            try:
                took = time.monotonic() - t
                after = rss_kb(relay.pids())
                fds = fd_count(relay.proc.pid)
                active = health(relay.port).get("activeSessions")
                time.sleep(self.scale_hold)
                gen.send("check")
                alive = gen.expect("alive", 60)
                active_after = health(relay.port).get("activeSessions")
                rss_held = rss_kb(relay.pids())
                up_after = rss_kb(self.servers["upstream"].pids())
            finally:
                gen.close()
            data.update(
                ready=ready,
                took_s=took,
                rss_before_kb=before,
                rss_after_kb=after,
                rss_after_hold_kb=rss_held,
                fds=fds,
                active=active,
                alive_after_hold=alive,
                active_after_hold=active_after,
                upstream_rss_delta_kb=up_after - up_before,
            )
            ok = ready["sessions"]
            report["sessions opened (session_started + one round trip)"] = f"{ok} of {sessions}"
            report["connections"] = f"{ready['connections']} ({PER_CONN} sessions each)"
            report["time to open all and complete the round trips"] = (
                f"{took:.1f} s (the generator opens 100 connections at a time)"
            )
            report["failures"] = ready["failures"] or "none"
            report["relay RSS"] = (
                f"{before / 1024:.1f} MB before, {after / 1024:.1f} MB with {ok} sessions, "
                f"{rss_held / 1024:.1f} MB after holding {self.scale_hold:g} s; "
                f"{(after - before) / max(ok, 1):.1f} KB per session"
            )
            report["relay open file descriptors"] = str(fds)
            report["/health activeSessions"] = f"{active}, after holding: {active_after}"
            report["sessions still open after the hold (generator's view)"] = (
                f"{alive['sessions']}; session_ended received: {alive['ended'] or 'none'}"
            )
            if ok < sessions:
                tail = relay.log_tail()
                data["relay_log_tail"] = tail
                if "Too many open files" in tail or "EMFILE" in tail:
                    report["cause"] = "the relay ran out of file descriptors"
                report["relay log (tail)"] = repr(tail[-400:])
        except HarnessError as exc:
            report["error"] = str(exc)
            data["relay_log_tail"] = relay.log_tail()
        finally:
            relay.stop()
        return data

    def profile_phase(self, level: int) -> dict[str, Any]:
        from .profile import record, summarize

        name = f"relay@{level}"
        pyspy = deps.pyspy_binary()
        if pyspy is None:
            return {"phase": name, "error": "py-spy is not installed"}
        relay = self.servers["relay"]
        prefix = self.results_prefix()
        out = prefix.with_name(f"{prefix.name}-relay{level}.pyspy.txt")
        box: dict[str, str | None] = {}

        def hook(t0: float, t1: float) -> None:
            time.sleep(max(0.0, t0 - time.monotonic()))
            box["error"] = record(pyspy, relay.proc.pid, t1 - t0, out)

        phase = self.load_phase("relay", level, -1, hook)
        result: dict[str, Any] = {"phase": name, "file": str(out.relative_to(REPO))}
        if box.get("error"):
            result["error"] = box["error"]
        else:
            result.update(summarize(out))
        result["during_profile"] = phase.to_json()
        return result

    # -- the run --------------------------------------------------------------------------

    def results_prefix(self) -> Path:
        if self.args.out:
            out = Path(self.args.out)
            return out if out.is_absolute() else REPO / out
        suffix = "-quick" if self.args.quick else ""
        if self.rounds == 0:
            suffix += "-scale" if self.args.scale else "-memory"
        return REPO / "bench" / "results" / f"{self.date}-{self.commit}{suffix}"

    def run(self) -> int:
        from tqdm import tqdm  # type: ignore[import-untyped]  # installed by cli.main

        self.date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        self.commit = _git("rev-parse", "--short", "HEAD") or "nocommit"
        result: dict[str, Any] = {}
        loadavg_start = _loadavg()
        total = self.rounds * len(self.levels) * len(self.variants)
        total += len(self.profile_levels) + (len(MEMORY_VARIANTS) if self.idle else 0)
        total += int(self.args.scale > 0)
        try:
            self.setup()
            with tqdm(total=total, unit="phase", dynamic_ncols=True, file=sys.stderr) as bar:
                for rnd in range(self.rounds):
                    if self.quiet_wait > 0:
                        bar.set_description(f"round {rnd + 1}: waiting for a quiet machine")
                        self.wait_quiet(f"round {rnd + 1}")
                    for li, level in enumerate(self.levels):
                        shift = (rnd + li) % len(self.variants)
                        order = self.variants[shift:] + self.variants[:shift]
                        for variant in order:
                            bar.set_description(f"round {rnd + 1} {variant}@{level}")
                            try:
                                phase = self.load_phase(variant, level, rnd)
                            except HarnessError as exc:
                                self.notes.append(f"round {rnd + 1} {variant}@{level}: {exc}")
                            else:
                                self.phases.append(phase)
                                self.cdfs.setdefault(str(level), {}).setdefault(variant, []).extend(
                                    phase.cdf_us
                                )
                            bar.update()
                profiles: list[dict[str, Any]] = []
                for level in self.profile_levels:
                    bar.set_description(f"profile relay@{level}")
                    try:
                        profiles.append(self.profile_phase(level))
                    except HarnessError as exc:
                        profiles.append({"phase": f"relay@{level}", "error": str(exc)})
                    bar.update()
                if profiles:
                    result["profiles"] = profiles
                if self.idle:
                    if self.quiet_wait > 0:
                        self.wait_quiet("the memory phase")
                    memory: dict[str, Any] = {}
                    for variant in MEMORY_VARIANTS:
                        bar.set_description(f"memory {variant} x{self.idle}")
                        try:
                            memory[variant] = self.memory_phase(variant).to_json()
                        except HarnessError as exc:
                            self.notes.append(f"memory {variant}: {exc}")
                        bar.update()
                    result["memory"] = memory
                if self.args.scale:
                    bar.set_description(f"scale x{self.args.scale}")
                    result["scale"] = self.scale_phase(self.args.scale)
                    bar.update()
        finally:
            self.teardown()
        self.finish(result, loadavg_start)
        return 0

    def finish(self, result: dict[str, Any], loadavg_start: str) -> None:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        result["meta"] = {
            "date": self.date,
            "commit": self.commit,
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "src")),
            "command": self.command,
            "cpu_model": _cpu_model(),
            "cpus": os.cpu_count(),
            "mem_gb": mem_gb,
            "kernel": platform.release(),
            "python": platform.python_version(),
            "versions": {d: _version(d) for d in ("picows", "orjson", "uvloop", "numpy")},
            "relay_data_plane": _data_plane(),
            "nginx": _nginx_version(self.nginx) if self.nginx else "nginx not used",
            "nofile": list(self.nofile),
            "loadavg_start": loadavg_start,
            "loadavg_end": _loadavg(),
            "installed": self.installed,
        }
        result["config"] = {
            "rounds": self.rounds,
            "warmup_s": self.warmup,
            "duration_s": self.duration,
            "levels": self.levels,
            "variants": self.variants,
            "idle_sessions": self.idle,
            "scale": self.args.scale,
            "generators_at_500": self.generators,
            "placement": self.place.text,
            "quiet_wait_s": self.quiet_wait,
            "relay_env": {k: v for k, v in sorted(_relay_env().items())},
            "request": "chain_getBlockHash, 8 pre-encoded requests per session (cycling ids)",
        }
        if self.phases:
            result["summary"] = summarize(self.phases, self.variants, self.levels)
            result["generator"] = self._generator_summary(result["summary"])
        result["targets"] = targets(result)
        result["notes"] = self.notes
        result["phases"] = [p.to_json() for p in self.phases]
        result["latency_cdf_us"] = self.cdfs
        write_outputs(result, self.results_prefix())
        if self.installed:
            print(f"installed for the benchmark: {', '.join(self.installed)}")

    def _generator_summary(self, summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        parts, best, where = [], 0.0, ""
        for level, row in summary.items():
            vals = [s["gen_us_per_pair"] for s in row.values() if s["gen_us_per_pair"]]
            if vals:
                parts.append(f"{float(np.median(vals)):.1f} µs at {level}")
            for variant, s in row.items():
                if s["gen_util"] is not None and s["gen_util"] > best:
                    best, where = s["gen_util"], f"{variant}@{level}"
        return {
            "summary": ", ".join(parts),
            "max_util": best,
            "max_util_where": where,
            "processes": self.generators,
        }


def _data_plane() -> str:
    """What the relay (variants rpc, relay) runs: the compiled modules or pure Python,
    decided as the relay decides it (same installation, same environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import ghostcloak_relay as g; print(g.NATIVE)"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out != "True":
        return "pure Python (no current compiled build)"
    return "compiled (mypyc modules, Cython frame gate)"


def _relay_env() -> dict[str, str]:
    from .harness import RELAY_BENCH_ENV

    return dict(RELAY_BENCH_ENV)
