"""Medians, ratios, targets, and the three outputs: Markdown, JSON and a PNG chart.

Every figure of the main table is the median over rounds. Ratios and added latency are
computed *within* a round (the variants of one round ran minutes apart at most, in
rotated order) and then the median over rounds is taken, so drift of the machine between
rounds cancels out.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "TARGETS",
    "MemoryResult",
    "PhaseResult",
    "cdf_quantiles",
    "chart",
    "latency_stats",
    "markdown",
    "observations",
    "render",
    "summarize",
    "targets",
    "write_outputs",
]

#: Quantiles kept per phase for the chart (the tail is denser).
CDF_Q: list[float] = [i / 200 for i in range(200)] + [0.995, 0.999, 0.9999, 1.0]


@dataclass
class PhaseResult:
    """One variant at one concurrency level in one round."""

    variant: str
    level: int
    round: int
    sessions: int
    pairs: int
    window_s: float
    errors: int
    lost: int
    proxy_cpu_s: float | None
    proxy_user_s: float | None
    gen_cpu_s: float
    upstream_cpu_s: float
    machine_busy_s: float
    generators: int
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    mean_us: float
    failures: dict[str, int] = field(default_factory=dict)
    cdf_us: list[float] = field(default_factory=list)

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.window_s if self.window_s > 0 else 0.0

    def per_pair_us(self, cpu_s: float | None) -> float | None:
        if cpu_s is None or self.pairs <= 0:
            return None
        return cpu_s / self.pairs * 1e6

    def util(self, cpu_s: float | None) -> float | None:
        if cpu_s is None or self.window_s <= 0:
            return None
        return cpu_s / self.window_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("cdf_us")
        data["pairs_per_s"] = self.pairs_per_s
        data["proxy_us_per_pair"] = self.per_pair_us(self.proxy_cpu_s)
        data["proxy_user_us_per_pair"] = self.per_pair_us(self.proxy_user_s)
        data["gen_us_per_pair"] = self.per_pair_us(self.gen_cpu_s)
        data["upstream_us_per_pair"] = self.per_pair_us(self.upstream_cpu_s)
        return data


@dataclass
class MemoryResult:
    variant: str
    sessions_wanted: int
    sessions: int
    connections: int
    rss_before_kb: int
    rss_after_kb: int
    fds: int
    setup_s: float
    failures: dict[str, int]

    @property
    def kb_per_session(self) -> float | None:
        if self.sessions <= 0:
            return None
        return (self.rss_after_kb - self.rss_before_kb) / self.sessions

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kb_per_session": self.kb_per_session}


def latency_stats(lat_ns: npt.NDArray[np.int64]) -> dict[str, Any]:
    if lat_ns.size == 0:
        nan = float("nan")
        return {"p50": nan, "p90": nan, "p99": nan, "p999": nan, "mean": nan, "cdf": []}
    us = lat_ns.astype(np.float64) / 1000.0
    p50, p90, p99, p999 = np.percentile(us, [50, 90, 99, 99.9])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "p999": float(p999),
        "mean": float(us.mean()),
        "cdf": cdf_quantiles(us),
    }


def cdf_quantiles(us: npt.NDArray[np.float64]) -> list[float]:
    return [round(float(x), 2) for x in np.quantile(us, CDF_Q)]


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v == v]
    return statistics.median(vals) if vals else None


def _within(
    by: dict[tuple[str, int, int], PhaseResult],
    mine: list[PhaseResult],
    other: str,
    fn: Callable[[PhaseResult, PhaseResult], float | None],
) -> float | None:
    """Median over rounds of ``fn(this variant, other variant)`` within the same round."""
    vals = []
    for p in mine:
        ref = by.get((other, p.level, p.round))
        if ref is not None:
            vals.append(fn(p, ref))
    return _median(vals)


def summarize(
    phases: Sequence[PhaseResult], variants: Sequence[str], levels: Sequence[int]
) -> dict[str, dict[str, dict[str, Any]]]:
    """{level: {variant: medians and within-round ratios}}."""
    by: dict[tuple[str, int, int], PhaseResult] = {(p.variant, p.level, p.round): p for p in phases}
    rounds = sorted({p.round for p in phases})
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for level in levels:
        row: dict[str, dict[str, Any]] = {}
        for variant in variants:
            mine = [by[(variant, level, r)] for r in rounds if (variant, level, r) in by]
            if not mine:
                continue

            def cpu_ratio(p: PhaseResult, ref: PhaseResult) -> float | None:
                a, b = p.per_pair_us(p.proxy_cpu_s), ref.per_pair_us(ref.proxy_cpu_s)
                return a / b if a is not None and b else None

            def pps_ratio(p: PhaseResult, ref: PhaseResult) -> float | None:
                return p.pairs_per_s / ref.pairs_per_s if ref.pairs_per_s else None

            row[variant] = {
                "rounds": len(mine),
                "sessions": min(p.sessions for p in mine),
                "pairs_per_s": _median(p.pairs_per_s for p in mine),
                "proxy_us_per_pair": _median(p.per_pair_us(p.proxy_cpu_s) for p in mine),
                "proxy_user_us_per_pair": _median(p.per_pair_us(p.proxy_user_s) for p in mine),
                "proxy_util": _median(p.util(p.proxy_cpu_s) for p in mine),
                "gen_us_per_pair": _median(p.per_pair_us(p.gen_cpu_s) for p in mine),
                "gen_util": _median(p.util(p.gen_cpu_s) for p in mine),
                "upstream_us_per_pair": _median(p.per_pair_us(p.upstream_cpu_s) for p in mine),
                "upstream_util": _median(p.util(p.upstream_cpu_s) for p in mine),
                "foreign_util": _median(
                    p.util(
                        p.machine_busy_s - (p.proxy_cpu_s or 0.0) - p.gen_cpu_s - p.upstream_cpu_s
                    )
                    for p in mine
                ),
                "p50_us": _median(p.p50_us for p in mine),
                "p90_us": _median(p.p90_us for p in mine),
                "p99_us": _median(p.p99_us for p in mine),
                "p999_us": _median(p.p999_us for p in mine),
                "added_p50_us": _within(by, mine, "direct", lambda p, d: p.p50_us - d.p50_us),
                "added_p99_us": _within(by, mine, "direct", lambda p, d: p.p99_us - d.p99_us),
                "p50_over_nginx_us": _within(by, mine, "nginx", lambda p, n: p.p50_us - n.p50_us),
                "cpu_ratio_nginx": _within(by, mine, "nginx", cpu_ratio),
                "pps_ratio_nginx": _within(by, mine, "nginx", pps_ratio),
                "errors": sum(p.errors for p in mine),
                "lost": sum(p.lost for p in mine),
                "per_round_proxy_us_per_pair": [p.per_pair_us(p.proxy_cpu_s) for p in mine],
                "per_round_pairs_per_s": [p.pairs_per_s for p in mine],
            }
        out[str(level)] = row
    return out


@dataclass(frozen=True)
class Target:
    name: str
    limit: float
    unit: str
    get: Callable[[dict[str, Any]], float | None]
    ref: Callable[[dict[str, Any]], float | None] | None = None  # nginx's own figure


def _get(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    def fetch(result: dict[str, Any]) -> float | None:
        node: Any = result
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node if isinstance(node, int | float) else None

    return fetch


TARGETS: tuple[Target, ...] = (
    Target(
        "/rpc CPU per pair vs nginx, 50 sessions",
        1.2,
        "×",
        _get("summary", "50", "rpc", "cpu_ratio_nginx"),
    ),
    Target(
        "/relay CPU per pair vs nginx, 50 sessions",
        1.3,
        "×",
        _get("summary", "50", "relay", "cpu_ratio_nginx"),
    ),
    Target(
        "/relay CPU per pair vs nginx, 500 sessions",
        1.5,
        "×",
        _get("summary", "500", "relay", "cpu_ratio_nginx"),
    ),
    Target(
        "memory per idle /relay session (with its upstream connection)",
        20.0,
        "KB",
        _get("memory", "relay", "kb_per_session"),
        _get("memory", "nginx", "kb_per_session"),
    ),
    Target(
        "added p50 latency over direct, /relay, 1 session",
        60.0,
        "µs",
        _get("summary", "1", "relay", "added_p50_us"),
        _get("summary", "1", "nginx", "added_p50_us"),
    ),
    Target(
        "added p50 latency over direct, /rpc, 1 session",
        60.0,
        "µs",
        _get("summary", "1", "rpc", "added_p50_us"),
        _get("summary", "1", "nginx", "added_p50_us"),
    ),
)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for t in TARGETS:
        value = t.get(result)
        verdict = "not measured" if value is None else ("PASS" if value <= t.limit else "FAIL")
        rows.append(
            {
                "target": t.name,
                "limit": t.limit,
                "unit": t.unit,
                "value": value,
                "nginx": t.ref(result) if t.ref is not None else None,
                "result": verdict,
            }
        )
    return rows


# -- Markdown ----------------------------------------------------------------------------


def _f(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


def main_table(result: dict[str, Any]) -> str:
    summary: dict[str, dict[str, dict[str, Any]]] = result.get("summary", {})
    head = (
        "| sessions | variant | proxy CPU µs/pair | of it user | ×nginx | pairs/s | ×nginx "
        "| p50 µs | p99 µs | +p50 µs | +p99 µs | proxy core | gen µs/pair | upstream µs/pair "
        "| load core |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for level, row in summary.items():
        for variant, s in row.items():
            load = None
            if s["gen_util"] is not None and s["upstream_util"] is not None:
                load = s["gen_util"] + s["upstream_util"]
            direct = variant == "direct"
            lines.append(
                "| "
                + " | ".join(
                    [
                        level,
                        f"`{variant}`",
                        _f(s["proxy_us_per_pair"], 1),
                        _f(s["proxy_user_us_per_pair"], 1),
                        _f(s["cpu_ratio_nginx"], 2, "×"),
                        _f(s["pairs_per_s"], 0),
                        _f(s["pps_ratio_nginx"], 2, "×"),
                        _f(s["p50_us"], 0),
                        _f(s["p99_us"], 0),
                        "—" if direct else _f(s["added_p50_us"], 0),
                        "—" if direct else _f(s["added_p99_us"], 0),
                        _pct(s["proxy_util"]),
                        _f(s["gen_us_per_pair"], 1),
                        _f(s["upstream_us_per_pair"], 1),
                        _pct(load),
                    ]
                )
                + " |"
            )
    return head + "\n".join(lines) + "\n"


def memory_table(memory: dict[str, dict[str, Any]]) -> str:
    head = (
        "| variant | idle sessions | connections | RSS before | RSS after | KB per session "
        "| open fds |\n|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for variant, m in memory.items():
        lines.append(
            f"| `{variant}` | {m['sessions']} of {m['sessions_wanted']} | {m['connections']} "
            f"| {m['rss_before_kb'] / 1024:.1f} MB | {m['rss_after_kb'] / 1024:.1f} MB "
            f"| {_f(m['kb_per_session'], 1)} | {m['fds']} |"
        )
    return head + "\n".join(lines) + "\n"


def targets_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| target | limit | measured | nginx, same measure | result |\n|---|---:|---:|---:|---|\n"
    )
    lines = []
    for r in rows:
        unit = r["unit"]
        lines.append(
            f"| {r['target']} | ≤ {r['limit']:g} {unit} | {_f(r['value'], 2, ' ' + unit)} "
            f"| {_f(r['nginx'], 2, ' ' + unit)} | **{r['result']}** |"
        )
    return head + "\n".join(lines) + "\n"


def _has_pure(result: dict[str, Any]) -> bool:
    return any(v.endswith("-py") for v in result.get("config", {}).get("variants", []))


def markdown(result: dict[str, Any]) -> str:
    meta, cfg = result["meta"], result["config"]
    out = [
        f"# Benchmark {meta['date']} `{meta['commit']}`{' (dirty tree)' if meta['dirty'] else ''}",
        "",
        f"Machine: {meta['cpu_model']}, {meta['cpus']} CPUs, {meta['mem_gb']:.0f} GB, "
        f"Linux {meta['kernel']}, Python {meta['python']}; "
        f"picows {meta['versions'].get('picows')}, "
        f"orjson {meta['versions'].get('orjson')}, uvloop {meta['versions'].get('uvloop')}, "
        f"{meta['nginx']}. Open-file limit {meta['nofile'][0]} (hard {meta['nofile'][1]}). "
        f"Relay data plane: {meta.get('relay_data_plane', 'not recorded')}"
        + (" (`rpc-py`, `relay-py`: the same relay as pure Python)." if _has_pure(result) else "."),
        "",
        f"Run: `{meta['command']}`: {cfg['rounds']} round(s), warm-up {cfg['warmup_s']:g} s, "
        f"timed {cfg['duration_s']:g} s per phase, CPUs: {cfg['placement']}. "
        f"Load average at start {meta['loadavg_start']}, at end {meta.get('loadavg_end', '?')}.",
        "",
    ]
    if result.get("summary"):
        out += [
            "## CPU per pair, throughput, latency (medians over rounds)",
            "",
            main_table(result),
            "*proxy CPU µs/pair*: user+system CPU of the proxy process(es) in the timed phase "
            "divided by request/response pairs; *of it user*: the user-space part (the rest "
            "is the kernel: socket calls, loopback TCP, wake-ups). *×nginx*: the same ratio "
            "within each round, median over rounds. *+p50/+p99*: latency added over `direct` "
            "in the same round. "
            "*proxy core*: the proxy's CPU use in cores; *load core*: generator + upstream, "
            "in cores. See bench/README.md.",
            "",
        ]
    if result.get("memory"):
        out += ["## Memory per idle session", "", memory_table(result["memory"]), ""]
    if result.get("targets"):
        out += ["## Targets", "", targets_table(result["targets"]), ""]
    if result.get("generator"):
        g = result["generator"]
        out += [
            "## Load generator and upstream cost",
            "",
            f"Generator CPU per pair (median over variants and rounds): {g['summary']}. "
            f"Highest generator core use: {_pct(g['max_util'])} "
            f"({g['max_util_where']}); generator processes at 500 sessions: {g['processes']}.",
            "",
        ]
    if result.get("scale"):
        s = result["scale"]
        out += ["## Scale: concurrent `/relay` sessions in one relay process", ""]
        out += [f"- {k}: {v}" for k, v in s.get("report", {}).items()]
        out += [""]
    for p in result.get("profiles", []):
        out += [f"## Profile: py-spy on the relay, `{p['phase']}` (extra phase)", ""]
        if p.get("error"):
            out += [f"py-spy failed: {p['error']}", ""]
            continue
        during = p.get("during_profile", {})
        user, cpu = during.get("proxy_user_us_per_pair"), during.get("proxy_us_per_pair")
        sys_share = 1 - user / cpu if user is not None and cpu else None
        out += [
            f"{p['samples']} samples (idle excluded; raw stacks: `{p['file']}`). While "
            f"sampled the relay ran {_f(during.get('pairs_per_s'), 0)} pairs/s at "
            f"{_f(cpu, 1)} µs CPU/pair (py-spy pauses it to sample). py-spy put "
            f"{p['socket_call_share'] * 100:.0f}% of the samples in libc socket calls; "
            f"/proc counts {_pct(sys_share)} of the relay's CPU in that phase as system time "
            "(py-spy's native sampling over-weights time spent in system calls).",
            "",
            "| own (innermost frame) | | by Python function (its C calls included) | "
            "| relay code, inclusive | |",
            "|---:|---|---:|---|---:|---|",
        ]
        for a, b, c in zip(p["self"], p["python"], p["relay_inclusive"], strict=False):
            out.append(
                f"| {a['share'] * 100:.1f}% | `{a['function']}` "
                f"| {b['share'] * 100:.1f}% | `{b['function']}` "
                f"| {c['share'] * 100:.1f}% | `{c['function']}` |"
            )
        out += [""]
    notes = list(result.get("notes", [])) + list(result.get("observations", []))
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


# -- chart -------------------------------------------------------------------------------

ORDER = ("direct", "nginx", "rpc", "relay", "rpc-py", "relay-py")


def _order(variant: str) -> int:
    return ORDER.index(variant) if variant in ORDER else len(ORDER)


COLORS = {
    "direct": "#4d4d4d",
    "nginx": "#2b8cbe",
    "rpc": "#e6550d",
    "relay": "#31a354",
    "rpc-py": "#fdae6b",
    "relay-py": "#a1d99b",
}


def chart(result: dict[str, Any], cdfs: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Latency CDFs per level (top row) and proxy CPU per pair (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    summary: dict[str, dict[str, dict[str, Any]]] = result.get("summary", {})
    levels = list(cdfs) or list(summary)
    if not levels:
        return
    fig, axes = plt.subplots(2, len(levels), figsize=(5.2 * len(levels), 8.5), squeeze=False)
    for col, level in enumerate(levels):
        ax = axes[0][col]
        level_cdfs = cdfs.get(level, {})
        for variant in sorted(level_cdfs, key=_order):
            points = level_cdfs[variant]
            if not points:
                continue
            xs = np.sort(np.asarray(points))
            ys = np.linspace(0, 1, xs.size)
            ax.plot(xs, ys, label=variant, color=COLORS.get(variant), linewidth=1.6)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{level} session{'s' if level != '1' else ''}: latency CDF")
        ax.set_xlabel("round trip (µs, log)")
        ax.set_ylabel("fraction of pairs ≤ x")
        ax.grid(True, which="both", alpha=0.3)
        ax.axhline(0.5, color="#999999", linewidth=0.6)
        ax.axhline(0.99, color="#999999", linewidth=0.6, linestyle="--")
        ax.legend(loc="lower right")

        ax2 = axes[1][col]
        row = summary.get(level, {})
        names = sorted((v for v in row if row[v]["proxy_us_per_pair"] is not None), key=_order)
        meds = [row[v]["proxy_us_per_pair"] for v in names]
        lows, highs = [], []
        for v, med in zip(names, meds, strict=True):
            vals = [x for x in row[v]["per_round_proxy_us_per_pair"] if x is not None]
            lows.append(med - min(vals))
            highs.append(max(vals) - med)
        bars = ax2.bar(
            names,
            meds,
            yerr=[lows, highs],
            color=[COLORS.get(v) for v in names],
            capsize=4,
        )
        for bar, v in zip(bars, names, strict=True):
            ratio = row[v]["cpu_ratio_nginx"]
            label = f"{bar.get_height():.1f} µs" + (
                f"\n{ratio:.2f}×" + (" nginx" if len(names) <= 3 else "") if ratio else ""
            )
            ax2.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height() / 2),
                ha="center",
                va="center",
                fontsize=9 if len(names) <= 3 else 8,
                color="white",
                fontweight="bold",
            )
        ax2.set_title(f"{level} session{'s' if level != '1' else ''}: proxy CPU per pair")
        ax2.set_ylabel("µs CPU per request/response pair")
        ax2.grid(True, axis="y", alpha=0.3)
        ax2.margins(y=0.25)
    meta = result["meta"]
    fig.suptitle(
        f"GhostCloak Relay benchmark {meta['date']} {meta['commit']} "
        f"(medians of {result['config']['rounds']} rounds; bars: min-max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def observations(result: dict[str, Any]) -> list[str]:
    """What the figures themselves say about the run: bottlenecks, noise, errors."""
    out: list[str] = []
    shared = "shared with the upstream" in result.get("config", {}).get("placement", "")
    summary: dict[str, dict[str, dict[str, Any]]] = result.get("summary", {})
    for level, row in summary.items():
        for variant, s in row.items():
            where = f"`{variant}`@{level}"
            load = (s["gen_util"] or 0.0) + (s["upstream_util"] or 0.0)
            proxy = s["proxy_util"] or 0.0
            if variant != "direct" and shared and load > 0.9 and proxy < 0.9:
                out.append(
                    f"{where}: the generator+upstream core was saturated ({load * 100:.0f}%) "
                    f"while the proxy used {proxy * 100:.0f}% of its core: pairs/s is bounded "
                    "by the load side, not the proxy"
                )
            foreign = s["foreign_util"] or 0.0
            if foreign > 0.15:
                out.append(
                    f"{where}: other processes used {foreign * 100:.0f}% of a CPU during the "
                    "timed phase"
                )
            elif foreign < -0.1:
                out.append(
                    f"{where}: our processes' CPU times add up to {-foreign:.2f} CPU more than "
                    "/proc/stat counts the machine busy (it samples busy time with the "
                    "scheduler tick and likely misses the short bursts between idle periods of "
                    "a 1-session ping-pong), so the other-processes estimate is blind here; "
                    "per-process times come from the scheduler's exact runtime"
                )
            if s["errors"] or s["lost"]:
                out.append(
                    f"{where}: {s['errors']} error answers, {s['lost']} connections lost "
                    "(all rounds)"
                )
    return out


# -- outputs -----------------------------------------------------------------------------


def write_outputs(result: dict[str, Any], prefix: Path, *, write_json: bool = True) -> None:
    """Write ``prefix``.md, .json and .png (the chart when there are latencies); print the
    Markdown and the paths."""
    import orjson

    prefix.parent.mkdir(parents=True, exist_ok=True)
    result["observations"] = observations(result)
    text = markdown(result)
    prefix.with_name(prefix.name + ".md").write_text(text)
    if write_json:
        prefix.with_name(prefix.name + ".json").write_bytes(
            orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
        )
    cdfs = result.get("latency_cdf_us") or {}
    if cdfs:
        chart(result, cdfs, prefix.with_name(prefix.name + ".png"))
    print(text)
    written = [
        str(prefix.with_name(prefix.name + suffix))
        for suffix in (".md", ".json", ".png")
        if prefix.with_name(prefix.name + suffix).exists()
    ]
    print(f"written: {', '.join(written)}")


def render(path: Path, repo: Path) -> None:
    """Render the Markdown and chart of a kept JSON result again (after a report change);
    profiles are summarized again from their raw stacks when those are still there."""
    import orjson

    from .profile import summarize as summarize_profile

    result: dict[str, Any] = orjson.loads(path.read_bytes())
    for prof in result.get("profiles", []):
        raw = repo / prof.get("file", "")
        if prof.get("file") and raw.exists() and not prof.get("error"):
            prof.update(summarize_profile(raw))
    result["targets"] = targets(result)
    prefix = path.with_suffix("")
    write_outputs(result, prefix)
