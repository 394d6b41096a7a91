"""How many CPU threads torch uses: a choice that holds up on a shared host.

torch's CPU kernels run on OpenMP threads that spin while they wait for each other (GNU libgomp's default).
With more runnable threads than free cores, every parallel op waits for a thread the kernel has descheduled
while its sibling burns the core it needs: measured on this project's 2-core machine beside one CPU-bound
process, a default CMRIN training step took 4-5x its time alone on 2 threads and 1.5x on 1 thread (a tiny
config: 4.4x against 1.0x). A passive wait policy (``OMP_WAIT_POLICY=PASSIVE``, or a short
``GOMP_SPINCOUNT``) cures the contention but costs 1.3-2.5x when the machine is quiet, so it is not used.

So the heavy commands (``train``, ``eval``, ``vlnms``, ``quickstart``; ``extract`` pins its own, see
``refground extract --help``) choose the thread count when they start (``--threads auto``, the default):
the cores this process may use (its affinity mask) that were idle over a short sample of ``/proc/stat``,
at least 1 (:func:`auto_threads`). ``--threads N`` fixes it. Under torchrun, or with ``OMP_NUM_THREADS``
set, the environment's choice stands. Float results of multi-threaded kernels depend on the thread count,
so a training run's weights are reproducible for a given count: its manifest records it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

AUTO = "auto"
SAMPLE_SECONDS = 0.2


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])  # guest time is already counted in user


def idle_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of the machine's CPUs were idle over the next ``seconds`` (None without /proc/stat)."""
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(seconds)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)


def auto_threads() -> int | None:
    """The thread count for a heavy step starting now: the available cores that are idle (rounded, at least 1);
    None (leave torch's choice) under torchrun (one thread per process there), with ``OMP_NUM_THREADS`` set,
    or where the load cannot be read."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    idle = idle_cores()
    if idle is None:
        return None
    return max(1, min(available_cores(), int(idle + 0.5)))


def parse_threads(value: str | int | None) -> int | str | None:
    """A ``--threads`` value: ``"auto"`` (or None), or a count of at least 1; else a one-line
    :class:`UsageError`."""
    from refground.errors import UsageError

    if value is None or value == AUTO:
        return AUTO
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise UsageError(f"--threads {value}: expected auto or a count of at least 1 (this machine has "
                         f"{available_cores()} cores for this process)")
    return n


@contextmanager
def use_threads(threads: int | str | None) -> Iterator[int]:
    """Run the block on ``threads`` torch intra-op threads (``"auto"``: :func:`auto_threads` now; None: as
    they are), then restore the previous count. Yields the count in effect."""
    import torch

    n = auto_threads() if threads == AUTO else threads
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


__all__ = ["AUTO", "auto_threads", "available_cores", "idle_cores", "parse_threads", "use_threads"]
