"""Files written whole or not at all, and output locations checked before any work.

Every file the package creates (surface files, part files, checkpoints, figures) is
built in memory and handed to :func:`write_file`, which writes it under a temporary
name beside the target (``<name>.tmp``), syncs it to disk and renames it. A crash, a
full disk or Ctrl-C leaves the previous state or the new file, never half of one and
never a ``.tmp`` (except after SIGKILL); folders made for a file that could not be
written are removed again; and a failed write is one line naming the file and the
reason ("No space left on device"). The bytes reach the disk through plain Python I/O,
never through HDF5: HDF5 1.10 that meets a full disk keeps a dirty cache it can never
flush, and crashes the interpreter at exit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from landscape.errors import UserError


def check_writable(path: str | Path, field: str, folder: bool = False) -> None:
    """Fail, before any work is done, unless ``path`` (a file, or a ``folder``) can be
    written: it is not the other kind of thing, no parent is a file, and the nearest
    existing folder is writable (``os.access`` also sees read-only file systems)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        if folder:
            raise UserError(f"{field}: {path} is a file, not a folder; name a folder")
        raise UserError(f"{field}: {path} is a folder; name a file (inside it, or elsewhere)")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{field}: cannot create {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(
            f"{field}: cannot write {path}: {ancestor} is read-only; choose a writable folder"
        )


def write_file(path: str | Path, contents: bytes | memoryview, field: str) -> None:
    """Write ``contents`` to ``path`` whole or not at all (see the module docstring).

    ``field`` names what the user called the file (``output``, ``--out``) in the one-line
    error an OSError becomes.
    """
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with folder_for(path, field):
        try:
            with open(temporary, "wb") as handle:
                handle.write(contents)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
            sync_to_disk(path.parent)
        except BaseException as exc:  # an interrupt too: leave nothing behind
            with suppress(OSError):
                temporary.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                reason = exc.strerror or str(exc)
                raise UserError(
                    f"{field}: cannot write {path} ({reason}); free some space or choose "
                    "another folder"
                ) from None
            raise


@contextmanager
def folder_for(path: Path, field: str) -> Iterator[None]:
    """The folder of ``path``, made (with its parents) for the block once ``path`` is
    known to be writable (:func:`check_writable`); the folders made here are removed
    again, if still empty, when the block fails, so a failed command leaves no trace."""
    check_writable(path, field)
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for folder in made:  # deepest first
            with suppress(OSError):
                folder.rmdir()
        raise


def sync_to_disk(path: str | Path) -> None:
    """Flush a file written in place (a merged surface file) or a folder's entries (a
    rename into it) from the page cache to disk, so that they survive a power cut."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
