"""What every experiment shares: its registration record, seeding, atomic result files, summary tables."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Experiment",
    "adam_epochs",
    "atomic_path",
    "begin",
    "format_table",
    "mean_and_stderr",
    "resumed",
    "save_figure_atomic",
    "seed_everything",
    "write_json_atomic",
]


@dataclass(frozen=True)
class Experiment:
    """An experiment the ``ntkgp`` command can run.

    ``run(config, out_dir, device, seed)`` writes its results under ``out_dir`` and returns a summary;
    ``configs`` maps a configuration name (``"default"``, ``"tiny"`` for the test suite) to keyword settings.
    """

    name: str
    description: str
    run: Callable[[dict, Path, str, int], dict]
    configs: dict[str, dict] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without an error, so a
    crash never leaves half a file. The file is created as any file the user makes (mode 0666 less the umask:
    0644 usually, not the 0600 of ``tempfile``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to ``path`` (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1)


def resumed(path: Path, fresh: dict) -> dict:
    """The results at ``path`` when they were written for the same ``config`` and ``seed`` as ``fresh`` (a rerun
    keeps what was finished), else ``fresh``."""
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("config") == fresh["config"] and previous.get("seed") == fresh["seed"]:
            return previous
    return fresh


def begin(config: dict, out_dir: Path, device: str, seed: int, **empty) -> tuple[Path, dict, float]:
    """Seed everything and open the run's results: (``out_dir/results.json``, its payload — what a previous run of
    the same config and seed finished, else a fresh one with ``empty`` fields —, the start time)."""
    seed_everything(seed)
    start = time.perf_counter()
    path = out_dir / "results.json"
    return path, resumed(path, {"config": config, "seed": seed, "device": device, **empty}), start


def save_figure_atomic(fig, path: Path, dpi: int = 120) -> None:
    """Lay out, write through a temporary file and a rename, and close a matplotlib figure."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    import matplotlib.pyplot as plt  # here: importing experiments.common stays light

    plt.close(fig)


def mean_and_stderr(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    err = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    return float(arr.mean()), err


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def adam_epochs(
    model: torch.nn.Module,
    params,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    batch: int,
    steps: int,
    seed: int,
    loss: Callable = torch.nn.functional.cross_entropy,
) -> None:
    """``steps`` Adam steps (learning rate ``lr``) on ``params``, minimising ``loss(model(x_b), y_b)`` over
    minibatches of ``batch`` rows drawn without replacement in epochs shuffled by ``seed``."""
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for rows in torch.randperm(len(x), generator=generator).split(batch):
            optimizer.zero_grad()
            loss(model(x[rows]), y[rows]).backward()
            optimizer.step()
            done += 1
            if done == steps:
                return
