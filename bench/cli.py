"""``python -m bench``: command line; installs what the run needs, then runs the suite.

The suite itself (order of phases, what is measured) is :mod:`bench.suite`; the
numbers and their meaning are described in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import deps
from .harness import HarnessError

__all__ = ["main"]

VARIANTS = ("direct", "nginx", "rpc", "relay")
#: The relay's endpoints once more, served by a second relay with RELAY_PURE_PYTHON=1:
#: the compiled data plane against the interpreter, side by side (``--with-pure``).
PURE_VARIANTS = ("rpc-py", "relay-py")
LEVELS = (1, 50, 500)

#: Python packages the suite imports beyond the relay's own (module: pip requirement).
PY_DEPS = {"numpy": "numpy", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="GhostCloak Relay benchmark: direct vs nginx vs /rpc vs /relay "
        "(CPU per pair, pairs/s, latency, memory per idle session). See bench/README.md.",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="short phases, 2 rounds, 1000 idle")
    p.add_argument("--warmup", type=float, help="warm-up seconds per phase (default 1.5)")
    p.add_argument("--duration", type=float, help="timed seconds per phase (default 4)")
    p.add_argument(
        "--levels",
        default=",".join(map(str, LEVELS)),
        help="concurrency levels, comma-separated (default 1,50,500)",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="variants, comma-separated (default direct,nginx,rpc,relay; also rpc-py, "
        "relay-py: the relay as pure Python)",
    )
    p.add_argument(
        "--with-pure",
        action="store_true",
        help="add the variants rpc-py and relay-py: a second relay running as pure Python "
        "(RELAY_PURE_PYTHON=1), to show what the compiled data plane saves",
    )
    p.add_argument(
        "--idle-sessions",
        type=int,
        help="idle sessions for the memory figure (default 5000; --quick: 1000; 0: skip)",
    )
    p.add_argument(
        "--scale",
        type=int,
        default=0,
        metavar="N",
        help="also hold N concurrent /relay sessions in one relay (e.g. 10000)",
    )
    p.add_argument("--scale-hold", type=float, help="seconds to hold the scale sessions open")
    p.add_argument(
        "--profile",
        nargs="?",
        const="50",
        default="",
        metavar="LEVELS",
        help="py-spy the relay in extra /relay phases (not in the medians) at these levels "
        "(default when given without a value: 50; e.g. --profile 50,500)",
    )
    p.add_argument(
        "--generators",
        default="auto",
        help="generator processes at 500 sessions: a number, or auto (2 when the generator "
        "has 2 CPUs of its own, else 1)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument(
        "--separate-cpus-at-1",
        action="store_true",
        help="at 1 session, keep the proxy on its own CPU as at 50 and 500 (default: every "
        "process on one CPU, so added latency is not the VM's cross-CPU wake-up cost)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="before each round, wait up to this many seconds for other processes to use "
        "less than a quarter of a CPU (default 60; --quick: 10; 0: do not wait)",
    )
    p.add_argument("--out", help="output path without suffix (default bench/results/DATE-COMMIT)")
    p.add_argument(
        "--render",
        metavar="JSON",
        help="only render the Markdown and chart of a kept result again (no measuring)",
    )
    p.add_argument("--keep-work", action="store_true", help="keep bench/.work/run-* (logs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        installed = deps.ensure_python(PY_DEPS)
        if args.profile and deps.pyspy_binary() is None:
            installed += deps.ensure_pyspy()
        for item in installed:
            print(f"bench: installed {item} (add it to the project's bench extra)", file=sys.stderr)
        if args.render:
            from .harness import REPO
            from .report import render

            render(Path(args.render).resolve(), REPO)
            return 0
        from .suite import Bench  # imports numpy and matplotlib, now present

        return Bench(args, argv, installed).run()
    except deps.DepsError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except HarnessError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
