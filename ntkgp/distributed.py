"""Data-parallel products on torch.distributed: training inputs sharded across ranks, network and θ0 replicated.

``network.shard(x_local)`` marks a rank's shard: from then on every product at it that sums over inputs —
VJPs Jᵀu (so Gram, Fisher and parameter-space posterior products, and Jᵀr) and loss gradients (the
finite-difference Fisher) — is the local product followed by one ``all_reduce`` of the p-vector(s), i.e. the
product over the union of the shards; JVPs and per-sample Jacobians stay local (rows of the rank's own inputs).
The function-space NTK product K v on a sharded v is then local VJP → all_reduce → local JVP. Operators built on
the shard (``gram_operator``, ``fisher_operator``, ``ntk_operator``) and iterative solvers on replicated
p-vectors (linear_cg, Lanczos) run unchanged on every rank and agree across ranks. No DistributedDataParallel:
torch.func.jvp does not work through it (pytorch #102197).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from .inputs import Inputs, length

if TYPE_CHECKING:  # functional.py imports this module
    from .functional import FunctionalNetwork

__all__ = ["all_reduce_sum", "global_rows", "world_size"]


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Processes in ``group`` (1 without an initialised process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The sum of ``t`` over the ranks of ``group`` (a new tensor; autograd flows through the local part only)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "a sharded product needs torch.distributed: call torch.distributed.init_process_group "
            "first (torchrun sets the environment it reads)"
        )
    total = t.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total if not t.requires_grad else t + (total - t.detach())


def global_rows(network: FunctionalNetwork, x: Inputs) -> int:
    """The number of inputs in x, summed over the ranks when x is a shard (``FunctionalNetwork.shard``)."""
    if not network.is_sharded(x):
        return length(x)
    count = torch.tensor([float(length(x))], dtype=torch.float64, device=network.device)
    return int(network.sum_over_shards(x, count).item())
