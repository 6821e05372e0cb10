"""The function-space system of LQF's closed form: A = K(X, X) + cI (N × N, N = n·C, c = λ/2) and a = A⁻¹r,
held as a float64 Cholesky factor that grows by bordering when data are added.

The LQF minimiser is θ* − θ0 = Jᵀa (one VJP), the NTK-GP posterior mean for targets αY with σ²/s² = c
(GUIDE §1). Adding inputs appends their N' rows: with B = K(X, X'), D = K(X', X') + cI,
L' = [[L, 0], [(L⁻¹B)ᵀ, chol(D − (L⁻¹B)ᵀ(L⁻¹B))]] — O(N²N') work, not a refactorisation (O((N + N')³)).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KernelSystem"]


def _cholesky(matrix: Tensor, what: str) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(0.5 * (matrix + matrix.mT))
    if int(info) != 0:
        raise FloatingPointError(
            f"{what} is numerically singular (its Cholesky factorisation failed at row "
            f"{int(info)}): repeated inputs with a weight decay below what the network's dtype "
            "resolves; raise weight_decay, remove duplicate inputs, or use float64"
        )
    return factor


class KernelSystem:
    """A = K + cI and a = A⁻¹ r in float64, for K (N × N) and residuals r (N,) interleaved (row i·C + c)."""

    def __init__(self, kernel: Tensor, residual: Tensor, c: float, num_outputs: int):
        self.c, self.num_outputs = float(c), num_outputs
        eye = torch.eye(kernel.shape[-1], dtype=torch.float64, device=kernel.device)
        self.factor = _cholesky(kernel.double() + self.c * eye, "K(X, X) + (λ/2)I")
        self.residual = residual.double()
        self.solution = torch.cholesky_solve(self.residual.unsqueeze(-1), self.factor).squeeze(-1)

    @property
    def size(self) -> int:
        return self.factor.shape[-1]

    def add(self, cross: Tensor, kernel: Tensor, residual: Tensor) -> None:
        """Border the system with N' new rows: ``cross`` = K(X, X') (N × N'), ``kernel`` = K(X', X') (N' × N'),
        ``residual`` (N',) of the new points."""
        w = torch.linalg.solve_triangular(self.factor, cross.double(), upper=False)  # L⁻¹B (N × N')
        eye = torch.eye(kernel.shape[-1], dtype=torch.float64, device=kernel.device)
        corner = _cholesky(kernel.double() + self.c * eye - w.mT @ w, "the bordered K(X, X) + (λ/2)I")
        top = torch.cat([self.factor, torch.zeros_like(w)], dim=-1)
        self.factor = torch.cat([top, torch.cat([w.mT, corner], dim=-1)], dim=-2)
        self.residual = torch.cat([self.residual, residual.double()])
        self.solution = torch.cholesky_solve(self.residual.unsqueeze(-1), self.factor).squeeze(-1)

    def inverse(self) -> Tensor:
        """A⁻¹ (N × N)."""
        return torch.cholesky_inverse(self.factor)

    def blocks(self, matrix: Tensor) -> Tensor:
        """The C × C diagonal blocks (n, C, C) of an (N × N) matrix."""
        n, k = self.size // self.num_outputs, self.num_outputs
        return matrix.reshape(n, k, n, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)

    def leave_one_out_residuals(self, inverse: Tensor | None = None) -> Tensor:
        """r_{−i} = B_i⁻¹ a_i (n, C): the residual at input i of the solution without i, B_i the C × C diagonal
        block of A⁻¹ (Rasmussen & Williams §5.4.2, in block form). ``inverse``: A⁻¹ if already at hand."""
        a = self.solution.reshape(-1, self.num_outputs, 1)
        inverse = self.inverse() if inverse is None else inverse
        return torch.linalg.solve(self.blocks(inverse), a).squeeze(-1)

    def downdate_directions(self) -> Tensor:
        """V (N × n) with column i = A⁻¹[:, block i] B_i⁻¹ a_i: removing input i changes a to a − V[:, i]
        (zero at block i), so a prediction K(x*, X) a changes by K(x*, X) V[:, i]."""
        inverse = self.inverse()
        n, k = self.size // self.num_outputs, self.num_outputs
        coefficients = self.leave_one_out_residuals(inverse)  # (n, C) = B_i⁻¹ a_i
        columns = inverse.reshape(self.size, n, k)  # [:, i, :] = A⁻¹[:, block i]
        return torch.einsum("Nik,ik->Ni", columns, coefficients)
