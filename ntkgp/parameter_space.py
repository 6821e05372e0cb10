"""Spectra of the NTK and of G = JᵀJ, and the NTK-GP quantities that follow from them in closed form.

J (N × p, N = n·C) has a thin SVD J = U S Qᵀ: K = JJᵀ = U S² Uᵀ and G = JᵀJ = Q S² Qᵀ share the
nonzero eigenvalues λ = S². With c = σ²/s² and A = G + cI (all of the spectrum not in Q taken as 0):
  A⁻¹ = Q diag(1/(λ + c)) Qᵀ + (I − QQᵀ)/c,
so the parameter-space posterior mean J* A⁻¹ Jᵀ r, the variance σ² diag(J* A⁻¹ J*ᵀ) and the
marginal likelihood need only (λ, Q). The spectrum is exact when the smaller of N and p is dense-sized
(eigh of the smaller Gram); otherwise it is the top Lanczos Ritz pairs of G.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from linear_operator.operators import LinearOperator
from linear_operator.utils.lanczos import lanczos_tridiag
from torch import Tensor

from .functional import FunctionalNetwork
from .gram_operator import GramOperator
from .lanczos import reorthogonalisation_tolerance
from .ntk_operator import NTKOperator
from .solver import Solver

__all__ = ["GramSpectrum", "gram_spectrum", "lanczos_spectrum", "ntk_eigh", "spectral_log_marginal_likelihood",
           "spectral_solve", "spectral_variance_reduction"]


@dataclass
class GramSpectrum:
    """Eigenpairs of G = JᵀJ: eigenvalues (r,) > 0 and orthonormal eigenvectors (p, r).

    ``ntk``: when the pairs came from the NTK (Q = Jᵀ U / √λ), all its eigenpairs ((N,), (N, N)), for
    quantities that need no division by λ (the evidence).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    exact: bool
    ntk: tuple[Tensor, Tensor] | None = None


def _numerical_rank_mask(eigenvalues: Tensor, size: int) -> Tensor:
    """Eigenvalues above √size·eps·λ_max, the typical backward error of a symmetric eigensolver.

    (The worst-case bound size·eps·λ_max dropped real, accurately computed eigenvalues in float32: a
    quarter of a 120 × 120 NTK's; `tests/test_ntk_gp.py::test_float32_agrees_with_float64`.)
    """
    floor = size**0.5 * torch.finfo(eigenvalues.dtype).eps * eigenvalues.abs().max().clamp_min(1e-300)
    return eigenvalues > floor


def ntk_eigh(network: FunctionalNetwork, x: Tensor, num_outputs: int) -> tuple[Tensor, Tensor]:
    """All eigenpairs of the dense NTK K(x, x) (N × N), eigenvalues clamped at 0: (N,), (N, N)."""
    kernel = NTKOperator(x, x, network=network, num_outputs=num_outputs).to_dense()
    evals, evecs = torch.linalg.eigh(kernel)
    return evals.clamp_min(0), evecs


def gram_spectrum(network: FunctionalNetwork, x: Tensor, num_outputs: int, solver: Solver,
                  max_dense_elements: int = 2**27) -> GramSpectrum:
    """Spectrum of G = J(x)ᵀ J(x) (p × p).

    Exact by ``eigh`` of G when p <= N and p is dense-sized; exact through the NTK's eigenpairs
    (Q = Jᵀ U / √λ, one batched VJP) when N < p, N is dense-sized and Q (p × N) fits in
    ``max_dense_elements``; otherwise the top ``solver.lanczos_rank`` Ritz pairs of Lanczos on G.
    """
    p, big_n = network.num_params, x.shape[0] * num_outputs
    gram = GramOperator(x, network=network)
    if p <= big_n and solver.dense(p):
        evals, evecs = torch.linalg.eigh(gram.to_dense())
        keep = _numerical_rank_mask(evals, p)
        return GramSpectrum(evals[keep], evecs[:, keep], exact=True)
    if big_n < p and solver.dense(big_n) and big_n * p <= max_dense_elements:
        evals, evecs = ntk_eigh(network, x, num_outputs)
        keep = _numerical_rank_mask(evals, big_n)
        cotangents = (evecs[:, keep] / evals[keep].sqrt()).mT.reshape(-1, x.shape[0], num_outputs)
        return GramSpectrum(evals[keep], network.vjp(x, cotangents).mT, exact=True, ntk=(evals, evecs))
    return lanczos_spectrum(gram, solver.lanczos_rank)


def lanczos_spectrum(operator: LinearOperator, rank: int) -> GramSpectrum:
    """Top Ritz pairs of a symmetric PSD (p × p) operator after ``rank`` Lanczos steps (exact if rank >= p).

    The start vector is a fixed pseudo-random one, so the result is reproducible.
    """
    p = operator.shape[-1]
    rank = min(rank, p)
    generator = torch.Generator(device=operator.device).manual_seed(0)
    start = torch.randn(p, 1, generator=generator, dtype=operator.dtype, device=operator.device)
    q, t = lanczos_tridiag(operator._matmul, max_iter=rank, dtype=operator.dtype, device=operator.device,
                           matrix_shape=operator.shape, tol=reorthogonalisation_tolerance(operator.dtype),
                           init_vecs=start)
    evals, s = torch.linalg.eigh(t)
    keep = _numerical_rank_mask(evals, p)
    return GramSpectrum(evals[keep], (q @ s)[:, keep], exact=rank == p)


def spectral_solve(spectrum: GramSpectrum, b: Tensor, c: Tensor) -> Tensor:
    """A⁻¹ b for A = G + cI and b = Jᵀ r in the range of G: b (p,) -> (p,).

    The part of b outside span(Q) is solved as eigenvalue 0: with a partial (Lanczos) spectrum it is
    the directions not found; with an exact one, the eigenvalues the rank mask dropped, plus roundoff.
    (Dropping it instead cost a few % of the float32 predictive mean where the masked eigenvalues were
    real: `tests/test_ntk_gp.py::test_float32_agrees_with_float64`.)
    """
    coef = spectrum.eigenvectors.mT @ b
    in_span = spectrum.eigenvectors @ (coef / (spectrum.eigenvalues + c))
    return in_span + (b - spectrum.eigenvectors @ coef) / c


def spectral_variance_reduction(eigenvalues: Tensor, test_features: Tensor, c: Tensor) -> Tensor:
    """Σ_k λ_k / (c (λ_k + c)) (J* q_k)²: test_features = (J* q_k)_k of shape (r, m) -> (m,)."""
    weights = eigenvalues / (c * (eigenvalues + c))
    return (weights.unsqueeze(-1) * test_features.square()).sum(0)


def spectral_log_marginal_likelihood(eigenvalues: Tensor, projected: Tensor, b_sq: Tensor, r_sq: Tensor,
                                     num_data: int, outputscale: Tensor, noise: Tensor) -> Tensor:
    """log N(r; 0, s² JJᵀ + σ² I) from the spectrum (Woodbury and the determinant lemma).

    Args:
        eigenvalues: λ (r,); projected: Qᵀ Jᵀ r (r,) (equivalently √λ·Uᵀ r); b_sq: ‖Jᵀ r‖²;
        r_sq: ‖r‖²; num_data: N = n·C; outputscale: s²; noise: σ² (differentiable, any broadcastable
        shape (...) — e.g. a grid of hyperparameters). Returns shape (...).
    """
    c = (noise / outputscale).unsqueeze(-1)
    b_inv_b = (projected.square() / (eigenvalues + c)).sum(-1) + (b_sq - projected.square().sum()) / c.squeeze(-1)
    quad = (r_sq - b_inv_b) / noise
    logdet = num_data * torch.log(noise) + torch.log1p(eigenvalues / c).sum(-1)
    return -0.5 * (quad + logdet + num_data * math.log(2 * math.pi))
