"""Damped Gauss-Newton: the exact minimiser of the linearised problem with a damping penalty (eq. 6 of the
iterative-linearisation paper), i.e. iterative linearisation with each linear problem solved exactly.

With f = f(X; θ_s) (n, C), J = J(X; θ_s) and the summed loss, the step Δ = θ − θ_s minimises

    Σ_i ℓ(f_i + J_i Δ, y_i) + (λ/2)‖Δ‖²

- MSE, ℓ = ½‖f − y‖²: Δ = −(JᵀJ + λI)⁻¹Jᵀ(f − y) — the paper's eq. 6 (its ‖·‖² + λ‖·‖² has the same minimiser) —
  in parameter space by CG on the Gram operator JᵀJ (matrix-free, for large p), or in function space as
  Δ = −Jᵀ(JJᵀ + λI)⁻¹(f − y) through the dense n·C × n·C NTK (for small n·C). λ = 0 is the Gauss-Newton step of eq. 5;
  in function space it is the minimum-norm one, Jᵀ(JJᵀ)⁻¹(y − f) (eq. 19, the kernel regime).
- cross-entropy (the softmax not linearised): the objective is convex; Newton-CG with the exact Hessian
  JᵀH(f + JΔ)J + λI — the Fisher operator at the linearised logits — and a backtracking line search (λ > 0: without
  damping the linearised problem of separable data has no minimiser).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..functional import FunctionalNetwork, as_functional_network
from ..gp.solver import conjugate_gradients
from ..inputs import Inputs, check_inputs
from ..operators.fisher_operator import FisherOperator
from ..operators.gram_operator import GramOperator
from ..operators.layer_kernel import dense_ntk
from ..validation import as_count, as_nonnegative_float, as_positive_float, check_choice

__all__ = ["DampedGaussNewton", "gauss_newton_step", "linearised_objective"]

_LOSSES = ("mse", "cross_entropy")


def _as_targets(targets: Tensor, outputs: Tensor, loss: str) -> Tensor:
    if loss == "cross_entropy":
        if targets.is_floating_point() or targets.shape != outputs.shape[:1]:
            raise ValueError(
                f"targets for loss='cross_entropy' must be class labels of shape ({outputs.shape[0]},), "
                f"got {targets.dtype} {tuple(targets.shape)}"
            )
        return targets
    if targets.numel() != outputs.numel():
        raise ValueError(
            f"targets for loss='mse' must have shape {tuple(outputs.shape)} (or (n,) for one output), "
            f"got {tuple(targets.shape)}"
        )
    return targets.reshape(outputs.shape).to(outputs.dtype)


def linearised_objective(f: Tensor, targets: Tensor, delta: Tensor, loss: str, damping: float) -> Tensor:
    """Σ_i ℓ(f_i, y_i) + (λ/2)‖Δ‖² for linearised outputs f (n, C) at the step Δ (p,)."""
    if loss == "mse":
        data = 0.5 * (f - targets).pow(2).sum()
    else:
        data = nn.functional.cross_entropy(f, targets, reduction="sum")
    return data + 0.5 * damping * delta.pow(2).sum()


def _mse_step(
    net: FunctionalNetwork,
    x: Inputs,
    residual: Tensor,
    damping: float,
    space: str,
    tolerance: float,
    max_iter: int,
    progress: bool,
) -> Tensor:
    n, c = residual.shape
    if space == "function":
        kernel = dense_ntk(net, x).double()
        system = kernel + damping * torch.eye(n * c, dtype=kernel.dtype, device=kernel.device)
        factor, info = torch.linalg.cholesky_ex(system)
        rhs = residual.reshape(-1, 1).double()
        if int(info) == 0:
            coefficients = torch.cholesky_solve(rhs, factor)
        else:  # λ = 0 and a singular NTK: the least-squares (minimum-norm) solution
            coefficients = torch.linalg.lstsq(system, rhs, driver="gelsd").solution
        return -net.vjp(x, coefficients.to(net.dtype).reshape(1, n, c))[0]
    gram = GramOperator.of(x, network=net)
    with net.linearised(x):
        b = -net.vjp(x, residual.unsqueeze(0))[0]
        return conjugate_gradients(
            lambda v: gram._matmul(v) + damping * v,
            b,
            tolerance,
            max_iter,
            desc="Gauss-Newton step (CG products)",
            progress=progress,
        )


def _cross_entropy_step(
    net: FunctionalNetwork,
    x: Inputs,
    f0: Tensor,
    labels: Tensor,
    damping: float,
    tolerance: float,
    max_iter: int,
    newton_steps: int,
    progress: bool,
) -> Tensor:
    onehot = nn.functional.one_hot(labels, f0.shape[-1]).to(f0.dtype)
    delta = torch.zeros(net.num_params, dtype=net.dtype, device=net.device)
    f, first = f0, None
    with net.linearised(x):
        for _ in range(newton_steps):
            gradient = net.vjp(x, (torch.softmax(f, -1) - onehot).unsqueeze(0))[0] + damping * delta
            norm = float(gradient.norm())
            first = norm if first is None else first
            if norm <= tolerance * max(first, 1e-300) or norm == 0.0:
                break
            fisher = FisherOperator.of(x, network=net, likelihood="categorical", method="exact", epsilon=1.0, at=f)

            def product(v: Tensor, fisher: FisherOperator = fisher) -> Tensor:
                return fisher._matmul(v) + damping * v

            direction = conjugate_gradients(
                product,
                -gradient,
                tolerance,
                max_iter,
                desc="Newton-CG products",
                progress=progress,
            )
            change = net.jvp(x, direction.unsqueeze(0))[0]
            value = linearised_objective(f, labels, delta, "cross_entropy", damping)
            slope = float(gradient @ direction)
            step = 1.0
            while step > 1e-10:  # backtracking (Armijo): the full Newton step is taken near the minimiser
                trial = linearised_objective(
                    f + step * change, labels, delta + step * direction, "cross_entropy", damping
                )
                if float(trial) <= float(value) + 1e-4 * step * slope:
                    break
                step /= 2
            delta, f = delta + step * direction, f + step * change
    return delta


def gauss_newton_step(
    model: nn.Module | FunctionalNetwork,
    x: Inputs,
    targets: Tensor,
    loss: str = "mse",
    damping: float = 1.0,
    params: Sequence[str] | str | None = None,
    space: str = "auto",
    tolerance: float | None = None,
    max_iter: int | None = None,
    newton_steps: int = 50,
    progress: bool = False,
) -> Tensor:
    """The damped Gauss-Newton step Δ (p,) at the network's current weights θ_s (module docstring): θ_s + Δ minimises
    the linearised loss on (n inputs x (:mod:`ntkgp.inputs`), targets) plus (λ/2)‖θ − θ_s‖². The model is not changed.

    Args:
        loss: ``"mse"`` (targets (n, C), or (n,) for one output) or ``"cross_entropy"`` (labels (n,)).
        damping: λ >= 0 (> 0 for cross-entropy).
        params: the parameters stepped (names or module prefixes; default all). Ignored for a FunctionalNetwork.
        space: MSE only — ``"function"`` (dense NTK, n·C small), ``"parameter"`` (CG, matrix-free) or ``"auto"``
            (function space when n·C ≤ min(p, 4096); with λ = 0 the space of the smaller Gram, n·C ≤ p: the one
            in which the undamped step is well posed).
        tolerance: CG's relative residual (default 10·eps of the dtype, at least 1e-10) and Newton's gradient
            reduction; max_iter: CG iterations per solve (default 10·p); newton_steps: Newton iterations at most.
    """
    net = model if isinstance(model, FunctionalNetwork) else as_functional_network(model, params)
    check_choice(loss, "loss", _LOSSES)
    check_choice(space, "space", ("auto", "function", "parameter"))
    damping = as_nonnegative_float(damping, "damping (λ, the weight of (1/2)‖θ − θ_s‖²)")
    x = check_inputs(x, net.dtype, "x", net.device)
    tolerance = (
        max(1e-10, 10 * torch.finfo(net.dtype).eps) if tolerance is None else as_positive_float(tolerance, "tolerance")
    )
    max_iter = 10 * net.num_params if max_iter is None else as_count(max_iter, "max_iter")
    newton_steps = as_count(newton_steps, "newton_steps")
    f0 = net.outputs(x)
    targets = _as_targets(targets, f0, loss)
    with torch.no_grad():
        if loss == "cross_entropy":
            if damping == 0:
                raise ValueError(
                    "damping must be > 0 for loss='cross_entropy': the linearised cross-entropy of "
                    "separable data has no minimiser without it"
                )
            return _cross_entropy_step(net, x, f0, targets, damping, tolerance, max_iter, newton_steps, progress)
        size, p = f0.numel(), net.num_params
        if space == "auto":  # λ = 0: the space of the smaller Gram, the one that is nonsingular
            space = "function" if size <= (p if damping == 0 else min(p, 4096)) else "parameter"
        if space == "parameter" and damping == 0 and p > size:
            raise ValueError(
                f"damping = 0 with p = {p} > n·C = {size}: JᵀJ (p × p) is singular, so the undamped step "
                "is not defined in parameter space; use space='function' or 'auto' (the minimum-norm step "
                "through the n·C × n·C NTK), or damping > 0"
            )
        return _mse_step(net, x, f0 - targets, damping, space, tolerance, max_iter, progress)


class DampedGaussNewton:
    """Optimizer-style damped Gauss-Newton on ``model``: each :meth:`step` re-linearises at the current weights
    and moves them by ``lr`` times the exact damped step (:func:`gauss_newton_step`).

    Args:
        model: the network (eval mode); its selected parameters are updated in place.
        damping: λ >= 0; loss, params, space, tolerance: as in :func:`gauss_newton_step`.
        lr: the fraction of the step taken (1: the damped Gauss-Newton step itself).
    """

    def __init__(
        self,
        model: nn.Module,
        damping: float,
        loss: str = "mse",
        params: Sequence[str] | str | None = None,
        space: str = "auto",
        lr: float = 1.0,
        tolerance: float | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.loss, self.space, self.tolerance = model, check_choice(loss, "loss", _LOSSES), space, tolerance
        self.damping = as_nonnegative_float(damping, "damping (λ, the weight of (1/2)‖θ − θ_s‖²)")
        self.lr = as_positive_float(lr, "lr")
        self.network0 = as_functional_network(model, params)
        named = dict(model.named_parameters())
        self.parameters = [named[n] for n in self.network0.names]

    def step(self, x: Inputs, targets: Tensor) -> float:
        """One damped Gauss-Newton step on (x, targets); returns the summed loss before it."""
        theta = torch.cat([p.detach().reshape(-1) for p in self.parameters])
        net = self.network0.at(theta)
        delta = gauss_newton_step(net, x, targets, self.loss, self.damping, space=self.space, tolerance=self.tolerance)
        with torch.no_grad():
            f = net.outputs(x)
            value = float(
                linearised_objective(f, _as_targets(targets, f, self.loss), delta.new_zeros(()), self.loss, 0.0)
            )
            for param, change in zip(self.parameters, delta.split(self.network0.numels)):
                param.add_(change.view_as(param), alpha=self.lr)
        return value
