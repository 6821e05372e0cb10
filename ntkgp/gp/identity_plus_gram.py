"""M = I + W Wᵀ (rows × rows), factored so that it is positive definite by construction at any W.

In exact arithmetic every eigenvalue of M is ≥ 1. Formed in floating point, M = I + WWᵀ carries an absolute error
of about ε‖WWᵀ‖ in every eigenvalue, so once ‖WWᵀ‖ nears 1/ε (1e16 in float64, e.g. a kernel scale of 1e13 against
a noise of 1e-6, which an L-BFGS line search does try) the unit part is lost: its Cholesky fails, or, worse, succeeds
with a wrong log determinant. The factor is therefore

- the Cholesky factor of the formed M while rows·ε·‖WWᵀ‖ ≤ :data:`ACCURACY` (its log determinant is then right to
  about that many nats), else
- the R of the QR decomposition of A = [I; Wᵀ] ((rows + r) × rows), M = AᵀA = RᵀR: Householder QR perturbs A by
  about ε‖A‖ = ε‖M‖^½, so σ_min(A) ≥ 1 keeps RᵀR positive definite and accurate for any W a float64 holds.

A symmetric matrix given in a lower precision (a float32 network's kernel) may have slightly negative eigenvalues;
:func:`psd_root` turns it into a root W of its resolved part first, so that the sum is positive semi-definite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .parameter_space import resolved_eigh

__all__ = ["ACCURACY", "PSDRoot", "identity_plus_factor", "log_determinant", "psd_root"]

#: rows·ε·‖WWᵀ‖ up to which the formed M is factored by Cholesky (the log determinant's error in nats, about).
ACCURACY = 1e-6


@dataclass
class PSDRoot:
    """A symmetric positive semi-definite matrix (n × n, float64) with a root (n × r, float64): matrix = root rootᵀ,
    and its largest eigenvalue ``top``."""

    matrix: Tensor
    root: Tensor
    top: float


def psd_root(matrix: Tensor) -> PSDRoot:
    """The resolved positive semi-definite part of a symmetric ``matrix`` (n × n) given in its dtype: eigenpairs by
    float64 eigh, eigenvalues below the dtype's resolution floor (:func:`~ntkgp.gp.parameter_space.resolved_eigh`,
    √n·ε·λ_max: rounding noise, negative ones included) dropped."""
    evals, evecs, floor = resolved_eigh(matrix)
    keep = evals > floor
    root = evecs[:, keep] * evals[keep].sqrt()
    return PSDRoot(root @ root.mT, root, float(evals.max()) if evals.numel() else 0.0)


def identity_plus_factor(gram: Tensor, root: Callable[[], Tensor], norm: float) -> Tensor:
    """A lower-triangular L (rows × rows, float64) with L Lᵀ = I + gram, where gram = W Wᵀ (rows × rows, float64)
    and W = ``root()`` (rows × r, computed only when needed); ``norm`` ≥ ‖gram‖₂. Differentiable in gram and W.

    L's diagonal may be negative on the QR path: the log determinant is 2 Σ log|L_ii| and ``torch.cholesky_solve``
    solves with it as it is.
    """
    rows = gram.shape[-1]
    eye = torch.eye(rows, dtype=gram.dtype, device=gram.device)
    if rows * torch.finfo(gram.dtype).eps * norm <= ACCURACY:
        factor, info = torch.linalg.cholesky_ex(gram + eye)
        if int(info) == 0:
            return factor
    w = root()
    return torch.linalg.qr(torch.cat([eye, w.mT]), mode="reduced")[1].mT


def log_determinant(factor: Tensor) -> Tensor:
    """log det(L Lᵀ) for a triangular factor L of :func:`identity_plus_factor`."""
    return 2 * factor.diagonal().abs().log().sum()
