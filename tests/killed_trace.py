"""``landscape trace`` killed (SIGKILL) right after its k-th write to disk, as a kill at that
moment would leave it. Started in a child process by test_trace.

A write is one block HDF5 writes into a file opened for writing, one whole-file copy,
fsync or rename. HDF5 writes through a Python file object here (h5py's ``fileobj``
driver over an unbuffered ``io.FileIO``), so each of its writes reaches the operating
system as it is made, as with its default driver, and can be counted. (Today trace
builds the new file in memory and writes it whole: fsync, rename, fsync of the folder;
the HDF5 hook keeps the test honest should it ever write a file in place again.)
"""

from __future__ import annotations

import io
import os
import shutil
import signal

import h5py

from landscape import cli


def trace_killed_after(writes: int, surface: str) -> None:
    """Run ``landscape trace SURFACE``, dying by SIGKILL just after write number ``writes``
    (exiting with the command's status when it makes fewer writes than that)."""
    made = 0

    def count() -> None:
        nonlocal made
        made += 1
        if made == writes:
            os.kill(os.getpid(), signal.SIGKILL)

    class CountedFile(io.FileIO):
        def write(self, data) -> int:
            written = super().write(data)
            count()
            return written

    open_hdf5 = h5py.File.__init__

    def open_counted(self, name, mode="r", *args, **kwargs):
        if mode != "r" and isinstance(name, (str, os.PathLike)):
            name = CountedFile(name, "r+" if mode == "r+" else "w+")
            kwargs.pop("locking", None)
        open_hdf5(self, name, mode, *args, **kwargs)

    def counted(call):
        def write(*args, **kwargs):
            result = call(*args, **kwargs)
            count()
            return result

        return write

    h5py.File.__init__ = open_counted
    shutil.copyfile, os.fsync, os.replace = map(counted, (shutil.copyfile, os.fsync, os.replace))
    raise SystemExit(cli.main(["trace", surface]))
