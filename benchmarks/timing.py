"""What the benchmark scripts share: interleaved median timings, peak memory, the device's name, JSON output."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict, device: torch.device, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (median seconds, peak bytes above the baseline; 0 on CPU) of each ``fn()`` after one warm-up,
    timed in interleaved rounds so that clock and load drift hit every function alike."""
    for fn in fns.values():
        fn()
    sync(device)
    times = {name: [] for name in fns}
    peaks = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - base)
    return {name: (statistics.median(times[name]), peaks[name]) for name in fns}


def cpu_peak_bytes(fn) -> float:
    """Peak memory allocated by ``fn()`` on the CPU above what was allocated before it: the running sum of the
    profiler's memory events (allocations and frees, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return float(peak)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def header(device: torch.device, repeats: int) -> str:
    """The line every benchmark prints first: where and how it measured."""
    return f"device: {device_name(device)}, torch {torch.__version__}, float32, median of {repeats}"


def write_results(path: Path, device: torch.device, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device_name(device), "torch": torch.__version__, "rows": rows}, indent=1))


def mlp_and_resnet(device: torch.device, n_mlp: int, n_resnet: int) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, network, inputs) of the two reference networks (GUIDE §5), random weights (seed 0): the MLP
    784-1024-1024-10 on n_mlp inputs and torchvision's ResNet-18 (10 outputs) on n_resnet 32 × 32 images."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    resnet = torchvision.models.resnet18(num_classes=10)
    return [
        ("MLP 784-1024-1024-10", mlp, torch.randn(n_mlp, 784, device=device)),
        ("ResNet-18 32x32", resnet, torch.randn(n_resnet, 3, 32, 32, device=device)),
    ]
