"""The parameter-space twin of the NTK: G = J(X)ᵀ J(X), a lazy (p × p) LinearOperator.

G is the Gauss-Newton matrix of the squared loss (unit Gaussian noise). A product G V is one JVP
then one VJP at X per block of columns; peak memory O(n·C + p) per vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import FunctionalNetwork, as_functional_network, map_blocks
from ..inputs import Inputs, check_inputs
from .network_operator import NetworkOperator

__all__ = ["GramOperator", "gram_operator"]


class GramOperator(NetworkOperator):
    """G = J(X)ᵀ J(X) over n inputs x for a :class:`FunctionalNetwork` (keyword ``network``): ``GramOperator(x, ...)``
    with a tensor, ``GramOperator.of(x, ...)`` with any inputs (:mod:`ntkgp.inputs`).

    Subclasses that put an output-space matrix between the Jacobians (the Fisher) pass their own
    keyword arguments through ``**kwargs`` and override ``_product`` and ``_diagonal_matrix``.
    """

    def __init__(
        self,
        *tensors: Tensor,
        network: FunctionalNetwork,
        batch_shape: torch.Size | tuple[int, ...] = (),
        **kwargs: Any,
    ):
        super().__init__(*tensors, network=network, batch_shape=batch_shape, **kwargs)
        (self.x,) = self.batches

    def _matrix_shape(self) -> tuple[int, int]:
        p = self.network.num_params
        return p, p

    def _product(self, v: Tensor) -> Tensor:
        """G v for v (k, p) -> (k, p)."""
        return self.network.vjp(self.x, self.network.jvp(self.x, v))

    def _matmul_matrix(self, rhs: Tensor) -> Tensor:
        return map_blocks(self._product, rhs.mT, self.network.chunk_size).mT

    def _diagonal_matrix(self) -> Tensor:
        """Exact diagonal Σ_{i,c} J[i,c,j]² (p,), from per-sample Jacobians in chunks."""
        diag = torch.zeros(self.network.num_params, dtype=self.dtype, device=self.device)
        for jac in self.network.jacobian_chunks(self.x):
            diag = diag + (jac * jac).sum((0, 1))
        return self.network.sum_over_shards(self.x, diag)  # over the ranks too when x is a shard


def gram_operator(
    model: nn.Module | FunctionalNetwork,
    x: Inputs,
    params: Sequence[str] | str | None = None,
    chunk_size: int | None = None,
) -> GramOperator:
    """The (p × p) operator J(x)ᵀ J(x) of ``model`` on n inputs x (:mod:`ntkgp.inputs`); ``params``, ``chunk_size``
    as in :func:`ntkgp.ntk_operator`."""
    network = as_functional_network(model, params, chunk_size)
    x = check_inputs(x, network.dtype, "x", network.device)
    network.num_outputs(x)
    return GramOperator.of(x, network=network)
