"""The network itself as a GPyTorch prior mean: m(x) = f(x; θ0), the zeroth-order Taylor term."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gpytorch
from torch import Tensor

from ..functional import FunctionalNetwork

__all__ = ["NetworkMean"]


class NetworkMean(gpytorch.means.Mean):
    """m(x) = f(x; θ0) for inputs x (n, d), reshaped to (n, *input_shape); output (n,) if C = 1 else (n, C).

    The network is a frozen snapshot (not a submodule): no gradient reaches its weights, while ``.to(...)``,
    ``.double()``, … convert it.
    """

    def __init__(self, network: FunctionalNetwork, input_shape: Sequence[int] | None = None):
        super().__init__()
        if not isinstance(network, FunctionalNetwork):
            raise TypeError(
                f"network must be a FunctionalNetwork (ntkgp.FunctionalNetwork(model)), got {type(network).__name__}"
            )
        self.network = network
        self.input_shape = None if input_shape is None else tuple(input_shape)

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> Any:
        self.network._apply(fn)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        inputs = x if self.input_shape is None else x.reshape(x.shape[0], *self.input_shape)
        out = self.network(inputs)
        return out.squeeze(-1) if out.shape[-1] == 1 else out
