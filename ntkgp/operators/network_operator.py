"""What the operators built on a network share: one matrix of the network, optionally repeated over a batch.

An operator of :mod:`ntkgp` represents a single matrix (the NTK, the Gram or Fisher matrix, a posterior
covariance) computed from a :class:`~ntkgp.functional.FunctionalNetwork`. linear_operator and GPyTorch
also ask operators for batches (``expand``, ``unsqueeze``, broadcasting ``+``, ``cat_rows``): here a batch
is the same matrix repeated over ``batch_shape``, a keyword, so the network inputs stay (n, ...) whatever
the batch and every product is computed once and broadcast. ``.to(...)``, ``.double()``, ``.cpu()`` convert
the network together with the inputs (linear_operator converts every keyword that has those methods).

Inputs (:mod:`ntkgp.inputs`: a tensor, a tuple of tensors, a mapping) are held as their tensors, the operator's
positional arguments (linear_operator's representation must be tensors), with their ``layouts`` as a keyword;
:meth:`NetworkOperator.of` builds an operator from batches of inputs. The operator's dtype and device are the
network's (token ids are integer); a conversion changes the floating inputs' dtype only.

Subclasses implement the matrix: ``_matrix_shape``, ``_matmul_matrix`` (rhs (N2, k) -> (N1, k)) and,
where they can do better than the defaults, ``_t_matmul_matrix``, ``_diagonal_matrix`` and ``_entries``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from ..functional import FunctionalNetwork
from ..inputs import Inputs, Layout, layout, leaves
from ..validation import check_precision

__all__ = ["NetworkOperator", "group_batches"]


def _index_length(index: Any, size: int) -> int | None:
    """How many positions ``index`` (an int, slice or tensor) selects from range(size); raise IndexError if
    an int or tensor entry is out of range."""
    if isinstance(index, bool):
        raise IndexError(f"boolean index {index} is not supported; use integer indices")
    if isinstance(index, int):
        if not -size <= index < size:
            raise IndexError(f"index {index} is out of range for a dimension of size {size}")
        return 1
    if isinstance(index, slice):
        return len(range(*index.indices(size)))
    if isinstance(index, Tensor) and index.numel():
        if index.dtype == torch.bool:
            return int(index.sum())
        low, high = int(index.min()), int(index.max())
        if low < -size or high >= size:
            raise IndexError(f"index {high if high >= size else low} is out of range for a dimension of size {size}")
    return None


def group_batches(tensors: Sequence[Tensor], layouts: Sequence[Layout] | None) -> list[Inputs]:
    """The batches of inputs that ``tensors`` hold, grouped by ``layouts`` (None: one tensor each)."""
    if layouts is None:
        return list(tensors)
    batches, start = [], 0
    for held in layouts:
        batches.append(held.build(tensors[start : start + held.size]))
        start += held.size
    return batches


class NetworkOperator(LinearOperator):
    """A LinearOperator of a :class:`FunctionalNetwork` (keyword ``network``), repeated over ``batch_shape``.

    Positional arguments: the tensors of the operator's batches of inputs, in order; ``layouts`` (keyword) says how
    they group into batches (default: each tensor is one batch), held in ``self.batches``.
    ``_derived``: keywords computed from the network and the inputs (a cached forward pass); a conversion
    recomputes them in the new dtype instead of rounding the old values.
    """

    _derived: tuple[str, ...] = ()

    @classmethod
    def of(cls, *batches: Inputs, **kwargs: Any) -> Any:
        """The operator of these batches of inputs (each a tensor, a tuple of tensors or a mapping)."""
        tensors = [t for batch in batches for t in leaves(batch)]
        return cls(*tensors, layouts=tuple(layout(batch) for batch in batches), **kwargs)

    def __init__(
        self,
        *args: Any,
        network: FunctionalNetwork,
        batch_shape: torch.Size | tuple[int, ...] = (),
        layouts: tuple[Layout, ...] | None = None,
        **kwargs: Any,
    ):
        if not isinstance(network, FunctionalNetwork):
            raise TypeError(
                f"network must be a FunctionalNetwork (ntkgp.FunctionalNetwork(model)), got "
                f"{type(network).__name__}; or build the operator with ntk_operator / gram_operator / "
                "fisher_operator, which take the module"
            )
        batch_shape = torch.Size(batch_shape)
        layouts = tuple(Layout("tensor", ()) for _ in args) if layouts is None else layouts
        super().__init__(*args, network=network, batch_shape=batch_shape, layouts=layouts, **kwargs)
        self.network = network
        self._batch = batch_shape
        self.batches = group_batches(args, layouts)

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    @property
    def device(self) -> torch.device:
        return self.network.device

    # --- the matrix: subclasses ------------------------------------------------------------------------
    def _matrix_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _matmul_matrix(self, rhs: Tensor) -> Tensor:
        """A @ rhs for rhs (N2, k), k >= 1 -> (N1, k)."""
        raise NotImplementedError

    def _t_matmul_matrix(self, rhs: Tensor) -> Tensor:
        """Aᵀ @ rhs (N1, k) -> (N2, k); the operator's own product for a symmetric matrix."""
        return self._matmul_matrix(rhs)

    def _entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        """A[rows, cols] for 1-d index tensors of equal length, from products with the needed unit columns."""
        cols_needed, col_pos = torch.unique(cols, return_inverse=True)
        unit = torch.zeros(self._matrix_shape()[1], len(cols_needed), dtype=self.dtype, device=self.device)
        unit[cols_needed, torch.arange(len(cols_needed), device=self.device)] = 1
        return self._matmul_matrix(unit)[rows, col_pos]

    def _diagonal_matrix(self) -> Tensor:
        positions = torch.arange(self._matrix_shape()[0], device=self.device)
        return self._entries(positions, positions)

    def _getitem_matrix(self, row_index: Any, col_index: Any) -> LinearOperator:
        """A sub-block of the (unbatched) matrix; by default linear_operator's interpolation."""
        return super()._getitem(row_index, col_index)

    def _rebuild(self, **changes: Any) -> NetworkOperator:
        """The same operator with some keywords changed (the batch shape, for example)."""
        return self.__class__(*self._args, **{**self._kwargs, **changes})

    # --- conversions: linear_operator converts the network keyword too (it has .to, .double, …) -----------
    def _recompute_derived(self, converted: NetworkOperator) -> NetworkOperator:
        return converted._rebuild(**{name: None for name in self._derived}) if self._derived else converted

    def to(self, *args: Any, **kwargs: Any) -> NetworkOperator:
        """The operator converted like ``Tensor.to``: the network and the floating tensors (inputs, keywords) to the
        dtype, everything to the device; integer inputs (token ids) keep their dtype."""
        device, dtype = torch._C._nn._parse_to(*args, **kwargs)[:2]
        if dtype is not None:
            check_precision(dtype, "dtype")

        def convert(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            return value.to(device=device, dtype=dtype) if hasattr(value, "to") else value

        converted = self.__class__(
            *[convert(a) for a in self._args], **{name: convert(value) for name, value in self._kwargs.items()}
        )
        return self._recompute_derived(converted)

    def type(self, dtype: torch.dtype) -> NetworkOperator:
        """Conversion to ``dtype`` (``.half()`` comes here: half precision raises a TypeError)."""
        check_precision(dtype, "dtype")
        return self._recompute_derived(super().type(dtype))

    def cpu(self) -> NetworkOperator:
        return self._recompute_derived(super().cpu())

    def cuda(self, device_id: str | None = None) -> NetworkOperator:
        return self._recompute_derived(super().cuda(device_id))

    # --- LinearOperator interface --------------------------------------------------------------------
    def _size(self) -> torch.Size:
        return self._batch + torch.Size(self._matrix_shape())

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _broadcast(self, product: Callable[[Tensor], Tensor], out_rows: int, rhs: Tensor) -> Tensor:
        """``product`` (2-d, unbatched, ``out_rows`` rows out) applied to rhs (N,), (N, k) or (..., N, k),
        broadcast over the batch."""
        if rhs.dtype != self.dtype:
            raise TypeError(
                f"the right-hand side has dtype {rhs.dtype} but the operator is {self.dtype}: convert one of them"
            )
        if rhs.dim() == 1:
            return self._broadcast(product, out_rows, rhs.unsqueeze(-1)).squeeze(-1)
        rhs_batch, (rows, k) = rhs.shape[:-2], rhs.shape[-2:]
        batch = torch.broadcast_shapes(self._batch, rhs_batch)
        if rhs.numel() == 0:
            return rhs.new_zeros(*batch, out_rows, k)
        cols = rhs.movedim(-2, 0).reshape(rows, -1)  # every batch member's columns side by side
        out = product(cols).reshape(out_rows, *rhs_batch, k).movedim(0, -2)
        return out.expand(*batch, out_rows, k)

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self._broadcast(self._matmul_matrix, self._matrix_shape()[0], rhs)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._broadcast(self._t_matmul_matrix, self._matrix_shape()[1], rhs)

    def _diagonal(self) -> Tensor:
        rows, cols = self._matrix_shape()
        if rows != cols:
            raise RuntimeError(f"the diagonal of a non-square operator {tuple(self.shape)} is not defined")
        return self._diagonal_matrix().expand(*self._batch, rows)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        """Entries: every batch member is the same matrix, so the batch indices only shape the result."""
        shape = torch.broadcast_shapes(row_index.shape, col_index.shape, *(i.shape for i in batch_indices))
        rows, cols = (i.expand(shape).reshape(-1) for i in (row_index, col_index))
        return self._entries(rows, cols).reshape(shape)

    def _getitem(self, row_index: Any, col_index: Any, *batch_indices: Any) -> LinearOperator:
        if batch_indices:
            batch = torch.zeros((), device="cpu").expand(self._batch)[tuple(batch_indices)].shape
            return self._rebuild(batch_shape=batch)._getitem(row_index, col_index)
        return self._getitem_matrix(row_index, col_index)

    def _expand_batch(self, batch_shape: torch.Size | tuple[int, ...]) -> NetworkOperator:
        sizes = list(batch_shape)
        current = [1] * (len(sizes) - len(self._batch)) + list(self._batch)
        if len(current) != len(sizes):
            raise RuntimeError(f"cannot expand an operator of batch shape {tuple(self._batch)} to {tuple(sizes)}")
        for i, (new, old) in enumerate(zip(sizes, current)):
            if new == -1:
                sizes[i] = old
            elif old not in (1, new):
                raise RuntimeError(
                    f"cannot expand an operator of batch shape {tuple(self._batch)} to "
                    f"{tuple(sizes)}: dimension {i} has size {old}"
                )
        return self._rebuild(batch_shape=torch.Size(sizes))

    def _unsqueeze_batch(self, dim: int) -> NetworkOperator:
        batch = list(self._batch)
        batch.insert(dim, 1)
        return self._rebuild(batch_shape=torch.Size(batch))

    def _permute_batch(self, *dims: int) -> NetworkOperator:
        return self._rebuild(batch_shape=torch.Size([self._batch[d] for d in dims]))

    def __getitem__(self, index: Any) -> LinearOperator | Tensor:
        """linear_operator's indexing, after a check that every int or tensor index is in range (an out-of-range
        index raises IndexError here, not an arithmetic error deep inside) and selects something."""
        parts = index if isinstance(index, tuple) else (index,)
        if Ellipsis in parts:
            at = parts.index(Ellipsis)
            parts = parts[:at] + (slice(None),) * (self.dim() - len(parts) + 1) + parts[at + 1 :]
        if len(parts) > self.dim():
            raise IndexError(f"too many indices ({len(parts)}) for an operator of shape {tuple(self.shape)}")
        normalised = []
        for dim, part in enumerate(parts):
            if isinstance(part, list):
                part = torch.tensor(part)
            if _index_length(part, self.shape[dim]) == 0:
                raise IndexError(
                    f"index {part} selects nothing from dimension {dim} (size {self.shape[dim]}) of an "
                    f"operator of shape {tuple(self.shape)}"
                )
            if isinstance(part, int) and part < 0:  # linear_operator turns K[-1] into the empty slice [-1:0]
                part += self.shape[dim]
            normalised.append(part)
        return super().__getitem__(tuple(normalised))
