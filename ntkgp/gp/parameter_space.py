"""Spectra of the NTK and of G = JᵀJ, and the NTK-GP quantities that follow from them in closed form.

J (N × p, N = n·C) has a thin SVD J = U S Qᵀ: K = JJᵀ = U S² Uᵀ and G = JᵀJ = Q S² Qᵀ share the
nonzero eigenvalues λ = S². With c = σ²/s² and A = G + cI, the parameter-space posterior mean needs
α = A⁻¹ Jᵀ r = Jᵀ (K + cI)⁻¹ r, the variance σ² diag(J* A⁻¹ J*ᵀ) and the marginal likelihood (λ, Q).

Precision: the dense spectra are computed in float64 from the matrix the network's dtype gives
(eigenvalues clamped at 0); eigenvalues below the floor √size·eps·λ_max of that dtype, the typical
error of the matrix's own rounding, are not resolved by it. While c >= floor such an eigenvalue is used
as computed (its error is negligible against c); when c < floor the dtype cannot tell its direction
from rounding noise, and it is taken as exactly zero: its direction carries no data (a cut-off, as
least squares has; :func:`resolved`). The mean is solved in float64 in the basis of the smaller Gram —
α = Jᵀ [U diag(w) Uᵀ r] (one VJP) when N < p, α = Q diag(w) Qᵀ Jᵀr when p ≤ N, w = 1/(λ + c) — so
nothing is divided by a small λ and no roundoff is amplified by 1/c: a float32 parameter-space mean at
σ² = 1e-8 was off by a factor 690 when Jᵀr − QQᵀJᵀr, pure roundoff, was divided by c. Beyond dense
sizes the spectrum is the top Lanczos Ritz pairs of G and the mean is a CG solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from linear_operator.operators import LinearOperator
from linear_operator.utils.lanczos import lanczos_tridiag
from torch import Tensor

from ..distributed import global_rows
from ..functional import FunctionalNetwork
from ..inputs import Inputs, length
from ..lanczos import reorthogonalisation_tolerance
from ..operators.gram_operator import GramOperator
from ..operators.ntk_operator import NTKOperator
from ..validation import check_finite
from .solver import Solver
from .variance_projections import choose_path

__all__ = [
    "GramSpectrum",
    "dense_gram",
    "ntk_matrix",
    "gram_spectrum",
    "kernel_of_rows",
    "lanczos_spectrum",
    "ntk_eigh",
    "resolved",
    "resolved_eigh",
    "spectral_log_marginal_likelihood",
    "spectral_solve",
    "spectral_weights",
    "train_jacobian",
]


@dataclass
class GramSpectrum:
    """Eigenpairs of G = JᵀJ with eigenvalues above ``floor``: eigenvalues (r,) and orthonormal
    eigenvectors (p, r), in the network's dtype (the tangents of the variance).

    ``floor``: eigenvalues below it are not resolved by the network's dtype. For the dense spectra, all
    eigenpairs in float64, eigenvalues clamped at 0: ``ntk`` ((N,), (N, N)) when they came from the NTK
    (N < p, Q = Jᵀ U / √λ), ``gram`` ((p,), (p, p)) when from G itself (or from p Lanczos steps). Neither
    is set for a partial Lanczos spectrum: the mean then needs CG.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    floor: float = 0.0
    ntk: tuple[Tensor, Tensor] | None = None
    gram: tuple[Tensor, Tensor] | None = None


def _rank_floor(eigenvalues: Tensor, size: int, dtype: torch.dtype) -> float:
    """√size·eps·λ_max of ``dtype``: the typical error of the eigenvalues of a matrix rounded to it.

    (The worst-case bound size·eps·λ_max dropped real, accurately computed eigenvalues in float32: a
    quarter of a 120 × 120 NTK's; `tests/test_ntk_gp.py::test_float32_agrees_with_float64`.)
    """
    return size**0.5 * torch.finfo(dtype).eps * max(float(eigenvalues.abs().max()), 1e-300)


def resolved_eigh(matrix: Tensor) -> tuple[Tensor, Tensor, float]:
    """All eigenpairs of a symmetric PSD matrix given in the network's dtype, by eigh in float64.

    Returns eigenvalues (n,) float64 clamped at 0, eigenvectors (n, n) float64, and the floor of
    ``matrix``'s dtype below which eigenvalues are not resolved.
    """
    evals, evecs = torch.linalg.eigh(0.5 * (matrix + matrix.mT).double())
    return evals.clamp_min(0), evecs, _rank_floor(evals, matrix.shape[-1], matrix.dtype)


def train_jacobian(network: FunctionalNetwork, x: Inputs, num_outputs: int, budget: float | None) -> Tensor | None:
    """J(x) (N × p) from per-sample Jacobians when it fits ``budget`` bytes and
    :func:`~ntkgp.gp.variance_projections.choose_path` finds that cheaper than N products; None otherwise."""
    size = length(x) * num_outputs
    if budget is None or choose_path(network, x, num_outputs, size, "auto", budget) != "jacobians":
        return None
    return torch.cat(list(network.jacobian_chunks(x))).reshape(size, -1)


def dense_gram(network: FunctionalNetwork, x: Inputs, num_outputs: int, budget: float | None = None) -> Tensor:
    """G = J(x)ᵀ J(x) (p × p) in the network's dtype: Σ over chunks of per-sample Jacobians JcᵀJc where
    :func:`~ntkgp.gp.variance_projections.choose_path` finds them cheaper than p products and ``budget`` holds G beside
    a chunk, p Gram products otherwise (and when ``budget`` is None); over the ranks when x is a shard."""
    if budget is None or choose_path(network, x, num_outputs, network.num_params, "auto", budget) != "jacobians":
        return GramOperator.of(x, network=network).to_dense()
    gram = torch.zeros(network.num_params, network.num_params, dtype=network.dtype, device=network.device)
    for jac in network.jacobian_chunks(x):
        rows = jac.reshape(-1, network.num_params)
        gram = gram + rows.mT @ rows
    return network.sum_over_shards(x, gram)


def kernel_of_rows(jac: Tensor) -> Tensor:
    """J Jᵀ (N × N) of Jacobian rows J (N × p), checked finite."""
    return check_finite(
        jac @ jac.mT,
        "the NTK K(x, x) = J(x)J(x)ᵀ",
        f"the network's Jacobian at these inputs is too large for {jac.dtype}: rescale or normalise the inputs",
    )


def ntk_matrix(network: FunctionalNetwork, x: Inputs, num_outputs: int, budget: float | None = None) -> Tensor:
    """K(x, x) (N × N) in the network's dtype: J Jᵀ from :func:`train_jacobian` where it applies, N VJPs and N
    JVPs at x otherwise (and when ``budget`` is None)."""
    jac = train_jacobian(network, x, num_outputs, budget)
    if jac is not None:
        return kernel_of_rows(jac)
    return NTKOperator.of(x, x, network=network, num_outputs=num_outputs).to_dense()


def ntk_eigh(
    network: FunctionalNetwork, x: Inputs, num_outputs: int, budget: float | None = None
) -> tuple[Tensor, Tensor, float]:
    """:func:`resolved_eigh` of the dense NTK K(x, x) (N × N) (:func:`ntk_matrix`)."""
    return resolved_eigh(ntk_matrix(network, x, num_outputs, budget))


def gram_spectrum(
    network: FunctionalNetwork,
    x: Inputs,
    num_outputs: int,
    solver: Solver,
    max_dense_elements: int = 2**27,
    budget: float | None = None,
) -> GramSpectrum:
    """Spectrum of G = J(x)ᵀ J(x) (p × p).

    Exact by ``eigh`` of G when p <= N and p is dense-sized; exact through the NTK's eigenpairs
    (Q = Jᵀ U / √λ, one batched VJP) when N < p, N is dense-sized and Q (p × N) fits in
    ``max_dense_elements`` (and x is not a shard: the NTK needs every input); otherwise the top
    ``solver.lanczos_rank`` Ritz pairs of Lanczos on G. N counts the inputs of every rank when x is a shard.
    """
    p, big_n, dtype = network.num_params, global_rows(network, x) * num_outputs, network.dtype
    if p <= big_n and solver.dense(p):
        evals, evecs, floor = resolved_eigh(dense_gram(network, x, num_outputs, budget))
        keep = evals > floor
        return GramSpectrum(evals[keep].to(dtype), evecs[:, keep].to(dtype), floor=floor, gram=(evals, evecs))
    if big_n < p and solver.dense(big_n) and big_n * p <= max_dense_elements and not network.is_sharded(x):
        evals, evecs, floor = ntk_eigh(network, x, num_outputs, budget)
        keep = evals > floor
        cotangents = (evecs[:, keep] / evals[keep].sqrt()).mT.to(dtype).reshape(-1, length(x), num_outputs)
        return GramSpectrum(evals[keep].to(dtype), network.vjp(x, cotangents).mT, floor=floor, ntk=(evals, evecs))
    return lanczos_spectrum(GramOperator.of(x, network=network), solver.lanczos_rank)


def lanczos_spectrum(operator: LinearOperator, rank: int) -> GramSpectrum:
    """Top Ritz pairs of a symmetric PSD (p × p) operator after ``rank`` Lanczos steps (exact if rank >= p).

    The start vector is a fixed pseudo-random one, so the result is reproducible.
    """
    p = operator.shape[-1]
    rank = min(rank, p)
    generator = torch.Generator(device=operator.device).manual_seed(0)
    start = torch.randn(p, 1, generator=generator, dtype=operator.dtype, device=operator.device)
    q, t = lanczos_tridiag(
        operator._matmul,
        max_iter=rank,
        dtype=operator.dtype,
        device=operator.device,
        matrix_shape=operator.shape,
        tol=reorthogonalisation_tolerance(operator.dtype),
        init_vecs=start,
    )
    evals, s = torch.linalg.eigh(t)
    floor = _rank_floor(evals, p, operator.dtype)
    keep = evals > floor
    vectors = q @ s
    full = (evals.clamp_min(0).double(), vectors.double()) if q.shape[-1] == p else None  # a complete basis
    return GramSpectrum(evals[keep], vectors[:, keep], floor=floor, gram=full)


def resolved(eigenvalues: Tensor, c: Tensor, floor: float) -> Tensor:
    """Which eigenvalues (r,) count at regulariser c (any shape (..., 1)): those above ``floor``, and all
    of them while c >= floor (an error below the floor is then negligible against c). (..., r) booleans.

    The others are numerically zero: their directions are dropped. Kept with weight 1/c instead, a null
    direction turns the roundoff of a float32 Jacobian product into an error of eps·λ_max/c.
    """
    return (eigenvalues > floor) | (c >= floor)


def spectral_weights(eigenvalues: Tensor, c: Tensor, floor: float) -> Tensor:
    """w = 1/(λ + c) on the resolved directions (:func:`resolved`), 0 on the numerically zero ones: (r,)."""
    c = c.to(eigenvalues.dtype).reshape(1)
    return torch.where(resolved(eigenvalues, c, floor), 1.0 / (eigenvalues + c), 0.0)


def spectral_solve(eigenvalues: Tensor, eigenvectors: Tensor, rhs: Tensor, c: Tensor, floor: float) -> Tensor:
    """(matrix + cI)⁻¹ rhs from all eigenpairs of a PSD matrix, numerically zero directions dropped
    (:func:`spectral_weights`): rhs (n,) -> (n,), in the eigenvectors' dtype."""
    weights = spectral_weights(eigenvalues, c, floor)
    return eigenvectors @ (weights * (eigenvectors.mT @ rhs.to(eigenvectors.dtype)))


def spectral_log_marginal_likelihood(
    eigenvalues: Tensor,
    projected: Tensor,
    b_sq: Tensor,
    r_sq: Tensor,
    num_data: int,
    outputscale: Tensor,
    noise: Tensor,
    floor: float = 0.0,
) -> Tensor:
    """log N(r; 0, s² JJᵀ + σ² I) from the spectrum (Woodbury and the determinant lemma).

    Args:
        eigenvalues: λ (r,) >= 0; projected: Qᵀ Jᵀ r (r,) (equivalently √λ·Uᵀ r); b_sq: ‖Jᵀ r‖²;
        r_sq: ‖r‖²; num_data: N = n·C; outputscale: s²; noise: σ² (differentiable, any broadcastable
        shape (...) — e.g. a grid of hyperparameters); floor: eigenvalues below it are numerically zero
        where c = σ²/s² is below it too (:func:`resolved`): their λ and projections count as 0.
        Returns shape (...).
    """
    c = (noise / outputscale).unsqueeze(-1)
    keep = resolved(eigenvalues, c, floor)
    dropped = torch.where(keep, 0.0, projected.square()).sum(-1)
    eigenvalues, projected = torch.where(keep, eigenvalues, 0.0), torch.where(keep, projected, 0.0)
    b_sq = b_sq - dropped
    b_inv_b = (projected.square() / (eigenvalues + c)).sum(-1) + (b_sq - projected.square().sum(-1)) / c.squeeze(-1)
    quad = (r_sq - b_inv_b) / noise
    logdet = num_data * torch.log(noise) + torch.log1p(eigenvalues / c).sum(-1)
    return -0.5 * (quad + logdet + num_data * math.log(2 * math.pi))
