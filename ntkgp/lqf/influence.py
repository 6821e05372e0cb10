"""The paper's approximate influence of a training sample (LQF eq. 8), with K-FAC for the inverse curvature.

The exact influence of removing sample i from the linear-quadratic model is a rank-C downdate of the
function-space solve (:class:`~ntkgp.lqf.kernel_system.KernelSystem`). In parameter space it reads
f(x*) − f_{−i}(x*) = g* A⁻¹ g_iᵀ (I − g_i A⁻¹ g_iᵀ)⁻¹ e_i, A = JᵀJ + (λ/2)I, e_i = targets_i − f_lin(x_i), g_i the
C × p Jacobian of sample i. Eq. (8) approximates it, for a loss averaged over the N samples, by
(1 − α_i/(N − 1 + α_i)) e_i g* (F + λI)⁻¹ g_iᵀ with α_i = g_i (F + λI)⁻¹ g_iᵀ. Transcribed to our summed objective
((F + λI) → A/N, so α_i → N·g_i A⁻¹ g_iᵀ, the e_i/N and N cancel) and in C × C blocks:

    f(x*) − f_{−i}(x*) ≈ g* Â⁻¹ g_iᵀ · (N − 1)((N − 1)I + N Ĥ_i)⁻¹ e_i,   Ĥ_i = g_i Â⁻¹ g_iᵀ,

with Â⁻¹ = 2(K + λI)⁻¹ from the K-FAC preconditioner (K ≈ 2JᵀJ). The exact factor for removing i is
(I − H_i)⁻¹ (Sherman–Morrison); eq. (8)'s, which tends to (I + Ĥ_i)⁻¹, damps where that amplifies. Measured on
a tanh MLP, 16 inputs × 3 classes, against refits (tests/test_lqf.py prints it): eq. (8) is 0.59 off with
K-FAC and 0.67 with the exact inverse; (I − H_i)⁻¹ with the exact inverse is exact (to rounding) but with K-FAC's
it diverged (K-FAC leverages up to 1.94 > 1: 20× off); no factor at all was 0.38 (K-FAC) / 0.52 (exact).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import FunctionalNetwork
from ..inputs import Inputs, length
from .kfac import KFACPreconditioner

__all__ = ["kfac_influence"]


def kfac_influence(
    network: FunctionalNetwork, train_x: Inputs, x_test: Inputs, residual: Tensor, preconditioner: KFACPreconditioner
) -> Tensor:
    """Eq. (8) for every training sample: (m, n, C) from per-sample Jacobians (train (n, C, p) and test
    (m, C, p), in chunks) and ``residual`` e (n, C) = targets − f_lin(train_x). Holds one (n, p) matrix."""
    n = length(train_x)
    weighted = []  # per training sample i: the p-vector Â⁻¹ g_iᵀ F_i e_i
    with torch.no_grad():
        start = 0
        for jac in network.jacobian_chunks(train_x):  # (b, C, p)
            b, k, p = jac.shape
            scaled = 2 * (preconditioner @ jac.reshape(b * k, p).mT).mT.reshape(b, k, p)  # Â⁻¹ g_iᵀ, as rows
            leverage = jac @ scaled.mT  # Ĥ_i (b, C, C)
            eye = torch.eye(k, dtype=jac.dtype, device=jac.device)
            factor = (n - 1) * torch.linalg.solve((n - 1) * eye + n * leverage, residual[start : start + b, :, None])
            weighted.append(torch.einsum("bcp,bc->bp", scaled, factor.squeeze(-1)))
            start += b
        rows = torch.cat(weighted)  # (n, p)
        return torch.cat([torch.einsum("mcp,np->mnc", jac, rows) for jac in network.jacobian_chunks(x_test)])
