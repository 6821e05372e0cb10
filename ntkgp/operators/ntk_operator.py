"""The finite NTK K(X1, X2) = J(X1) J(X2)ᵀ as a lazy LinearOperator of shape (n1·C, n2·C).

Rows are interleaved: row i·C + c is output c of input i. A product K V is one VJP at X2 then one
JVP at X1 per block of columns; no Jacobian of the data set is ever formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn

from ..functional import FunctionalNetwork, as_functional_network, map_blocks
from ..inputs import Inputs, check_inputs, inputs_at, length, same, structure
from .network_operator import NetworkOperator

__all__ = ["NTKOperator", "ntk_operator"]


def _as_index_tensor(index: Any, size: int, device: torch.device) -> Tensor:
    """A slice or tensor index into range(size) as a long tensor of positions."""
    return torch.arange(size, device=device)[index]


class NTKOperator(NetworkOperator):
    """K(X1, X2) = J(X1) J(X2)ᵀ for a :class:`FunctionalNetwork` with C outputs.

    ``NTKOperator(x1, x2, network=..., num_outputs=...)`` with tensors, or ``NTKOperator.of(x1, x2, ...)`` with any
    inputs (:mod:`ntkgp.inputs`).

    Args:
        *tensors: the tensors of x1 and x2 (n1 and n2 inputs; the same inputs for the symmetric K(X, X)).
        network: the functional network (keyword).
        num_outputs: C (keyword).
        batch_shape: the matrix repeated over these batch dimensions (keyword, default none).
        layouts: how the positional tensors group into x1 and x2 (keyword; :meth:`of` sets it).
    """

    def __init__(
        self,
        *tensors: Tensor,
        network: FunctionalNetwork,
        num_outputs: int,
        batch_shape: torch.Size | tuple[int, ...] = (),
        layouts: Any = None,
    ):
        super().__init__(*tensors, network=network, num_outputs=num_outputs, batch_shape=batch_shape, layouts=layouts)
        self.x1, self.x2 = self.batches
        self.num_outputs = num_outputs

    def _matrix_shape(self) -> tuple[int, int]:
        c = self.num_outputs
        return length(self.x1) * c, length(self.x2) * c

    def _transpose_nonbatch(self) -> NTKOperator:
        return NTKOperator.of(
            self.x2, self.x1, network=self.network, num_outputs=self.num_outputs, batch_shape=self._batch
        )

    def _product(self, left: Inputs, right: Inputs, rhs: Tensor) -> Tensor:
        """J(left) J(right)ᵀ rhs for rhs (n_right·C, k) -> (n_left·C, k)."""
        net = self.network
        cols = rhs.mT.reshape(-1, length(right), self.num_outputs)

        def block(u: Tensor) -> Tensor:
            return net.jvp(left, net.vjp(right, u)).reshape(u.shape[0], -1)

        return map_blocks(block, cols, net.chunk_size).mT

    def _matmul_matrix(self, rhs: Tensor) -> Tensor:
        return self._product(self.x1, self.x2, rhs)

    def _t_matmul_matrix(self, rhs: Tensor) -> Tensor:
        return self._product(self.x2, self.x1, rhs)

    def _diagonal_matrix(self) -> Tensor:
        """Exact diagonal ⟨J1[i,c], J2[i,c]⟩ (n·C,), from per-sample Jacobians in chunks."""
        net = self.network
        if same(self.x1, self.x2):
            parts = [(j * j).sum(-1) for j in net.jacobian_chunks(self.x1)]
        else:
            parts = [(a * b).sum(-1) for a, b in zip(net.jacobian_chunks(self.x1), net.jacobian_chunks(self.x2))]
        return torch.cat(parts).reshape(-1)

    def _entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Entries K[rows, cols]: Jacobian rows of the needed rows (VJP), pushed to the needed columns (JVP)."""
        c, net = self.num_outputs, self.network
        rows_needed, row_pos = torch.unique(rows, return_inverse=True)
        row_inputs, row_input_pos = torch.unique(rows_needed // c, return_inverse=True)
        col_inputs, col_input_pos = torch.unique(cols // c, return_inverse=True)
        onehot = torch.zeros(len(rows_needed), len(row_inputs), c, dtype=self.dtype, device=self.device)
        onehot[torch.arange(len(rows_needed), device=self.device), row_input_pos, rows_needed % c] = 1
        x_rows, x_cols = inputs_at(self.x1, row_inputs), inputs_at(self.x2, col_inputs)

        def block(u: Tensor) -> Tensor:
            return net.jvp(x_cols, net.vjp(x_rows, u))

        krows = map_blocks(block, onehot, net.chunk_size)  # (rows, n_cols, C)
        return krows[row_pos, col_input_pos, cols % c]

    def _getitem_matrix(self, row_index: Any, col_index: Any) -> LinearOperator:
        """Sub-blocks that select whole inputs stay NTK operators; other index patterns interpolate."""
        c = self.num_outputs
        rows = _as_index_tensor(row_index, self.shape[-2], self.device)
        cols = _as_index_tensor(col_index, self.shape[-1], self.device)
        whole = [_whole_inputs(ids, c) for ids in (rows, cols)]
        if whole[0] is None or whole[1] is None:
            return super()._getitem_matrix(row_index, col_index)
        return NTKOperator.of(
            inputs_at(self.x1, whole[0]),
            inputs_at(self.x2, whole[1]),
            network=self.network,
            num_outputs=c,
            batch_shape=self._batch,
        )


def _whole_inputs(ids: Tensor, c: int) -> Tensor | None:
    """Inputs selected by row ids if they are whole interleaved groups [i·C, ..., i·C + C − 1], else None."""
    if ids.dim() != 1 or ids.numel() % c:
        return None
    groups = ids.reshape(-1, c)
    inputs = groups[:, 0] // c
    expected = inputs.unsqueeze(-1) * c + torch.arange(c, device=ids.device)
    return inputs if torch.equal(groups, expected) else None


def ntk_operator(
    model: nn.Module | FunctionalNetwork,
    x1: Inputs,
    x2: Inputs | None = None,
    params: Sequence[str] | str | None = None,
    chunk_size: int | None = None,
) -> NTKOperator:
    """The finite NTK of ``model`` between n1 inputs x1 and n2 inputs x2 (default x1): shape (n1·C, n2·C).

    Inputs are a tensor (n, ...) — floating, or integer token ids — a tuple of tensors (``model(*x)``) or a mapping
    such as a HuggingFace ``BatchEncoding`` (``model(**x)``); x2 must have x1's structure.

    ``params`` selects the parameters to linearise in (names or module prefixes, default all with
    ``requires_grad``); ``chunk_size`` bounds how many vectors go through the network at once (default 32;
    both belong to the snapshot, so leave them None when ``model`` is a FunctionalNetwork).
    """
    network = as_functional_network(model, params, chunk_size)
    x1 = check_inputs(x1, network.dtype, "x1", network.device)
    if x2 is None:
        x2 = x1
    else:
        x2 = check_inputs(x2, network.dtype, "x2", network.device, like=structure(x1), of="x1")
    return NTKOperator.of(x1, x2, network=network, num_outputs=network.num_outputs(x1))
