"""The linear-algebra choice of ntkgp, made explicitly rather than by whatever gpytorch settings are in force.

``import botorch`` switches gpytorch's fast computations off and raises ``max_cholesky_size`` for the
whole process; every solve of ntkgp runs inside :meth:`Solver.settings`, so it does not depend on that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import gpytorch
import linear_operator
import torch
from linear_operator.utils.linear_cg import linear_cg
from torch import Tensor

from ..progress import progress_bar
from ..validation import as_count, as_positive_float, check_choice

__all__ = ["Solver", "as_solver", "conjugate_gradients"]

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

    def __post_init__(self) -> None:
        check_choice(self.method, "solver method", _METHODS)
        set_ = object.__setattr__  # the dataclass is frozen: store the checked (normalised) values
        set_(self, "cholesky_max_size", as_count(self.cholesky_max_size, "cholesky_max_size", minimum=0))
        set_(self, "cg_tolerance", as_positive_float(self.cg_tolerance, "cg_tolerance"))
        set_(self, "max_cg_iterations", as_count(self.max_cg_iterations, "max_cg_iterations"))
        set_(self, "preconditioner_size", as_count(self.preconditioner_size, "preconditioner_size", minimum=0))
        set_(self, "lanczos_rank", as_count(self.lanczos_rank, "lanczos_rank"))

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


def as_solver(solver: Solver | str | None) -> Solver:
    """``solver`` as a :class:`Solver`: None is the default, a string is a method name ("auto", "cholesky", "cg")."""
    if solver is None:
        return Solver()
    if isinstance(solver, str):
        return Solver(solver)
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a Solver or one of {_METHODS}, got {type(solver).__name__} {solver!r}")
    return solver


def conjugate_gradients(
    product: Callable[[Tensor], Tensor],
    rhs: Tensor,
    tolerance: float,
    max_iter: int,
    start: Tensor | None = None,
    desc: str = "CG products",
    progress: bool = True,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """x with A x = rhs for a symmetric positive definite A given by ``product`` ((p, k) -> (p, k)), rhs (p,) or
    (p, k), by linear_operator's CG from ``start`` (default 0) to a relative residual ``tolerance`` or ``max_iter``
    iterations, preconditioned by ``preconditioner`` (an approximation of A⁻¹, (p, k) -> (p, k)) when given; a tqdm
    bar over the products (shown after 1 s).

    linear_cg clamps r·z at its eps (default 1e-10), which stalls it near a relative residual of 1e-5: it runs with
    eps at the dtype's smallest normal number here, so tight tolerances are reached."""
    column = rhs.dim() == 1
    rhs = rhs.unsqueeze(-1) if column else rhs
    tiny = torch.finfo(rhs.dtype).tiny
    with progress_bar(desc=desc, enabled=progress) as bar:

        def counted(v: Tensor) -> Tensor:
            bar.update(1)
            return product(v)

        guess = None if start is None else (start.unsqueeze(-1) if column else start)
        out = linear_cg(
            counted,
            rhs,
            max_iter=max_iter,
            max_tridiag_iter=0,
            tolerance=tolerance,
            eps=tiny,
            stop_updating_after=tiny,
            initial_guess=guess,
            preconditioner=preconditioner,
        )  # (no tridiagonal matrix: any max_iter)
    return out.squeeze(-1) if column else out
