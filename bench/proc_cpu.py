"""CPU seconds of processes from Linux /proc, and the load average, as the pipeline benchmark reports them."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        # The command name (field 2) may hold spaces and parentheses: split after its closing one.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cpu_s(fields: list[str], with_reaped_children: bool, system_only: bool = False) -> float:
    # After the command name: [0] state, [2] pgrp, [11] utime, [12] stime, [13] cutime, [14] cstime.
    ticks = int(fields[12]) if system_only else int(fields[11]) + int(fields[12])
    if with_reaped_children:
        ticks += int(fields[14]) if system_only else int(fields[13]) + int(fields[14])
    return ticks / _TICKS_PER_S


def process_cpu_s(pid: int) -> float:
    """Return the user + system CPU seconds of `pid`, all its threads (0 once it is gone)."""
    fields = _stat_fields(pid)
    return _cpu_s(fields, with_reaped_children=False) if fields else 0.0


def process_run_time_s(pid: int) -> float:
    """Return the time `pid`'s live threads have run on a CPU, to the nanosecond (/proc/PID/task/*/schedstat).

    /proc/PID/stat counts in clock ticks (10 ms); a micro-run of a few hundred milliseconds needs
    better. Threads that have exited are not counted: use it on processes that keep theirs.
    """
    total_ns = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            total_ns += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total_ns / 1e9


def process_group_cpu_s(leader: int, system_only: bool = False) -> float:
    """Return the CPU seconds of every process in `leader`'s process group, children it reaped included.

    The stack starts each component in a session of its own (touchstream.embedded.spawn), so
    its group is the component with whatever it forks. `system_only`: the kernel's share only
    (system calls: on loopback a socket write also pays for the receiving side's TCP work).
    """
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields and int(fields[2]) == leader:
            total += _cpu_s(fields, with_reaped_children=True, system_only=system_only)
    return total


def components_cpu_s(pids: dict[str, int], system_only: bool = False) -> dict[str, float]:
    """Return CPU seconds per component; a service's extra workers (`scoring-2`) count under its name."""
    totals: dict[str, float] = {}
    for name, pid in pids.items():
        component = name.rsplit("-", 1)[0] if name[-1].isdigit() else name
        totals[component] = totals.get(component, 0.0) + process_group_cpu_s(pid, system_only)
    return totals


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages, rounded for printing."""
    return [round(value, 2) for value in os.getloadavg()]
