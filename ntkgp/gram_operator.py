"""The parameter-space twin of the NTK: G = J(X)ᵀ J(X), a lazy (p × p) LinearOperator.

G is the Gauss-Newton matrix of the squared loss (unit Gaussian noise). A product G V is one JVP
then one VJP at X per block of columns; peak memory O(n·C + p) per vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from .functional import FunctionalNetwork, as_functional_network, map_blocks
from .validation import check_inputs

__all__ = ["GramOperator", "gram_operator"]


class GramOperator(LinearOperator):
    """G = J(X)ᵀ J(X) over inputs x (n, ...) for a :class:`FunctionalNetwork` (keyword ``network``).

    Subclasses that put an output-space matrix between the Jacobians (the Fisher) pass their own
    keyword arguments through ``**kwargs`` and override ``_matmul`` and ``_diagonal``.
    """

    def __init__(self, x: Tensor, *, network: FunctionalNetwork, **kwargs):
        super().__init__(x, network=network, **kwargs)
        self.x = x
        self.network = network

    def _size(self) -> torch.Size:
        p = self.network.num_params
        return torch.Size([p, p])

    def _transpose_nonbatch(self) -> GramOperator:
        return self

    def _matmul(self, rhs: Tensor) -> Tensor:
        net = self.network
        if rhs.dim() == 1:
            return self._matmul(rhs.unsqueeze(-1)).squeeze(-1)
        cols = rhs.mT.reshape(-1, net.num_params)
        out = map_blocks(lambda v: net.vjp(self.x, net.jvp(self.x, v)), cols, net.chunk_size)
        return out.reshape(*rhs.shape[:-2], rhs.shape[-1], -1).mT

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._matmul(rhs)

    def _diagonal(self) -> Tensor:
        """Exact diagonal Σ_{i,c} J[i,c,j]² (p,), from per-sample Jacobians in chunks."""
        diag = torch.zeros(self.network.num_params, dtype=self.dtype, device=self.device)
        for jac in self.network.jacobian_chunks(self.x):
            diag = diag + (jac * jac).sum((0, 1))
        return diag

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        """Entries G[row_index, col_index] from the needed rows G e_j = Jᵀ(J e_j)."""
        row_index, col_index = torch.broadcast_tensors(row_index, col_index)
        rows, row_pos = torch.unique(row_index, return_inverse=True)
        onehot = torch.zeros(len(rows), self.network.num_params, dtype=self.dtype, device=self.device)
        onehot[torch.arange(len(rows), device=self.device), rows] = 1
        return self._matmul(onehot.mT).mT[row_pos, col_index]


def gram_operator(model: nn.Module | FunctionalNetwork, x: Tensor, params: Sequence[str] | None = None,
                  chunk_size: int = 32) -> GramOperator:
    """The (p × p) operator J(x)ᵀ J(x) of ``model`` on inputs x (n, ...); ``params`` as in :func:`ntk_operator`."""
    network = as_functional_network(model, params, chunk_size)
    check_inputs(x, network.dtype, "x")
    network.num_outputs(x)
    return GramOperator(x, network=network)
