"""The proxy of iterative linearisation, f_lin(x; θ) = f(x; θ_s) + J(x; θ_s)(θ − θ_s), as a differentiable function
of θ: its value is one JVP at θ_s (the primal and the tangent of one forward-mode pass) and its gradient
∂L/∂θ = J(x; θ_s)ᵀ ∂L/∂f_lin is one VJP at θ_s. No Jacobian is formed; the network's own weights θ only enter
through θ − θ_s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..functional import FunctionalNetwork
from ..inputs import Inputs

__all__ = ["linearised_forward"]


class _Linearised(torch.autograd.Function):
    """δ (p,) -> f(x; θ_s) + J δ (n, C); backward: u -> Jᵀu."""

    @staticmethod
    def forward(ctx: Any, delta: Tensor, x: Inputs, network: FunctionalNetwork) -> Tensor:
        ctx.x, ctx.network = x, network
        with torch.no_grad():
            return network.linearised_outputs(x, delta.detach())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return ctx.network.vjp(ctx.x, grad.unsqueeze(0).contiguous())[0], None, None


def linearised_forward(network: FunctionalNetwork, x: Inputs, theta: Tensor) -> Tensor:
    """f_lin(x; θ) (n, C) for n inputs x and parameters θ (p,) (differentiable in θ), linearised at
    ``network.theta0`` = θ_s."""
    return _Linearised.apply(theta - network.theta0, x, network)
