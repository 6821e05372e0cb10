"""When iterative linearisation re-linearises: a fixed period (the paper's Algorithm 1) or adaptive policies
(its §5.1 future work). A policy is asked after every proxy step; it sees the step counts and the proxy's loss, and
may ask the trainer for the kernel distance between the network now and the linearisation point θ_s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..validation import as_count, as_positive_float

__all__ = ["UNSET", "FixedPeriod", "KernelDistanceThreshold", "LossPlateau", "Relinearisation", "as_policy"]


class Relinearisation:
    """Base class: :meth:`due` returns whether to re-linearise after the step just taken; :meth:`reset` is called
    at every re-linearisation. ``since``: proxy steps since the last re-linearisation (≥ 1); ``loss``: the proxy's
    loss at that step (before the update); ``distance()``: the kernel distance between the network now and θ_s on
    the trainer's probe batch (computed on demand: a few NTK products)."""

    def due(self, since: int, loss: float, distance: Callable[[], float]) -> bool:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the state of the linearisation just left."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FixedPeriod(Relinearisation):
    """Every ``period`` steps (K of the paper); ``math.inf`` or None: never (the linearised network at θ0)."""

    def __init__(self, period: int | float | None):
        if period is None or period == math.inf:
            self.period = math.inf
        else:
            self.period = as_count(
                period, "period (K, the steps between re-linearisations: an integer >= 1, or None / math.inf for never)"
            )

    def due(self, since: int, loss: float, distance: Callable[[], float]) -> bool:
        return since >= self.period

    def __repr__(self) -> str:
        return f"FixedPeriod({self.period})"


class LossPlateau(Relinearisation):
    """When the proxy's loss has not improved by a relative ``tolerance`` on its best for ``patience`` steps (the
    linear problem is solved as far as these steps go), and at least ``min_steps`` steps after the last."""

    def __init__(self, patience: int = 10, tolerance: float = 1e-3, min_steps: int = 1):
        self.patience = as_count(patience, "patience")
        self.tolerance = as_positive_float(tolerance, "tolerance")
        self.min_steps = as_count(min_steps, "min_steps")
        self.reset()

    def reset(self) -> None:
        self.best, self.stale = math.inf, 0

    def due(self, since: int, loss: float, distance: Callable[[], float]) -> bool:
        if loss < self.best - self.tolerance * abs(self.best) or self.best == math.inf:
            self.best, self.stale = loss, 0
        else:
            self.stale += 1
        return since >= self.min_steps and self.stale >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.stale = state["best"], state["stale"]

    def __repr__(self) -> str:
        return f"LossPlateau(patience={self.patience}, tolerance={self.tolerance})"


class KernelDistanceThreshold(Relinearisation):
    """When the kernel distance between the network now and θ_s on the probe batch exceeds ``threshold`` (the
    features the proxy freezes have moved that far), checked every ``every`` steps."""

    def __init__(self, threshold: float = 0.01, every: int = 10):
        self.threshold = as_positive_float(threshold, "threshold")
        if self.threshold >= 1:
            raise ValueError(f"threshold must be in (0, 1) (a kernel distance 1 − cos), got {threshold}")
        self.every = as_count(every, "every")

    def due(self, since: int, loss: float, distance: Callable[[], float]) -> bool:
        return since % self.every == 0 and distance() > self.threshold

    def __repr__(self) -> str:
        return f"KernelDistanceThreshold({self.threshold}, every={self.every})"


UNSET = object()  # ``period`` not given


def as_policy(period: Any, relinearise: Relinearisation | None) -> Relinearisation:
    """The policy of ``period`` (K; :data:`UNSET`: 1) or ``relinearise`` (one of them)."""
    if relinearise is not None:
        if period is not UNSET:
            raise ValueError("pass either period=K or relinearise=policy, not both")
        if not isinstance(relinearise, Relinearisation):
            raise TypeError(
                f"relinearise must be a Relinearisation policy (FixedPeriod, LossPlateau, "
                f"KernelDistanceThreshold), got {type(relinearise).__name__}"
            )
        return relinearise
    return FixedPeriod(1 if period is UNSET else period)
