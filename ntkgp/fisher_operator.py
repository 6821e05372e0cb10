"""The Fisher / generalised Gauss-Newton matrix F = Σ_i J_iᵀ H_i J_i as a lazy (p × p) LinearOperator.

H_i is the Fisher of the likelihood in the outputs at f(x_i; θ0) (:mod:`ntkgp.likelihoods`). Two
products:
- ``"exact"``: J V (JVP), H applied per input, then Jᵀ (VJP);
- ``"finite_difference"``: F v ≈ ‖v‖/ε · ∇θ' KL(p(y|θ0) ‖ p(y|θ'))|θ' = θ0 + ε v/‖v‖, since that KL has
  zero gradient and Hessian F at θ' = θ0 (supplement of "Fast Adaptation with Linearized Neural
  Networks", C.2). The forward pass at θ0 is computed once, when the operator is built, and reused by
  every product; each product costs one forward and one backward pass at θ0 + εv̂, batched over many v.
  Its error is O(ε);
- ``"central_difference"``: ‖v‖/(2ε) · [∇KL at θ0 + εv̂ − ∇KL at θ0 − εv̂], error O(ε²), two gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .functional import FunctionalNetwork, as_functional_network, map_blocks
from .gram_operator import GramOperator
from .likelihoods import get_likelihood
from .validation import check_inputs

__all__ = ["FISHER_METHODS", "FisherOperator", "default_epsilon", "fisher_operator"]

FISHER_METHODS = ("exact", "finite_difference", "central_difference")


def default_epsilon(theta0: Tensor, method: str = "finite_difference") -> float:
    """Step length along v/‖v‖ when none is given.

    Forward differences: √(eps · (1 + ‖θ0‖)), the Jacobian-free Newton–Krylov choice (Knoll & Keyes
    2004): rounding θ0 + εv̂ costs about eps·‖θ0‖/ε relative error, truncation O(ε). Central
    differences: eps^(1/3) · max(1, RMS θ0) (truncation O(ε²) on smooth networks). Both measured on a
    small ReLU CNN through training and on ResNet-18 in float32 and float64: `ntkgp run fisher-accuracy`
    and docs/performance.md.
    """
    eps = torch.finfo(theta0.dtype).eps
    if method == "central_difference":
        return eps ** (1 / 3) * max(1.0, float(theta0.square().mean().sqrt()))
    return (eps * (1.0 + float(theta0.norm()))) ** 0.5


class FisherOperator(GramOperator):
    """F = Σ_i J_iᵀ H_i J_i over inputs x (n, ...), shape (p, p).

    Keywords: ``network`` (a :class:`FunctionalNetwork`), ``likelihood`` (a name), ``method`` (one of
    ``FISHER_METHODS``), ``epsilon`` (the finite-difference step along v/‖v‖), ``at`` (outputs (n, C) at
    which H is evaluated; default f(x; θ0). The Laplace posterior passes the linearised MAP outputs
    f0 + J Δθ: the finite differences then perturb them by f(θ0 ± εv̂) − f0), ``f0`` (f(x; θ0) (n, C);
    computed here when None and needed). f0 is a keyword, not a cache on the instance, because
    linear_operator rebuilds the operator from its arguments inside every ``@``: a cache would be
    empty there and every product would pay one more forward pass.
    """

    def __init__(self, x: Tensor, *, network: FunctionalNetwork, likelihood: str, method: str, epsilon: float,
                 at: Tensor | None = None, f0: Tensor | None = None):
        if f0 is None and (method != "exact" or at is None):
            with torch.no_grad():
                f0 = network(x)
        super().__init__(x, network=network, likelihood=likelihood, method=method, epsilon=epsilon, at=at, f0=f0)
        self.likelihood, self.method, self.epsilon, self.at = get_likelihood(likelihood), method, epsilon, at
        self.f0 = f0

    def hessian_outputs(self) -> Tensor:
        """The outputs (n, C) at which H is evaluated: ``at`` if given, else f(x; θ0)."""
        return self.f0 if self.at is None else self.at

    def _matmul(self, rhs: Tensor) -> Tensor:
        if rhs.dim() == 1:
            return self._matmul(rhs.unsqueeze(-1)).squeeze(-1)
        net = self.network
        product = self._exact if self.method == "exact" else self._finite_difference
        out = map_blocks(product, rhs.mT.reshape(-1, net.num_params), net.chunk_size)
        return out.reshape(*rhs.shape[:-2], rhs.shape[-1], -1).mT

    def _exact(self, v: Tensor) -> Tensor:
        """Jᵀ H J v for v (k, p) -> (k, p)."""
        net = self.network
        return net.vjp(self.x, self.likelihood.fisher(self.hessian_outputs(), net.jvp(self.x, v)))

    def _finite_difference(self, v: Tensor) -> Tensor:
        """‖v‖/ε · ∇ KL(f0 ‖ f(θ0 + ε v̂)) for v (k, p) -> (k, p), or the central version; zero v gives zero."""
        norms = v.norm(dim=-1, keepdim=True)
        scale = torch.where(norms > 0, self.epsilon / norms, 0.0)  # (k, 1): θ = θ0 + scale·v = θ0 + εv̂
        f0, at = self.f0, self.at

        def surrogate(f: Tensor) -> Tensor:  # gradient in f is the (accurately computed) KL gradient
            if at is None:
                return (self.likelihood.kl_gradient(f0, f).detach() * f).sum()
            return (self.likelihood.kl_gradient(at, at + (f - f0)).detach() * f).sum()

        def gradients(step: Tensor) -> Tensor:  # one fused kernel per p-sized step: they dominate on the CPU
            return self.network.output_gradients(self.x, surrogate, torch.addcmul(self.network.theta0, v, step))

        if self.method == "finite_difference":
            return gradients(scale).mul_(norms / self.epsilon)
        # two calls, not one over 2k rows: a single vector then stays a plain (un-vmapped) pass each way
        return gradients(scale).sub_(gradients(-scale)).mul_(norms / (2 * self.epsilon))

    def _diagonal(self) -> Tensor:
        """Exact diagonal Σ_i diag(J_iᵀ H_i J_i) (p,), from per-sample Jacobians in chunks."""
        f, diag, start = self.hessian_outputs(), torch.zeros(self.shape[-1], dtype=self.dtype, device=self.device), 0
        for jac in self.network.jacobian_chunks(self.x):  # (b, C, p)
            cols = jac.transpose(-1, -2)  # (b, p, C)
            weighted = self.likelihood.fisher(f[start:start + len(jac)].unsqueeze(1), cols)
            diag = diag + (cols * weighted).sum((0, 2))
            start += len(jac)
        return diag


def fisher_operator(model: nn.Module | FunctionalNetwork, x: Tensor, likelihood: str = "gaussian",
                    method: str = "finite_difference", epsilon: float | None = None,
                    params: Sequence[str] | None = None, chunk_size: int = 32,
                    at: Tensor | None = None) -> FisherOperator:
    """The (p × p) Fisher of ``model`` on inputs x (n, ...) for ``likelihood``.

    Args:
        likelihood: "gaussian" (H = I), "categorical" (H = diag(π) − ππᵀ at the softmax of the
            outputs, C >= 2) or "heteroscedastic" (outputs [mean, log-variance]).
        method: "finite_difference" (one gradient per product, error O(ε)), "central_difference" (two
            gradients, error O(ε²)) or "exact" (JVP then VJP).
        epsilon: finite-difference step along v/‖v‖ (> 0); default :func:`default_epsilon`.
        params, chunk_size: as in :func:`ntkgp.ntk_operator`.
        at: outputs (n, C) at which H is evaluated (default f(x; θ0)), e.g. linearised MAP logits.
    """
    if method not in FISHER_METHODS:
        raise ValueError(f"method must be one of {FISHER_METHODS}, got {method!r}")
    lik = get_likelihood(likelihood)
    network = as_functional_network(model, params, chunk_size)
    check_inputs(x, network.dtype, "x")
    lik.check(network.num_outputs(x))
    if epsilon is None:
        epsilon = default_epsilon(network.theta0, method)
    elif not float(epsilon) > 0:
        raise ValueError(f"epsilon must be > 0 (a step length along v/‖v‖), got {epsilon}")
    if at is not None and at.shape != (x.shape[0], network.num_outputs(x)):
        raise ValueError(f"at must hold the outputs (n, C) = {(x.shape[0], network.num_outputs(x))} at which H is "
                         f"evaluated, got {tuple(at.shape)}")
    return FisherOperator(x, network=network, likelihood=likelihood, method=method, epsilon=float(epsilon), at=at)
