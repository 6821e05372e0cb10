"""Batched products, checked: ``vmap`` over vectors or inputs, compared once with one-at-a-time products.

Some ops have a wrong batching rule (``torch.cdist``'s backward on torch 2.13/2.14), some none at all (``aten::lstm``,
GRU), and some networks branch in Python on their inputs' values (HuggingFace's attention-mask code), which neither
vmap nor tracing can follow. The first batched use of each product is checked against plain calls; where it
disagrees or raises, that product runs one vector (or input) at a time from then on, after one warning.
"""

from __future__ import annotations

import builtins
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import vmap

from ..validation import in_transform
from .snapshot import Snapshot

__all__ = ["BATCHING_ERRORS", "CheckedBatching", "map_blocks", "relative_difference"]

#: what a vmapped or traced product raises where an op has no (working) batching rule or the network branches on
#: values
BATCHING_ERRORS = (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError)


def relative_difference(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / max(‖a‖, ‖b‖) (0 when both are zero)."""
    a, b = a.detach(), b.detach()
    scale = max(float(a.norm()), float(b.norm()))
    return float((a - b).norm()) / scale if scale > 0 else 0.0


def map_blocks(fn: Callable[[Tensor], Tensor], vectors: Tensor, block: int) -> Tensor:
    """Apply ``fn`` to row blocks of ``vectors`` (k, ...) and concatenate: bounds peak memory to one block."""
    if vectors.shape[0] <= block:
        return fn(vectors)
    return torch.cat([fn(vectors[s : s + block]) for s in range(0, vectors.shape[0], block)])


class CheckedBatching(Snapshot):
    """What was learnt about each batched product: verified, or run one at a time (``_unbatched``)."""

    chunk_size: int

    def _reset_checks(self) -> None:
        super()._reset_checks()
        self._verified: set[str] = set()  # products whose batched path agreed with one vector at a time
        self._unbatched: set[str] = set()  # products that disagreed or raised: computed one at a time

    def _map(
        self, fn: Callable[[Tensor], Tensor], batch: Tensor, product: str, tol: builtins.float | None = None
    ) -> Tensor:
        """fn over the rows of batch (k, ...), vmapped in chunks.

        One row is a plain call (vmap over a single parameter tangent turns every convolution into a slow
        grouped one). The first batched use of each ``product`` is checked against plain calls on two
        rows (relative tolerance ``tol``, default 10·√eps); if they disagree, that product is computed one
        row at a time from then on, with a warning.
        """
        if batch.shape[0] == 1 or product in self._unbatched:
            return torch.stack([fn(row) for row in batch.unbind(0)])
        try:
            out = vmap(fn, chunk_size=self.chunk_size)(batch)
        except BATCHING_ERRORS as err:
            first = fn(batch[0])  # the product itself fails too: its own error
            self._unbatchable(product, err)
            return torch.stack([first, *(fn(row) for row in batch[1:].unbind(0))])
        if product in self._verified or in_transform():
            return out
        tol = 10 * torch.finfo(self.dtype).eps ** 0.5 if tol is None else tol
        single = torch.stack([fn(row) for row in batch[:2].unbind(0)])
        difference = relative_difference(out[:2], single)
        if difference <= tol:
            self._verified.add(product)
            return out
        self._disagrees(product, difference)
        return torch.stack([fn(row) for row in batch.unbind(0)])

    def _disagrees(self, product: str, difference: builtins.float) -> None:
        """Record that the batched ``product`` disagreed with one-vector products, and say so."""
        self._unbatched.add(product)
        warnings.warn(
            f"batched (vmap) {product} of this network disagree with one-vector products (relative "
            f"difference {difference:.2g}): an op in it has a wrong batching rule in torch "
            f"{torch.__version__} (torch.cdist is one); computing them one vector at a time from now on "
            "(correct, slower)",
            RuntimeWarning,
            stacklevel=4,
        )

    def _unbatchable(self, product: str, err: Exception) -> None:
        """Record that the batched (or traced) ``product`` raised where one-at-a-time products work, and say so."""
        self._unbatched.add(product)
        warnings.warn(
            f"batched (vmap) or traced {product} of this network fail in torch {torch.__version__} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]}) while plain products work: an op "
            "in it has no batching rule (aten::lstm and GRU are such ops), or the network branches in Python "
            "on its inputs' values (HuggingFace's attention masks); computing them one at a time from now on "
            "(correct, slower)",
            RuntimeWarning,
            stacklevel=4,
        )
