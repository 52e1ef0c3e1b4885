"""Free memory of a device, and byte counts for people: what a Lanczos basis, K points
per pass, a data set held on the device and kept gradient graphs are each checked
against."""

from __future__ import annotations

import os

import torch


def free_memory(device: torch.device) -> int | None:
    """Bytes a new tensor can take on ``device``: free GPU memory plus what PyTorch's
    cache holds unused; on the CPU, the kernel's MemAvailable, or less where this
    process's control group (a SLURM ``--mem``, a container) allows less; None where
    unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    available = host_available()
    allowed = cgroup_allowance()
    if available is None or allowed is None:
        return available if allowed is None else allowed
    return min(available, allowed)


def host_available() -> int | None:
    """The kernel's MemAvailable (bytes), else free pages; None where unknown."""
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


# (limit, usage) files of this process's memory control group: cgroup v2, then v1.
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
    ),
)


def cgroup_allowance() -> int | None:
    """Bytes this process's memory control group still allows (its limit less its
    usage); None where it sets no limit or none can be read."""
    for limit_file, usage_file in CGROUP_FILES:
        try:
            with open(limit_file) as limit, open(usage_file) as usage:
                text, used = limit.read().strip(), int(usage.read())
        except (OSError, ValueError):
            continue
        if text == "max" or int(text) >= 2**60:  # v2's and v1's "no limit"
            return None
        return max(0, int(text) - used)
    return None


def in_units(count: float) -> str:
    """A byte count for people: ``162 GiB``, ``81.4 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.3g} {unit}"
        count /= 1024
