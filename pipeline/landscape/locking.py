"""The advisory lock beside a surface file, which keeps two landscape jobs from writing it.

Parallel HDF5 takes no lock of its own, and HDF5's lock on the file itself is switched
off under ``mpio``, so the jobs that write a surface file lock ``<surface>.lock``
instead:

- one exclusive holder: ``plan``, a serial or ``mpio`` run (rank 0 holds it for the
  whole job; the ranks of that job are its writers), ``reduce``, ``trace``, ``submit``;
- or any number of shared holders: array tasks, which only read the surface file and
  write part files of their own, so they never exclude each other, but do exclude all
  of the above.

A writer that finds the lock taken fails at once with one line naming the holder (pid,
host, start time, what it is), which each holder records in the lock file; only the
planner waits, so that two ``plan`` of one config end with one file, verified by the
second. Readers (``status``, ``plot``) never lock.

The lock is ``flock(2)`` rather than ``lockf``/``fcntl`` record locks: a record lock is
released when its process closes *any* descriptor of the file (reading the holder's
line would drop it), and cannot be taken exclusively through a read-only descriptor.
Linux NFS clients implement ``flock`` with NFS byte-range locks, so it holds across
nodes wherever ``lockf`` would. Lustre (and BeeGFS) refuse both unless mounted with
``-o flock`` (``localflock`` makes them node-local); where the file system refuses,
the job says so once in its log and goes on unlocked, as it did before this lock.
The lock dies with its process (a killed job leaves no stale lock, only a lock file that
means nothing while no process holds it); the last holder to end removes the lock file,
so a finished or failed command leaves nothing beside the surface file.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from landscape.errors import UserError

log = logging.getLogger(__name__)

# errno values of a file system that cannot lock (Lustre without -o flock: ENOSYS; NFS
# without a lock manager: ENOLCK; NFS refusing an exclusive lock on a read-only file: EBADF)
LOCKING_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF}
READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


held: dict[Path, bool] = {}  # the lock files this process holds -> held shared
warned_unlocked = False


def lock_path(surface_path: str | Path) -> Path:
    """The lock file of a surface file: ``<surface>.lock`` beside it."""
    path = Path(surface_path)
    return path.with_name(path.name + ".lock")


@contextmanager
def surface_lock(
    surface_path: str | Path, what: str, shared: bool = False, wait: bool = False
) -> Iterator[None]:
    """Hold the lock of ``surface_path`` inside the block: exclusive for a writer of the
    file, ``shared`` for an array task. ``what`` names the holder for the message another
    job gets (e.g. ``"landscape run"``). Without ``wait``, a lock held elsewhere is a
    :class:`UserError` at once; with it, the call waits, saying for whom.

    Re-entrant within a process: a job holding the lock may call code that takes it
    again (a run merges part files through ``reduce``). Upgrading a shared lock to an
    exclusive one is a bug and raises ``RuntimeError``.
    """
    path = lock_path(surface_path).resolve()
    if path in held:
        if held[path] and not shared:
            raise RuntimeError(f"{path}: held shared by this process; cannot take it exclusively")
        yield
        return
    while True:
        descriptor, writable = open_lock_file(path, Path(surface_path))
        if descriptor is None:
            yield
            return
        try:
            locked = take(descriptor, shared, wait, Path(surface_path))
        except BaseException:
            os.close(descriptor)
            raise
        if not locked or is_current(descriptor, path):
            break
        os.close(descriptor)  # the holder we waited for removed this file: lock the new one
    try:
        if locked and writable:
            record_holder(descriptor, what, shared)
        held[path] = shared
        try:
            yield
        finally:
            del held[path]
    finally:
        if locked:
            remove_if_last(descriptor, path)
        os.close(descriptor)  # releases the lock


def is_current(descriptor: int, path: Path) -> bool:
    """Whether the locked descriptor is still the file at ``path`` (a holder that ended
    may have removed it while this process waited)."""
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


def remove_if_last(descriptor: int, path: Path) -> None:
    """Remove the lock file when no other process holds or shares it, so that a finished
    (or failed) command leaves nothing beside the surface file. Taken exclusively first
    (a shared holder's conversion may briefly let another job in, which is then the
    rightful holder); a process that was waiting on the removed file sees it is gone
    (:func:`is_current`) and locks a new one."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # others still hold it: the last of them removes it
    if is_current(descriptor, path):
        with suppress(OSError):  # a read-only folder keeps its lock file
            path.unlink()


def open_lock_file(path: Path, surface_path: Path) -> tuple[int | None, bool]:
    """A descriptor of the lock file (created if needed) and whether it is writable.

    An existing lock file in a read-only folder is still lockable through a read-only
    descriptor (flock needs no write access). Where none exists and none can be made (a
    read-only folder, whose file the job may still write in place), there is no lock:
    None, said once in the log like a file system that cannot lock.
    """
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666), True
    except OSError as exc:
        if exc.errno not in READ_ONLY:
            raise UserError(
                f"{surface_path}: cannot create its lock file {path.name}: {exc.strerror}"
            ) from None
    try:
        return os.open(path, os.O_RDONLY | flags), False
    except OSError:
        warn_unlocked(surface_path, f"its folder is read-only: no room for {path.name}")
        return None, False


def take(descriptor: int, shared: bool, wait: bool, surface_path: Path) -> bool:
    """Lock the descriptor; False when the file system cannot lock (said once, then unlocked)."""
    operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fcntl.flock(descriptor, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        holder = describe_holder(descriptor)
        if not wait:
            raise UserError(
                f"{surface_path}: another landscape job ({holder}) is writing it; wait for it "
                "or stop it"
            ) from None
        log.info("%s: waiting for another landscape job (%s) to end", surface_path, holder)
        fcntl.flock(descriptor, operation)
        return True
    except OSError as exc:
        if exc.errno not in LOCKING_UNSUPPORTED:
            raise
        warn_unlocked(surface_path, f"this file system cannot lock files ({exc.strerror})")
        return False


def warn_unlocked(surface_path: Path, reason: str) -> None:
    """Say once per process that jobs on ``surface_path`` go on without the lock, and why."""
    global warned_unlocked
    if not warned_unlocked:
        log.warning(
            "%s: %s; going on without the lock, so make sure no other landscape job writes "
            "this file (on Lustre, mount with -o flock)",
            lock_path(surface_path),
            reason,
        )
        warned_unlocked = True


def record_holder(descriptor: int, what: str, shared: bool) -> None:
    """Write who holds the lock into the lock file, for the message a refused job prints.
    Of several shared holders, the file names the latest to take the lock.

    Written in place (a renamed file would be another inode, and another lock); a
    reader that catches it half-written says the holder is unknown."""
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    holder = {
        "what": what,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": started,
        "shared": shared,
    }
    with suppress(OSError):  # a full disk: the lock holds, its holder is just unknown
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)


def describe_holder(descriptor: int) -> str:
    """``loss job on 4 rank(s), pid 1234 on host node7, started 2024-05-01T10:00:00+02:00``."""
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0))
        line = (
            f"{holder['what']}, pid {holder['pid']} on host {holder['host']}, "
            f"started {holder['started']}"
        )
        return f"held shared; the latest to take it: {line}" if holder["shared"] else line
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def this_command() -> str:
    """This process's command line, shortened (a holder's name when it gave none)."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
