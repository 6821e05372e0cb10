"""Inputs sharded across processes: products at a rank's shard that sum over inputs are summed over the ranks.

``network.shard(x_local)`` marks a rank's shard (:mod:`ntkgp.distributed`); a product at it, at a block of its rows
or at a minibatch taken from it, that sums over the inputs (VJPs, loss gradients, Gram diagonals) is then followed by
one ``all_reduce``. A batch of several tensors is a shard when one of its tensors views a marked shard's memory.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor

from ..inputs import Inputs, leaves
from .snapshot import Snapshot

__all__ = ["Shards"]


class Shards(Snapshot):
    """The marked shards, held weakly, with their process groups."""

    def _reset_checks(self) -> None:
        super()._reset_checks()
        self._shards: dict[int, tuple[weakref.ref, object]] = {}  # id(tensor) -> (tensor, process group)

    def shard(self, x: Inputs, group: Any = None) -> Inputs:
        """Mark x (n_local inputs) as this rank's shard of the training inputs (``ntkgp.distributed``): products
        at x (or at its row blocks and ``take`` minibatches) that sum over inputs are summed over the ranks of
        ``group`` too. Returns x."""
        for key in [k for k, (ref, _) in self._shards.items() if ref() is None]:  # minibatches that are gone
            del self._shards[key]
        for t in leaves(x):
            self._shards[id(t)] = (weakref.ref(t), group)
        return x

    def _shard_group(self, x: Inputs) -> tuple[bool, Any]:
        """(True, group) if a tensor of x is a marked shard or views its memory, else (False, None)."""
        for ref, group in self._shards.values():
            t = ref()
            if t is None:
                continue
            for s in leaves(x):
                if isinstance(s, Tensor) and t.device == s.device and s.numel():
                    if t is s or t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr():
                        return True, group
        return False, None

    def is_sharded(self, x: Inputs) -> bool:
        """Whether x is a marked shard (:meth:`shard`) or views its memory."""
        return self._shard_group(x)[0]

    def sum_over_shards(self, x: Inputs, result: Tensor) -> Tensor:
        """``result`` of a product that sums over the inputs x, summed over the ranks when x is a shard."""
        sharded, group = self._shard_group(x)
        if not sharded:
            return result
        from ..distributed import all_reduce_sum

        return all_reduce_sum(result, group)
