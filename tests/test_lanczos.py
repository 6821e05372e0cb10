"""Lanczos in both precisions against dense eigendecompositions (float64 references).

Tolerances: Ritz values of the top of the spectrum 1e-8 (float64) and 1e-4 (float32, relative); the
quadrature is exact per probe once the steps exceed the rank, so it matches Hutchinson's estimator with
the same probes to 1e-10 (float64) and 1e-4 (float32).
"""

import pytest
import torch
from linear_operator.operators import DenseLinearOperator

from ntkgp.gp.parameter_space import lanczos_spectrum
from ntkgp.lanczos import rademacher_probes, stochastic_lanczos_quadrature


def low_rank_psd(p: int = 200, rank: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(p, rank, generator=g, dtype=torch.float64) * torch.logspace(0, -2, rank, dtype=torch.float64)
    return a @ a.T


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_lanczos_runs_every_step_asked_for(dtype, tol):
    """Before the tolerance followed the dtype, float32 Lanczos stopped after a few steps (its
    reorthogonalisation could not reach 1e-10), whatever the rank asked for."""
    matrix = low_rank_psd()
    spectrum = lanczos_spectrum(DenseLinearOperator(matrix.to(dtype)), 30)
    assert spectrum.eigenvalues.numel() >= 28  # 30 steps; the numerical-rank mask may drop the smallest
    top = torch.linalg.eigvalsh(matrix).flip(0)[:5]
    found = spectrum.eigenvalues.double().flip(0)[:5]
    assert float(((found - top).abs() / top).max()) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_quadrature_is_hutchinson_with_the_same_probes(dtype, tol):
    matrix = low_rank_psd()
    evals, evecs = torch.linalg.eigh(matrix)
    log_a = evecs @ torch.diag(torch.log1p(evals.clamp_min(0))) @ evecs.T
    probes = rademacher_probes(200, 7, torch.Generator().manual_seed(3), torch.float64)
    reference = float((probes * (log_a @ probes)).sum(0).mean())
    estimate = stochastic_lanczos_quadrature(
        DenseLinearOperator(matrix.to(dtype)), torch.log1p, 45, 7, torch.Generator().manual_seed(3)
    )
    assert abs(float(estimate) - reference) < tol * abs(reference)
    with pytest.raises(ValueError, match="steps and probes must be >= 1"):
        stochastic_lanczos_quadrature(DenseLinearOperator(matrix), torch.log1p, 0, 3)
