"""Free memory of a device, and byte counts for people: what a Lanczos basis, K points
per pass, a data set held on the device and kept gradient graphs are each checked
against."""

from __future__ import annotations

import math
import os

import torch

from landscape.ranks import launched_size

# The ranks a launcher started on this node: Open MPI, MPICH (Hydra), srun with
# --ntasks-per-node.
LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


def free_memory(device: torch.device) -> int | None:
    """Bytes a new tensor can take on ``device``: free GPU memory plus what PyTorch's
    cache holds unused; on the CPU, the kernel's MemAvailable; None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def sharing_processes(device: torch.device) -> int:
    """How many of this run's processes take memory from ``device``: the ranks on this
    node (as their launcher announced them; all the run's ranks where it names none,
    which errs on the safe side), over the node's GPUs for a GPU (each rank takes the GPU
    of its node rank modulo the GPUs)."""
    local = next((int(os.environ[n]) for n in LOCAL_SIZE_VARIABLES if n in os.environ), None)
    ranks = max(1, local or launched_size())
    if device.type == "cuda":
        return math.ceil(ranks / max(1, torch.cuda.device_count()))
    return ranks


def in_units(count: float) -> str:
    """A byte count for people: ``162 GiB``, ``81.4 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.3g} {unit}"
        count /= 1024
