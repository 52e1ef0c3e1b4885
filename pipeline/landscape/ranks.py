"""The processes of one run: who this rank is, the shared claim counters, failing together.

``landscape run`` is one program whether it runs as a single process or as N ranks
under ``mpirun``/``srun``; everything that differs lives here, behind one small
interface. :class:`Solo` needs no MPI at all; :class:`MpiRanks` wraps ``COMM_WORLD``.

Work is shared out through two counters held in rank 0's memory and changed with
MPI one-sided atomics (``Fetch_and_op`` under a shared lock): ``CLAIMED``, the next
shard to hand out, and ``DONE``, the points committed so far. A rank takes a shard
whenever it finishes one, so a slow device simply claims fewer; no rank waits for a
coordinator, and nothing collective runs per point or per shard. On one node Open MPI
does these atomics in shared memory; across nodes without hardware atomics the
target's progress comes from rank 0's own MPI calls, which it makes after every point.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np

from landscape.errors import FailedElsewhere, UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

CLAIMED, DONE = 0, 1
COUNTERS = 2
WAIT_POLL_SECONDS = 0.05

# Set by a launcher in every rank it starts (Open MPI, MPICH/PMI-2, PMIx, srun).
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")
# The ranks a launcher started on this node: Open MPI, MPICH (Hydra), srun with
# --ntasks-per-node.
LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


def launcher_rank() -> str | None:
    """This process's rank as its launcher announced it, before MPI starts (for log lines)."""
    if not launched_size():
        return None
    return next((os.environ[name] for name in RANK_VARIABLES if name in os.environ), None)


def launched_size() -> int:
    """How many ranks the launcher started (0 when not started by an MPI launcher or srun)."""
    for name in SIZE_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return 1 if "PMIX_RANK" in os.environ else 0


def launched_local_size() -> int:
    """How many ranks the launcher started on this node, before MPI starts; all the
    ranks it started where it names no local count (more than the node's: the safe side
    for a share of the node), and 1 outside a launcher."""
    local = next((int(os.environ[n]) for n in LOCAL_SIZE_VARIABLES if n in os.environ), None)
    return max(1, local or launched_size())


def configure_logging(verbose: bool = False) -> None:
    """Log lines with time, and the rank when a launcher started several (set up once)."""
    rank = launcher_rank()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(levelname)s %(name)s: "
        "%(message)s",
        datefmt="%H:%M:%S",
    )


def cpu_threads_per_rank(local_size: int) -> int:
    """Torch threads for one of ``local_size`` ranks sharing this node's cores.

    A launcher that pins each rank (mpirun binds to cores for small jobs, srun with
    --cpus-per-task) leaves fewer cores in the affinity mask than the node has: use them
    all. Unpinned ranks split the node evenly, so they never fight over cores.
    """
    available = len(os.sched_getaffinity(0))
    if available < (os.cpu_count() or available):
        return available
    return max(1, available // local_size)


class Solo:
    """A run of one process: counters are plain integers, agreement is trivial."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    comm = None

    def __init__(self) -> None:
        self.counters = [0] * COUNTERS

    def describe(self) -> str:
        return "one process"

    def fetch_add(self, counter: int, amount: int) -> int:
        """Add ``amount`` to a shared counter; returns its value before the addition."""
        before = self.counters[counter]
        self.counters[counter] += amount
        return before

    def read(self, counter: int) -> int:
        return self.counters[counter]

    def broadcast(self, value: T) -> T:
        return value

    def minimum(self, value: int) -> int:
        """The least of every rank's ``value`` (a collective call)."""
        return value

    def agree(self, action: Callable[[], T]) -> T:
        """Run ``action`` on every rank; if it fails on any, raise on all (see MpiRanks)."""
        return action()

    def on_rank0(self, action: Callable[[], T]) -> T:
        """Run ``action`` on rank 0 alone and give its result to every rank; if it fails,
        every rank raises."""
        return self.broadcast(self.agree(lambda: action() if self.rank == 0 else None))

    def wait_for_all(self, poll: Callable[[], None]) -> None:
        """Block until every rank got here, calling ``poll`` meanwhile."""

    @contextmanager
    def failing_together(self) -> Iterator[None]:
        """An error inside stops the whole run, not just this rank."""
        yield

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MpiRanks(Solo):
    """The ranks of ``MPI.COMM_WORLD``, with the counters in a window on rank 0."""

    def __init__(self, comm) -> None:
        from mpi4py import MPI

        self.mpi = MPI
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.rank, node.size
        node.Free()
        self.window = MPI.Win.Allocate(8 * COUNTERS if self.rank == 0 else 0, 8, comm=comm)
        if self.rank == 0:
            self.window.Lock(0, MPI.LOCK_EXCLUSIVE)
            self.window.Put(np.zeros(COUNTERS, np.int64), 0)
            self.window.Unlock(0)
        comm.Barrier()

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} (node rank {self.local_rank} of {self.local_size})"

    def fetch_add(self, counter: int, amount: int) -> int:
        before = np.zeros(1, np.int64)
        self.window.Lock(0, self.mpi.LOCK_SHARED)
        self.window.Fetch_and_op(np.array([amount], np.int64), before, 0, counter, self.mpi.SUM)
        self.window.Unlock(0)
        return int(before[0])

    def read(self, counter: int) -> int:
        return self.fetch_add(counter, 0)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        return self.comm.bcast(value, root=0)

    def minimum(self, value: int) -> int:
        return self.comm.allreduce(value, op=self.mpi.MIN)

    def agree(self, action: Callable[[], T]) -> T:
        """Run ``action`` everywhere and compare notes, so a failure on one rank (a corrupt
        checkpoint on one node, a missing GPU) ends the run on all ranks with its message,
        instead of leaving the others waiting in the next collective call."""
        try:
            result, failure = action(), None
        except UserError as exc:
            result, failure = None, str(exc)
        except Exception as exc:  # a bug: keep its traceback on the rank that hit it
            log.exception("rank %d failed", self.rank)
            result, failure = None, f"{type(exc).__name__}: {exc}"
        failures = self.comm.allgather(failure)
        for rank, message in enumerate(failures):
            if message is not None:
                error = UserError if self.rank == 0 else FailedElsewhere
                where = f"rank {rank} of {self.size}: " if self.size > 1 else ""
                raise error(where + message)
        return result

    def wait_for_all(self, poll: Callable[[], None]) -> None:
        # A non-blocking barrier, polled: rank 0 keeps its progress display (and its
        # counters' progress) moving, and no rank spins a core at 100 % while it waits.
        request = self.comm.Ibarrier()
        while not request.Test():
            poll()
            time.sleep(WAIT_POLL_SECONDS)

    @contextmanager
    def failing_together(self) -> Iterator[None]:
        """Past set-up the other ranks cannot be told politely; abort the job instead of
        letting them hang. The launcher then exits non-zero with this rank's message."""
        try:
            yield
        except Exception as exc:
            if isinstance(exc, UserError):
                message = str(exc)
            else:
                message = "".join(traceback.format_exception(exc)).rstrip()
            print(f"error: rank {self.rank} of {self.size}: {message}", file=sys.stderr)
            sys.stderr.flush()
            self.comm.Abort(1)

    def close(self) -> None:
        self.window.Free()


def connect_ranks() -> Solo:
    """The ranks of this run: MPI when a launcher started us, else a solo process."""
    size = launched_size()
    if not size:
        return Solo()
    try:
        import mpi4py

        mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI
        from mpi4py import MPI
    except ImportError:
        if size > 1:
            raise UserError(
                f"started as {size} MPI ranks, but mpi4py is not installed: run `make install` "
                "(it builds the parallel stack) or `pip install mpi4py`"
            ) from None
        return Solo()
    comm = MPI.COMM_WORLD
    if comm.size != size:
        raise UserError(
            f"the launcher started {size} tasks but MPI sees {comm.size} rank(s): its process "
            "manager does not match this MPI; under srun use --mpi=pmix for Open MPI "
            "(--mpi=pmi2 for MPICH)"
        )
    return MpiRanks(comm)
