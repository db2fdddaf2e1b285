"""How many CPU threads torch (and onnxruntime) may use: the caller's number, ``POCKETDIFF_THREADS``, or the cores
that are free now.

On a shared CPU the thread count decides the speed: measured with another process busy on this 2-core machine,
one 25-step image took 20-50 s with 2 threads and 1.2 s with 1 (threads that wait for a busy core stall every
parallel region). The default counts the cores this process may run on (``os.sched_getaffinity``) less the cores
other processes keep busy now, rounded, and at least one.
"""

from __future__ import annotations

import os

from .errors import PocketdiffError

ENV = "POCKETDIFF_THREADS"


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _busy_cores(sample_s: float = 0.05) -> float | None:
    """Cores kept busy by other processes right now: the non-idle share of all CPU time over ``sample_s``
    (/proc/stat, Linux), times the number of CPUs; None where it cannot be read."""
    import time

    def snapshot():
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = snapshot()
        time.sleep(sample_s)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def free_cores() -> int:
    """Usable cores less those busy now (a 50 ms sample of /proc/stat; elsewhere the 1-minute load average, which
    lags a new load by a minute), at least 1."""
    cores = usable_cores()
    busy = _busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, why): ``requested``, else ``$POCKETDIFF_THREADS``, else :func:`free_cores`."""
    if requested is not None:
        if requested < 1:
            raise PocketdiffError(f"--threads must be >= 1, got {requested}")
        return requested, "given"
    env = os.environ.get(ENV)
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise PocketdiffError(f"{ENV}={env!r}: must be a whole number >= 1")
        return n, ENV
    return free_cores(), "free cores"


def apply_threads(requested: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads; returns the choice (pass it on to onnxruntime sessions)."""
    import torch

    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    return n, why
