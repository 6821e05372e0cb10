"""Memory estimates before large allocations: what is available, and a clear error naming the knob to turn."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LargestTensor", "available_bytes", "check_fits", "default_budget", "format_bytes", "peak_resident_bytes"]


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
        raise MemoryError(
            f"{what} would need about {format_bytes(needed)}, more than the memory budget of "
            f"{format_bytes(budget)}; {knobs}"
        )


class LargestTensor(TorchDispatchMode):
    """Within ``with LargestTensor() as seen:``, ``seen.elements`` and ``seen.shape`` record the largest tensor any
    torch operation produced (views included): a check that a computation never formed, say, an N × N matrix.
    ``seen.op`` names the operation. Costs a Python call per operation."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: int = 0
        self.shape: tuple[int, ...] = ()
        self.op: str | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.elements:
                self.elements, self.shape, self.op = t.numel(), tuple(t.shape), str(func)
        return out


def peak_resident_bytes(reset: bool = False) -> int:
    """The process's peak resident memory (Linux VmHWM) in bytes; ``reset`` starts a new peak at the current
    size first (writes /proc/self/clear_refs). 0 where /proc is not there."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        with open("/proc/self/status") as handle:
            line = next(row for row in handle if row.startswith("VmHWM"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0
