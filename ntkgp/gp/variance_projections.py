"""What every predictive variance needs at m test inputs x: the prior diagonal diag J(x)J(x)ᵀ (m·C,) and the
projections J(x) D (m·C × k) of the test Jacobians on k parameter-space directions D (p × k).

Two exact paths. ``"jacobians"``: per-sample Jacobians of the test inputs in chunks (C backward passes per chunk),
which give the diagonal, contracted with D held in memory (p × k). ``"tangents"``: k Jacobian-vector products
over the m test inputs, D never formed (its columns made on the fly, in function space J(X)ᵀu by a VJP at the
training inputs), and the diagonal from the per-sample Jacobians as before. The diagonal costs the same on both;
the rest is m·C·p·k matmul flops against k JVPs over m inputs. :func:`choose_path` takes the cheaper by
counting the network's forward flops on one input (torch's FlopCounterMode), with a JVP as three forward passes
and a network flop as ``NETWORK_FLOP_COST`` matmul flops (measured on the 2-core CPU: 111 GFLOP/s for a
float32 matmul against 44 for the vmapped JVPs of MobileNetV2's last block), among the paths whose memory fits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ..functional import FunctionalNetwork
from ..inputs import Inputs, inputs_at, length, map_leaves
from ..memory import check_fits
from ..progress import progress_bar
from ..validation import check_choice

__all__ = [
    "NETWORK_FLOP_COST",
    "PATHS",
    "choose_path",
    "forward_flops",
    "jacobian_projections",
    "parameter_projections",
    "tangent_projections",
]

PATHS = ("auto", "jacobians", "tangents", "kernel")
NETWORK_FLOP_COST = 2.5


def forward_flops(network: FunctionalNetwork, x: Inputs) -> int:
    """Flops of the network's forward pass on one input after its frozen prefix (computed for all of x here, once,
    as the products will need it), counted by torch."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad():
        features = network.features(x)
        with counter:
            first = slice(0, 1)
            network._head(
                map_leaves(Tensor.detach, inputs_at(features, first)), map_leaves(Tensor.detach, inputs_at(x, first))
            )
    return int(counter.get_total_flops())


def choose_path(
    network: FunctionalNetwork, x: Inputs, num_outputs: int, directions: int, path: str, budget: float
) -> str:
    """``path`` itself, checked, or for ``"auto"`` the cheaper exact path of those that fit ``budget`` bytes
    (the jacobian path holds the p × ``directions`` matrix D). (``"kernel"``, the layer-factor kernel of function
    space, is NTKGP's to take before it asks here.)"""
    check_choice(path, "variance_path", PATHS[:3])
    held = network.num_params * directions * network.theta0.element_size()
    if path == "jacobians":
        check_fits(
            held,
            budget,
            f"the Jacobian variance path ({network.num_params:,} parameters × {directions} directions)",
            "pass variance_path='tangents' (no such matrix), a larger memory_budget, or "
            "variance='low_rank' with a smaller rank",
        )
    if path != "auto":
        return path
    if held > budget:
        return "tangents"
    matmul = 2 * num_outputs * network.num_params
    tangent = NETWORK_FLOP_COST * 3 * forward_flops(network, x)
    return "jacobians" if matmul <= tangent else "tangents"


def jacobian_projections(
    network: FunctionalNetwork,
    x: Inputs,
    directions: Tensor,
    budget: float = float("inf"),
    progress: bool = True,
    block_elements: int = 2**27,
) -> tuple[Tensor, Tensor]:
    """(J(x) D (m·C, k), diag J(x)J(x)ᵀ (m·C,)) from per-sample Jacobians, D (p, k). The Jacobian rows of
    consecutive chunks are gathered into blocks of up to ``block_elements`` (and half the ``budget``) before each
    product with D: a product with a few rows reads all of D for little work (memory-bound; 3.7× slower on
    MobileNetV2's last block with 10 rows than with 300). A tqdm bar over the inputs (shown after 1 s)."""
    p, size = network.num_params, network.theta0.element_size()
    per_input = network.num_outputs(x) * p * size
    check_fits(
        per_input,
        budget,
        f"the per-sample Jacobian of one input ({per_input // (p * size)} outputs × {p:,} parameters)",
        "linearise fewer parameters (params=...) or raise memory_budget",
    )
    chunk = min(network.jacobian_chunk_elements * size, max(per_input, length(x) * per_input))
    check_fits(
        chunk,
        budget,
        "a chunk of per-sample Jacobians",
        "lower jacobian_chunk_elements (FunctionalNetwork) or raise memory_budget",
    )
    block_elements = max(min(block_elements, int(budget / 2 / size)), 1)
    cross: list[Tensor] = []
    diagonal: list[Tensor] = []
    pending: list[Tensor] = []
    rows = 0

    def flush() -> None:
        nonlocal pending, rows
        if pending:
            block = torch.cat(pending) if len(pending) > 1 else pending[0]
            cross.append(block @ directions)
            diagonal.append(block.square().sum(-1))
            pending, rows = [], 0

    with progress_bar(total=length(x), desc="test Jacobians", unit="input", enabled=progress) as bar:
        for jac in network.jacobian_chunks(x):
            pending.append(jac.reshape(-1, p))
            rows += pending[-1].shape[0]
            if rows * p >= block_elements:
                flush()
            bar.update(jac.shape[0])
    flush()
    return torch.cat(cross), torch.cat(diagonal)


def tangent_projections(
    network: FunctionalNetwork,
    x: Inputs,
    count: int,
    product: Callable[[int, int], Tensor],
    budget: float = float("inf"),
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """(J(x) D (m·C, count), diag J(x)J(x)ᵀ) with the columns of J(x) D made by ``product(start, stop)`` ->
    (m·C, stop − start), ``chunk_size`` at a time (tqdm bar after 1 s), and the diagonal from per-sample
    Jacobians. Checks first that a chunk of tangents over x fits ``budget``: about 3 · ``chunk_size`` copies of
    the largest activation of a forward pass (a primal, a tangent and a result at each layer)."""
    need = 3 * network.chunk_size * network.largest_activation_bytes(x)
    check_fits(
        need,
        budget,
        f"{network.chunk_size} tangents at once over {length(x)} inputs",
        "lower chunk_size, predict on fewer inputs at a time, or pass variance_path='jacobians'",
    )
    starts = range(0, count, network.chunk_size)
    blocks = [
        product(start, min(start + network.chunk_size, count))
        for start in progress_bar(starts, desc="test tangents", enabled=progress)
    ]
    _, diagonal = jacobian_projections(network, x, network.theta0.new_zeros(network.num_params, 0), budget, progress)
    return torch.cat(blocks, dim=-1), diagonal


def parameter_projections(
    network: FunctionalNetwork,
    x: Inputs,
    num_outputs: int,
    directions: Tensor,
    path: str,
    budget: float = float("inf"),
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """(J(x) D (m·C, k), diag J(x)J(x)ᵀ (m·C,)) for parameter-space directions D (p, k) held in memory, by ``path``
    (:func:`choose_path`): per-sample Jacobians times D, or k JVPs along D's columns."""
    count = directions.shape[-1]
    if choose_path(network, x, num_outputs, count, path, budget) == "jacobians":
        return jacobian_projections(network, x, directions, budget, progress)

    def product(start: int, stop: int) -> Tensor:
        return network.jvp(x, directions[:, start:stop].mT).reshape(stop - start, -1).mT

    return tangent_projections(network, x, count, product, budget, progress)
