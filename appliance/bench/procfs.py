"""Read a process's CPU time, wake-ups and memory from /proc (Linux only)."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """CPU use of one process, all threads, at one moment."""

    stat_s: float          # utime + stime from /proc/PID/stat, in whole clock ticks
    schedstat_s: float | None  # summed run time of the live threads, nanosecond resolution
    switches: int          # voluntary + involuntary context switches of the live threads
    threads: int


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []


def cpu_sample(pid: int) -> CpuSample:
    """Return the CPU time and context switches of ``pid`` and all its threads."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
        # The command name is in brackets and may contain spaces; fields resume after ")".
        fields = file.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    ticks = int(fields[11]) + int(fields[12])

    schedstat_ns = 0
    have_schedstat = True
    switches = 0
    tasks = _tasks(pid)
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as file:
                schedstat_ns += int(file.read().split()[0])
        except FileNotFoundError:
            have_schedstat = False
        try:
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii", errors="replace") as file:
                for line in file:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        switches += int(line.split()[1])
        except FileNotFoundError:
            pass  # the thread ended between listdir and open
    return CpuSample(
        stat_s=ticks / CLOCK_TICKS,
        schedstat_s=schedstat_ns / 1e9 if have_schedstat and tasks else None,
        switches=switches,
        threads=len(tasks),
    )


def memory(pid: int | str = "self") -> dict[str, int]:
    """Return VmHWM (peak RSS) and VmRSS of ``pid`` in bytes."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as file:
        for line in file:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024  # the kernel reports kB
    return values
