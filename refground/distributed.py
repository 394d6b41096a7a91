"""Training on several processes: torch.distributed as torchrun starts it, and cheap no-ops without it.

``torchrun --nproc-per-node N --no-python -- refground train <method> ...`` starts N copies of the command
with ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment; the train
commands call :func:`init_from_env` (through :func:`from_env`) and :func:`refground.train.fit` then trains
with DistributedDataParallel. Backend: gloo; where CUDA is present ``cpu:gloo,cuda:nccl`` (CPU tensors, which
every built-in model trains on, go through gloo, CUDA tensors through nccl).

Rank 0 (the *main* process) alone writes the run folder; the others compute the same things and write
nothing. A decision rank 0 takes alone (the writer's lock, cache hit or refusal, the checkpoint to resume,
the figures on val) reaches the others through :func:`on_main`: its value, or its failure, which the others
raise as a quiet :class:`FailedOnMain` with rank 0's exit code (rank 0 prints the one error line).

A process that dies outside such a point (a bug on one rank, a killed process) does not leave the others
waiting for ever: torchrun stops the remaining workers when one fails, gloo fails a collective whose peer
closed its connection, and every collective gives up after :data:`TIMEOUT_S` seconds (environment variable
``REFGROUND_DIST_TIMEOUT``) at the latest; that bound also caps how long rank 0 may evaluate or write while
the others wait.

Without a process group (a plain ``refground train``, or ``WORLD_SIZE`` 1) every function here is a check
of ``torch.distributed.is_initialized()`` and returns at once: rank 0 of a world of 1.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from refground.errors import RefgroundError, UsageError

T = TypeVar("T")
logger = logging.getLogger("refground")

TIMEOUT_S = 1800.0
"""How long a collective waits for the other processes before failing (seconds)."""

_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class FailedOnMain(RefgroundError):
    """What the other ranks raise when rank 0 failed at a shared decision (:func:`on_main`): rank 0 reports
    the error; the others exit with its exit code and print nothing (``quiet``)."""

    quiet = True

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"rank 0 failed (exit code {exit_code}); its error is on its output")
        self.exit_code = exit_code


def _group() -> Any:
    """``torch.distributed`` while a process group exists, else None (torch imports the module anyway)."""
    import torch.distributed as td

    return td if td.is_available() and td.is_initialized() else None


def init_from_env() -> bool:
    """Join torchrun's process group when the environment names one (``WORLD_SIZE`` > 1) and none exists yet;
    True when this call started it (so the caller :func:`shutdown`\\ s it).

    Sets one torch thread per process unless ``OMP_NUM_THREADS`` says otherwise (torchrun sets it to 1 for
    several processes per node), and with CUDA the device of ``LOCAL_RANK``. A ``WORLD_SIZE`` that is no
    number, or one without the rest of torchrun's variables, is a one-line UsageError."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return False
    try:
        world = int(raw)
    except ValueError:
        raise UsageError(f"WORLD_SIZE={raw!r}: expected a number of processes (torchrun sets it)") from None
    if world <= 1:
        return False
    import torch
    import torch.distributed as td

    if not td.is_available():
        raise UsageError(f"WORLD_SIZE={world}: this torch build has no torch.distributed; train with one process")
    if td.is_initialized():
        return False
    missing = [k for k in _ENV if not os.environ.get(k)]
    if missing:
        raise UsageError(f"WORLD_SIZE={world} without {', '.join(missing)}: start the processes with "
                         "`torchrun --nproc-per-node N --no-python -- refground train ...`")
    if "OMP_NUM_THREADS" not in os.environ:
        # N processes on one machine: intra-op threads would oversubscribe its cores
        torch.set_num_threads(1)
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    try:
        timeout = float(os.environ.get("REFGROUND_DIST_TIMEOUT", TIMEOUT_S))
    except ValueError:
        raise UsageError(f"REFGROUND_DIST_TIMEOUT={os.environ['REFGROUND_DIST_TIMEOUT']!r}: expected seconds") from None
    td.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def shutdown(together: bool = False) -> None:
    """Leave the process group (no-op without one). ``together``: wait at a barrier first, so no rank
    tears down its connections while another still uses them; only where every rank reaches this point
    (a rank that failed skips it: the others would wait for it until the timeout)."""
    td = _group()
    if td is None:
        return
    if together:
        # Without it a rank that finished first (rank 1, while rank 0 evaluates and writes) destroyed its
        # gloo pairs under the peer and now and then aborted at exit ("terminate called without an active
        # exception", about 1 run in 10 on 2 cores).
        td.barrier()
    td.destroy_process_group()


@contextlib.contextmanager
def from_env() -> Iterator[bool]:
    """:func:`init_from_env` for the block, :func:`shutdown` after it when the block started the group; yields
    whether several processes train together."""
    started = init_from_env()
    try:
        yield world_size() > 1
    except BaseException:
        if started:
            shutdown()
        raise
    if started:
        shutdown(together=True)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    td = _group()
    return td.get_rank() if td is not None else 0


def world_size() -> int:
    """The number of processes training together (1 without a process group)."""
    td = _group()
    return td.get_world_size() if td is not None else 1


def is_main() -> bool:
    """Whether this process writes the run folder and prints: rank 0, or the only process."""
    return rank() == 0


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled; tensors come back on the CPU); ``obj`` itself without a
    process group."""
    td = _group()
    if td is None:
        return obj
    box = [obj if td.get_rank() == src else None]
    td.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank; ``[obj]`` without a process group."""
    td = _group()
    if td is None:
        return [obj]
    out: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """The element-wise sum over ranks of ``values`` (float64, identical bits on every rank); ``values``
    without a process group. Every rank must pass as many values."""
    td = _group()
    if td is None:
        return list(values)
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    td.all_reduce(t)
    return t.tolist()


def exit_code_of(exc: BaseException) -> int:
    """The exit code the CLI gives ``exc`` (:func:`refground.cli.main.main`): a user error's own, 130 for an
    interruption, 1 for anything else."""
    if isinstance(exc, RefgroundError):
        return int(exc.exit_code)
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone, its value on every rank (:func:`broadcast_object`). When ``fn`` raises,
    rank 0 re-raises it and the others raise :class:`FailedOnMain` with its exit code, so they stop together
    instead of waiting at their next collective. Without a process group: ``fn()``."""
    if _group() is None:
        return fn()
    if is_main():
        try:
            value = fn()
        except BaseException as exc:
            broadcast_object(("failed", exit_code_of(exc)))
            raise
        broadcast_object(("ok", value))
        return value
    status, value = broadcast_object(None)
    if status == "failed":
        raise FailedOnMain(int(value))
    return value


def fail_together(exc: RefgroundError) -> RefgroundError:
    """The error to raise for a failure every rank sees at once (a non-finite loss summed over ranks): ``exc``
    on rank 0, a quiet :class:`FailedOnMain` with its exit code on the others."""
    return exc if is_main() else FailedOnMain(int(exc.exit_code))


def shard(batch: Any, rank: int, world: int) -> Any:
    """Slice ``rank`` of ``world`` nearly equal, disjoint, consecutive slices of ``batch`` (anything with
    ``len`` and slicing: a numpy index array, a list, a tensor); with ``len(batch) >= world`` none is empty
    and sizes differ by at most one."""
    n = len(batch)
    return batch[n * rank // world:n * (rank + 1) // world]


__all__ = ["FailedOnMain", "TIMEOUT_S", "all_gather_object", "all_reduce_sum", "broadcast_object",
           "exit_code_of", "fail_together", "from_env", "init_from_env", "is_main", "on_main", "rank", "shard",
           "shutdown", "world_size"]
