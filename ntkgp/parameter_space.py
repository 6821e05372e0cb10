"""Parameter-space inference for the NTK-GP through the spectrum of G = JᵀJ (p × p).

With c = σ²/s² and A = G + cI, the GP posterior of §1 of the guide reads
  mean(x*) = m(x*) + J* A⁻¹ Jᵀ r,     var(x*) = σ² diag(J* A⁻¹ J*ᵀ),
and with G ≈ Q diag(λ) Qᵀ (all of the spectrum not in Q taken as 0):
  A⁻¹ = Q diag(1/(λ + c)) Qᵀ + (I − QQᵀ)/c.
The spectrum is exact (dense ``eigh``) for small p and the top Lanczos Ritz pairs otherwise; it is
exact too whenever the Lanczos rank reaches rank(G) <= n·C. Small pure functions, shapes stated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from linear_operator.utils.lanczos import lanczos_tridiag
from torch import Tensor

from .gram_operator import GramOperator
from .solver import Solver

__all__ = ["GramSpectrum", "gram_spectrum", "spectral_log_marginal_likelihood", "spectral_solve",
           "spectral_variance_reduction"]


@dataclass
class GramSpectrum:
    """Eigenpairs of G = JᵀJ: eigenvalues (r,) >= 0 and orthonormal eigenvectors (p, r)."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    exact: bool


def gram_spectrum(gram: GramOperator, solver: Solver) -> GramSpectrum:
    """Exact spectrum of G when ``solver.dense(p)``, else the top ``solver.lanczos_rank`` Ritz pairs."""
    p = gram.shape[-1]
    if solver.dense(p):
        evals, evecs = torch.linalg.eigh(gram.to_dense())
        return GramSpectrum(evals.clamp_min(0), evecs, exact=True)
    rank = min(solver.lanczos_rank, p)
    q, t = lanczos_tridiag(gram._matmul, max_iter=rank, dtype=gram.dtype, device=gram.device,
                           matrix_shape=gram.shape, tol=1e-10)
    evals, s = torch.linalg.eigh(t)
    return GramSpectrum(evals.clamp_min(0), q @ s, exact=rank == p)


def spectral_solve(spectrum: GramSpectrum, b: Tensor, c: Tensor) -> Tensor:
    """A⁻¹ b for A = G + cI: b (p,) -> (p,)."""
    coef = spectrum.eigenvectors.mT @ b
    in_span = spectrum.eigenvectors @ (coef / (spectrum.eigenvalues + c))
    return in_span + (b - spectrum.eigenvectors @ coef) / c


def spectral_variance_reduction(spectrum: GramSpectrum, test_features: Tensor, c: Tensor) -> Tensor:
    """Σ_k λ_k / (c (λ_k + c)) (J* q_k)²: test_features = J* Q of shape (r, m) -> (m,)."""
    weights = spectrum.eigenvalues / (c * (spectrum.eigenvalues + c))
    return (weights.unsqueeze(-1) * test_features.square()).sum(0)


def spectral_log_marginal_likelihood(spectrum: GramSpectrum, projected: Tensor, b_sq: Tensor, r_sq: Tensor,
                                     num_data: int, outputscale: Tensor, noise: Tensor) -> Tensor:
    """log N(r; 0, s² JJᵀ + σ² I) from the spectrum of JᵀJ (Woodbury and the determinant lemma).

    Args:
        projected: Qᵀ Jᵀ r (r,); b_sq: ‖Jᵀ r‖²; r_sq: ‖r‖²; num_data: N = n·C.
        outputscale: s²; noise: σ² (scalars, differentiable).
    """
    c = noise / outputscale
    evals = spectrum.eigenvalues
    b_inv_b = (projected.square() / (evals + c)).sum() + (b_sq - projected.square().sum()) / c
    quad = (r_sq - b_inv_b) / noise
    logdet = num_data * torch.log(noise) + torch.log1p(evals / c).sum()
    return -0.5 * (quad + logdet + num_data * math.log(2 * math.pi))
