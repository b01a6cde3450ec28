"""Reading CPU time and memory of processes from ``/proc`` (Linux only).

CPU time is ``utime + stime`` of ``/proc/<pid>/stat`` (all threads of the process), in
clock ticks (``SC_CLK_TCK``, normally 100 per second: 10 ms resolution, which is why the
timed phase lasts seconds). Memory is ``VmRSS`` of ``/proc/<pid>/status``.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable

__all__ = [
    "CLK_TCK",
    "children_of",
    "cpu_seconds",
    "cpu_split",
    "fd_count",
    "machine_busy_seconds",
    "raise_nofile",
    "rss_kb",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # the command name (field 2) may hold spaces: split after its closing parenthesis
    return raw[raw.rindex(b")") + 2 :].decode().split()


def cpu_split(pids: Iterable[int]) -> tuple[float, float]:
    """(utime, stime) of the processes in seconds, summed (a process that is gone: 0)."""
    user = system = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except (OSError, ValueError):
            continue
        user += int(fields[11])  # field 14 of proc(5)
        system += int(fields[12])  # field 15
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the processes, summed."""
    return sum(cpu_split(pids))


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from ``/proc/stat``."""
    with open("/proc/stat", "rb") as f:
        first = f.readline().split()
    values = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(values)
    idle = values[3] + values[4]
    return (total - idle) / CLK_TCK, total / CLK_TCK


def rss_kb(pids: Iterable[int]) -> int:
    """VmRSS of the processes, summed, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (for nginx: its workers)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry))[1]) == pid:
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


def raise_nofile() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one (inherited by child processes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, hard
    return resource.getrlimit(resource.RLIMIT_NOFILE)
