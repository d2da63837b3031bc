"""How much memory a device can still give, checked before a large allocation that traffic triggers
(LoRA slot tables growing for a newly loaded adapter): past it, the request that needs the memory is
refused with RESOURCE_EXHAUSTED instead of the allocation failing (CUDA) or the kernel's OOM killer
ending the server (CPU, where untouched pages are promised first and taken later)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ResourceExhausted

HEADROOM = 0.9
"""An allocation may take at most this fraction of what is available: steps' activations need the rest."""


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What the process's cgroup (v2: a container's memory limit) still allows, None without a limit: the limit
    minus its working set, which is usage less inactive file pages (the kernel reclaims those before it kills;
    a model's weights read through the page cache would otherwise count as used), as the kubelet reckons it."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((root / "memory.current").read_text())
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
        return max(0, int(limit) - max(0, used - int(stat.get("inactive_file", 0))))
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device) -> int | None:
    """Bytes `device` can still allocate: on CUDA free memory plus what torch's caching allocator holds
    unused; on CPU the kernel's MemAvailable, within a cgroup limit if one is set. None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        known = [b for b in (_meminfo_available(), cgroup_available()) if b is not None]
        return min(known) if known else None
    return None


def ensure_room(nbytes: int, device: torch.device, what: str, remedy: str) -> None:
    """Raise ResourceExhausted (field adapter_id) unless `nbytes` more fit on `device` with headroom to spare."""
    if nbytes <= 0:
        return
    available = available_bytes(device)
    if available is not None and nbytes > HEADROOM * available:
        raise ResourceExhausted(f"{what} need {nbytes / 2**20:,.0f} MiB more on {device}, which has "
                                f"{available / 2**20:,.0f} MiB available: {remedy}", field="adapter_id")
