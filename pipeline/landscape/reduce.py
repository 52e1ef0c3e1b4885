"""Reduce: bring a surface file up to date after a run, in one serial process.

Reducing merges the part files waiting beside the file (:mod:`landscape.parts`), then
derives every derived map of its jobs (:meth:`landscape.jobs.JobKind.derived_maps`, e.g.
lambda_ratio) from the maps now in it: always, also when there was no part to merge
(a serial or ``mpio`` run writes the file directly). It is the one place either
happens. Rank 0 reduces when ``landscape run`` / ``hessian`` ends, and before it starts
(to count what a killed part-file run left as done); ``landscape reduce`` and the SLURM
reduce job call it after array tasks.
"""

from __future__ import annotations

import logging
from pathlib import Path

from landscape.atomic import sync_to_disk
from landscape.locking import surface_lock
from landscape.parts import delete_parts, merge_parts, part_files
from landscape.store import SurfaceFile

log = logging.getLogger(__name__)


def reduce(surface_path: str | Path) -> int:
    """Merge every part file into the surface file, derive its derived maps, then delete
    the parts; returns the number of points merged. A file with no part waiting and every
    derived map up to date is only read: a run that ends (or starts) with nothing to
    reduce never opens its file for writing, which HDF5's file locking would refuse on
    NFS and Lustre under an ``mpio`` job.

    Parts are deleted only after the surface file is closed and synced to disk (a power
    cut must not lose the merged values with the parts gone), so a crash in between
    leaves them to be merged again, which writes the same values. The surface's lock is
    held throughout: no array task writes parts meanwhile, and no other reducer merges
    the same ones.
    """
    if not part_files(surface_path):
        with SurfaceFile.open(surface_path) as surface:
            if not surface.stale_derived_maps():
                return 0  # nothing to write: no lock, no writable open (NFS, Lustre, mpio)
    with surface_lock(surface_path, "landscape reduce"):
        parts = part_files(surface_path)
        with SurfaceFile.open(surface_path, "r+") as surface:
            merged = merge_parts(surface, parts)
            surface.store_derived_maps(surface.stale_derived_maps())
        if parts:
            sync_to_disk(surface_path)
            delete_parts(surface_path, parts)
            log.info("%s: merged %d points from %d part files", surface_path, merged, len(parts))
    return merged
