"""The linear-algebra choice of ntkgp, made explicitly rather than by whatever gpytorch settings are in force.

``import botorch`` switches gpytorch's fast computations off and raises ``max_cholesky_size`` for the
whole process; every solve of ntkgp runs inside :meth:`Solver.settings`, so it does not depend on that.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from collections.abc import Iterator

import gpytorch
import linear_operator

__all__ = ["Solver"]

_METHODS = ("auto", "cholesky", "cg")


@dataclass(frozen=True)
class Solver:
    """How systems with s²K + σ²I (function space) or JᵀJ + (σ²/s²)I (parameter space) are solved.

    Args:
        method: ``"cholesky"`` (dense, exact), ``"cg"`` (preconditioned CG; Lanczos/LOVE for variances)
            or ``"auto"``: Cholesky up to ``cholesky_max_size`` rows, CG beyond.
        cholesky_max_size: the size up to which ``"auto"`` is dense.
        cg_tolerance: relative residual at which CG stops (training and prediction alike). linear_operator's
            CG restarts once the squared relative residual falls below its fixed eps = 1e-10, so it
            stalls near 1e-5: smaller tolerances only spend ``max_cg_iterations`` (seen on 0.6.1).
        max_cg_iterations: CG iteration cap.
        preconditioner_size: rank of the pivoted-Cholesky preconditioner (0 = none).
        lanczos_rank: Lanczos iterations for predictive variances (LOVE) and parameter-space spectra.
    """

    method: str = "auto"
    cholesky_max_size: int = 2048
    cg_tolerance: float = 1e-5
    max_cg_iterations: int = 2000
    preconditioner_size: int = 20
    lanczos_rank: int = 512

    def __post_init__(self):
        if self.method not in _METHODS:
            raise ValueError(f"solver method must be one of {_METHODS}, got {self.method!r}")
        if self.cg_tolerance <= 0 or self.max_cg_iterations < 1 or self.lanczos_rank < 1:
            raise ValueError("cg_tolerance must be > 0, max_cg_iterations and lanczos_rank >= 1")

    def dense(self, size: int) -> bool:
        """Whether a system of ``size`` rows is solved densely."""
        return self.method == "cholesky" or (self.method == "auto" and size <= self.cholesky_max_size)

    @contextmanager
    def settings(self) -> Iterator[None]:
        """gpytorch / linear_operator settings implementing this choice (a context manager)."""
        cholesky_limit = {"cholesky": 2**62, "cg": 0, "auto": self.cholesky_max_size}[self.method]
        contexts = [
            gpytorch.settings.fast_computations(covar_root_decomposition=True, log_prob=True, solves=True),
            gpytorch.settings.max_cholesky_size(cholesky_limit),
            gpytorch.settings.cg_tolerance(self.cg_tolerance),
            gpytorch.settings.eval_cg_tolerance(self.cg_tolerance),
            gpytorch.settings.max_cg_iterations(self.max_cg_iterations),
            gpytorch.settings.max_preconditioner_size(self.preconditioner_size),
            linear_operator.settings.min_preconditioning_size(0),
            gpytorch.settings.max_root_decomposition_size(self.lanczos_rank),
            gpytorch.settings.fast_pred_var(self.method != "cholesky"),
            gpytorch.settings.max_eager_kernel_size(0),  # keep test covariances lazy: only diagonals are needed
        ]
        with ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            yield
