"""Lanczos helpers on linear_operator's recurrence: its reorthogonalisation tolerance, and stochastic
Lanczos quadrature, tr f(A) of a symmetric (p × p) operator from Lanczos runs on random probes.

tr f(A) ≈ (p/m) Σ_i Σ_j τ_ij² f(θ_ij) (Ubaru, Chen & Saad 2017): for each of m Rademacher probes z_i,
s Lanczos steps started at z_i/‖z_i‖ give Ritz values θ_ij and the first components τ_ij of the
eigenvectors of the tridiagonal matrix. Each run is the Gauss quadrature of z_iᵀ f(A) z_i (‖z_i‖² = p),
exact once s reaches the number of distinct eigenvalues that z_i sees; the average over probes is
Hutchinson's trace estimator. The m runs share one batched product with A per step. The Lanczos
recurrence is linear_operator's (``lanczos_tridiag``); the nodes and weights are kept, so one run gives tr f(A) for
many f.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from linear_operator.operators import LinearOperator
from linear_operator.utils.lanczos import lanczos_tridiag, lanczos_tridiag_to_diag
from torch import Tensor

from .validation import check_generator

__all__ = ["lanczos_quadrature", "rademacher_probes", "reorthogonalisation_tolerance", "stochastic_lanczos_quadrature"]


def reorthogonalisation_tolerance(dtype: torch.dtype) -> float:
    """``tol`` for linear_operator's ``lanczos_tridiag``: √eps of ``dtype``.

    The recurrence stops as soon as ten reorthogonalisation passes cannot push every inner product with
    the earlier Lanczos vectors below ``tol``; a fixed 1e-10 is out of float32's reach (about 1e-8), and
    Lanczos then stopped after a handful of steps whatever the number asked for.
    """
    return torch.finfo(dtype).eps ** 0.5


def rademacher_probes(
    size: int,
    count: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(size, count) independent ±1 entries, drawn on the generator's device (CPU by default), then moved."""
    checked = check_generator(generator)
    draw_device = checked.device if checked is not None else "cpu"
    bits = torch.randint(0, 2, (size, count), generator=generator, device=draw_device)
    return (2 * bits - 1).to(dtype=dtype or torch.get_default_dtype(), device=device)


def lanczos_quadrature(
    operator: LinearOperator, steps: int, probes: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Nodes θ (m, s) and weights (p/m)·τ² (m, s) of stochastic Lanczos quadrature of a symmetric PSD (p × p)
    operator A: tr f(A) ≈ Σ weights · f(θ) for any f (nodes clamped at 0, so f may be a log of 1 + θ/δ).

    ``steps`` Lanczos steps per probe (products with A, batched over the ``probes`` Rademacher probes drawn from
    ``generator``). The nodes do not depend on f: one run serves f_δ(θ) = log(1 + θ/δ) for every δ.
    """
    if steps < 1 or probes < 1:
        raise ValueError(f"steps and probes must be >= 1, got steps={steps}, probes={probes}")
    p = operator.shape[-1]
    z = rademacher_probes(p, probes, generator, operator.dtype, operator.device)
    _, t = lanczos_tridiag(
        operator._matmul,
        max_iter=steps,
        dtype=operator.dtype,
        device=operator.device,
        matrix_shape=operator.shape,
        init_vecs=z,
        tol=reorthogonalisation_tolerance(operator.dtype),
    )
    if probes == 1:  # lanczos_tridiag drops the probe dimension for a single start vector
        t = t.unsqueeze(0)
    evals, evecs = lanczos_tridiag_to_diag(t)
    return evals.clamp_min(0), (p / probes) * evecs[..., 0, :].square()


def stochastic_lanczos_quadrature(
    operator: LinearOperator,
    fn: Callable[[Tensor], Tensor],
    steps: int,
    probes: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate tr f(A) for a symmetric positive semi-definite (p × p) operator A (:func:`lanczos_quadrature`).

    Args:
        fn: applied elementwise to Ritz values (>= 0: negative round-off ones are clamped at 0).
        steps: Lanczos steps per probe (products with A, each batched over the probes).
        probes: number m of Rademacher probes; the estimate's standard error falls as 1/√m.
        generator: for the probes (reproducible estimates).

    Returns a 0-dim tensor.
    """
    nodes, weights = lanczos_quadrature(operator, steps, probes, generator)
    return (weights * fn(nodes)).sum()


def ritz_values(
    apply: Callable[[Tensor], Tensor],
    size: int,
    steps: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    metric: Callable[[Tensor], Tensor] | None = None,
    solve: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Ritz values (steps,) of a symmetric operator H (``apply``: (size,) -> (size,)), ascending, after ``steps``
    Lanczos steps with full reorthogonalisation from a fixed pseudo-random start.

    With ``metric`` M (SPD, v -> Mv) and ``solve`` (v -> M⁻¹v) they are the Ritz values of the preconditioned
    M⁻¹H, self-adjoint in the M inner product (the eigenvalues of the pencil (H, M), those preconditioned
    gradient descent sees). The extremes converge first: λ_max / λ_min of the Ritz values estimate the
    condition number from inside.
    """
    steps = min(steps, size)
    metric = metric or (lambda v: v)
    solve = solve or (lambda v: v)
    generator = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(size, generator=generator, dtype=dtype).to(device)
    mq = metric(q)
    scale = (q @ mq).sqrt()
    basis, metric_basis = [q / scale], [mq / scale]
    alphas, betas = [], []
    for j in range(steps):
        hq = apply(basis[j])
        alphas.append(basis[j] @ hq)
        if j == steps - 1:
            break
        w = solve(hq)
        q_stack, mq_stack = torch.stack(basis), torch.stack(metric_basis)
        for _ in range(2):  # full reorthogonalisation in the M inner product, twice is enough
            w = w - q_stack.mT @ (mq_stack @ w)
        mw = metric(w)
        beta = (w @ mw).clamp_min(0).sqrt()
        if float(beta) <= torch.finfo(dtype).eps ** 0.5 * float(torch.stack(alphas).abs().max()):
            break  # an invariant subspace (to rounding): the Ritz values are exact
        betas.append(beta)
        basis.append(w / beta)
        metric_basis.append(mw / beta)
    t = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas[: len(alphas) - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(t.double())
