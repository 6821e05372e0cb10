"""How far the features moved: the kernel distance 1 − ⟨K_a, K_b⟩_F / (‖K_a‖_F ‖K_b‖_F) between the empirical
NTKs of two linearisations of one network on a probe batch (Fort et al. 2020), 0 for kernels equal up to a scale,
1 for orthogonal ones. Each kernel is the dense (m·C × m·C) NTK of the probe batch.
"""

from __future__ import annotations

from torch import Tensor

from ..functional import FunctionalNetwork
from ..inputs import Inputs
from ..operators.layer_kernel import dense_ntk

__all__ = ["kernel_distance"]


def kernel_distance(first: Tensor, second: Tensor) -> float:
    """1 − cos between two kernel matrices of the same shape (their Frobenius inner product over the norms)."""
    if first.shape != second.shape:
        raise ValueError(f"the kernels must have the same shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    first, second = first.double(), second.double()
    cosine = (first * second).sum() / (first.norm() * second.norm())
    return float(1 - cosine)


def probe_kernel(network: FunctionalNetwork, probe: Inputs) -> Tensor:
    """The NTK K(probe, probe) (m·C × m·C) of ``network`` at its θ0."""
    return dense_ntk(network, probe)
