"""Memory estimates before large allocations: what is available, and a clear error naming the knob to turn."""

from __future__ import annotations

import os

import torch

__all__ = ["available_bytes", "check_fits", "default_budget", "format_bytes"]


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the CUDA allocator's free memory plus what it holds in reserve, or the host's
    available physical memory (Linux ``sysconf``; 8 GiB where that is unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_budget(device: torch.device) -> int:
    """Half of what :func:`available_bytes` reports: the default bound for one operation's working memory."""
    return available_bytes(device) // 2


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def check_fits(needed: float, budget: float, what: str, knobs: str) -> None:
    """Raise a MemoryError before ``what`` when its estimated peak ``needed`` (bytes) exceeds ``budget``."""
    if needed > budget:
        raise MemoryError(f"{what} would need about {format_bytes(needed)}, more than the memory budget of "
                          f"{format_bytes(budget)}; {knobs}")
