"""The network itself as a GPyTorch prior mean: m(x) = f(x; θ0), the zeroth-order Taylor term."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gpytorch
from torch import Tensor, nn

from ..functional import FunctionalNetwork, as_functional_network
from ..inputs import Inputs

__all__ = ["NetworkMean"]


class NetworkMean(gpytorch.means.Mean):
    """m(x) = f(x; θ0) for inputs x (n, d), reshaped to (n, *input_shape) or mapped to the network's inputs by
    ``inputs`` (as in :class:`~ntkgp.JacobianKernel`); output (n,) if C = 1 else (n, C).

    ``network``: the pretrained module (eval mode; snapshotted as :class:`FunctionalNetwork` describes) or a
    :class:`FunctionalNetwork` — pass a :class:`~ntkgp.JacobianKernel`'s own ``kernel.network`` to share its snapshot.
    The network is a frozen snapshot (not a submodule): no gradient reaches its weights, while ``.to(...)``,
    ``.double()``, … convert it.
    """

    def __init__(
        self,
        network: nn.Module | FunctionalNetwork,
        input_shape: Sequence[int] | None = None,
        inputs: Callable[[Tensor], Inputs] | None = None,
    ):
        super().__init__()
        if not isinstance(network, (nn.Module, FunctionalNetwork)):
            raise TypeError(f"network must be an nn.Module or a FunctionalNetwork, got {type(network).__name__}")
        self.network = as_functional_network(network)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.inputs = inputs

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> Any:
        self.network._apply(fn)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if self.inputs is not None:
            out = self.network(self.inputs(x))
        else:
            out = self.network(x if self.input_shape is None else x.reshape(x.shape[0], *self.input_shape))
        return out.squeeze(-1) if out.shape[-1] == 1 else out
