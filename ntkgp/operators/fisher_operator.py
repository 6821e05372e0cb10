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

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import FunctionalNetwork, as_functional_network
from ..inputs import Inputs, check_inputs, inputs_at, length, requires_grad
from ..likelihoods import get_likelihood, hessian_blocks, psd_roots
from ..progress import progress_bar
from ..validation import as_positive_float, check_choice, check_finite, check_tensor
from .gram_operator import GramOperator
from .layer_kernel import LayerKernel
from .network_operator import group_batches

__all__ = ["FISHER_METHODS", "FisherOperator", "check_epsilon", "default_epsilon", "fisher_operator"]

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


def check_epsilon(epsilon: Any, theta0: Tensor, method: str = "finite_difference") -> float:
    """``epsilon`` as a finite step > 0 that survives the rounding of θ0 + εv/‖v‖.

    The relative rounding error of a difference quotient is about eps·(1 + ‖θ0‖)/ε (see
    :func:`default_epsilon`; it overestimates the measured error about tenfold): above 1 a RuntimeWarning
    says the product is dominated by rounding, above 1000 (ε = 1e-30, say, where the product underflows
    to 0) it is an error.
    """
    step = as_positive_float(epsilon, "epsilon")
    norm = float(theta0.norm())
    rounding = torch.finfo(theta0.dtype).eps * (1 + norm) / step
    advice = (
        f"the default for these weights is {default_epsilon(theta0, method):.2g} "
        "(leave epsilon=None), or use method='exact'"
    )
    if rounding > 1e3:
        raise ValueError(
            f"epsilon = {step:g} is too small for {theta0.dtype} weights of norm {norm:.3g}: the step "
            f"θ0 + εv/‖v‖ is lost in rounding (estimated relative error eps·(1 + ‖θ0‖)/ε = "
            f"{rounding:.2g}); {advice}"
        )
    if rounding > 1:
        warnings.warn(
            f"epsilon = {step:g} is small for {theta0.dtype} weights of norm {norm:.3g}: the "
            f"finite-difference products are dominated by rounding (estimated relative error "
            f"{rounding:.2g}); {advice}",
            RuntimeWarning,
            stacklevel=3,
        )
    return step


class FisherOperator(GramOperator):
    """F = Σ_i J_iᵀ H_i J_i over n inputs x, shape (p, p): ``FisherOperator(x, ...)`` with a tensor,
    ``FisherOperator.of(x, ...)`` with any inputs (:mod:`ntkgp.inputs`).

    Keywords: ``network`` (a :class:`FunctionalNetwork`), ``likelihood`` (a name), ``method`` (one of
    ``FISHER_METHODS``), ``epsilon`` (the finite-difference step along v/‖v‖), ``at`` (outputs (n, C) at
    which H is evaluated; default f(x; θ0). The Laplace posterior passes the linearised MAP outputs
    f0 + J Δθ: the finite differences then perturb them by f(θ0 ± εv̂) − f0), ``f0`` (f(x; θ0) (n, C);
    computed here when None and needed). f0 is a keyword, not a cache on the instance, because
    linear_operator rebuilds the operator from its arguments inside every ``@``: a cache would be
    empty there and every product would pay one more forward pass.
    """

    _derived = ("f0",)

    def __init__(
        self,
        *tensors: Tensor,
        network: FunctionalNetwork,
        likelihood: str,
        method: str,
        epsilon: float,
        at: Tensor | None = None,
        f0: Tensor | None = None,
        batch_shape: torch.Size | tuple[int, ...] = (),
        layouts: Any = None,
    ):
        if f0 is None and (method != "exact" or at is None):
            f0 = network.outputs(group_batches(tensors, layouts)[0])
        super().__init__(
            *tensors,
            layouts=layouts,
            network=network,
            likelihood=likelihood,
            method=method,
            epsilon=epsilon,
            at=at,
            f0=f0,
            batch_shape=batch_shape,
        )
        self.likelihood, self.method, self.epsilon, self.at = get_likelihood(likelihood), method, epsilon, at
        self.f0 = f0

    def _differentiating(self) -> bool:
        """Whether autograd wants gradients of the products in x (or in ``at``)."""
        return requires_grad(self.x) or (torch.is_grad_enabled() and self.at is not None and self.at.requires_grad)

    def hessian_outputs(self) -> Tensor:
        """The outputs (n, C) at which H is evaluated: ``at`` if given, else f(x; θ0) (recomputed with its graph
        when gradients in x are wanted, so that they include H's dependence on x)."""
        if self.at is not None:
            return self.at
        return self.network(self.x) if self._differentiating() or self.f0 is None else self.f0

    def _product(self, v: Tensor) -> Tensor:
        """F v for v (k, p) -> (k, p). Finite differences give the value; when gradients in x are wanted
        they are those of the exact product (the derivative of a difference quotient in x would be a
        difference quotient of derivatives, its rounding amplified by 1/ε), at the cost of one exact
        product more."""
        if self.method == "exact":
            return self._exact(v)
        try:
            with torch.no_grad():
                value = self._finite_difference(v)
        except FloatingPointError as err:
            raise FloatingPointError(
                f"the {self.method.replace('_', '-')} Fisher product with step epsilon = "
                f"{self.epsilon:.3g} is not finite: the step θ0 + εv/‖v‖ moves the outputs too "
                "far for a difference quotient (saturated logits?) or they overflow at these "
                "inputs; use a smaller epsilon or method='exact'"
            ) from err
        if self._differentiating():
            exact = self._exact(v)
            value = value + (exact - exact.detach())
        return value

    def _exact(self, v: Tensor) -> Tensor:
        """Jᵀ H J v for v (k, p) -> (k, p)."""
        net = self.network
        return net.vjp(self.x, self.likelihood.fisher(self.hessian_outputs(), net.jvp(self.x, v)))

    def _finite_difference(self, v: Tensor) -> Tensor:
        """‖v‖/ε · ∇ KL(f0 ‖ f(θ0 + ε v̂)) for v (k, p) -> (k, p), or the central version; zero v gives zero."""
        norms = v.norm(dim=-1, keepdim=True)
        scale = torch.where(norms > 0, self.epsilon / norms, 0.0)  # (k, 1): θ = θ0 + scale·v = θ0 + εv̂
        f0, at = self.f0, self.at
        assert f0 is not None  # finite-difference products always hold f(x; θ0) (__init__)

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

    def _diagonal_matrix(self) -> Tensor:
        """Exact diagonal Σ_i diag(J_iᵀ H_i J_i) (p,), from per-sample Jacobians in chunks."""
        f, diag, start = self.hessian_outputs(), torch.zeros(self.shape[-1], dtype=self.dtype, device=self.device), 0
        for jac in self.network.jacobian_chunks(self.x):  # (b, C, p)
            cols = jac.transpose(-1, -2)  # (b, p, C)
            weighted = self.likelihood.fisher(f[start : start + len(jac)].unsqueeze(1), cols)
            diag = diag + (cols * weighted).sum((0, 2))
            start += len(jac)
        return self.network.sum_over_shards(self.x, diag)  # over the ranks too when x is a shard

    def dense(self, progress: bool = False) -> Tensor:
        """F = Σ_i J_iᵀ H_i J_i (p × p) in float64 (over the ranks too when x is a shard).

        When the selected parameters are one Linear layer applied once per input (a last layer, say) and its layer
        factors agree with the network's products (:meth:`~ntkgp.operators.layer_kernel.LayerKernel.agrees`),
        from them: J_i = g_i ⊗ ãᵢᵀ (ã = [a, 1]: the layer's input and the bias), so
        F[(o,a), (q,b)] = Σ_i (g_iᵀ H_i g_i)[o,q] ã_ia ã_ib — C times fewer multiplications than per-sample
        Jacobians. Otherwise from per-sample Jacobians in chunks: with S_i = H_i^{1/2} blockwise, B = S J (b·C × p)
        per chunk and F = Σ BᵀB."""
        f, p = self.hessian_outputs().double(), self.shape[-1]
        kernel = single_linear_layer(self.network, self.x)
        if kernel is not None:
            return self.network.sum_over_shards(self.x, _factored_fisher(kernel, self.x, f, self.likelihood, progress))
        dense, start = torch.zeros(p, p, dtype=torch.float64, device=self.device), 0
        chunks = self.network.jacobian_chunks(self.x)
        for jac in progress_bar(chunks, desc="Fisher (per-sample Jacobians)", enabled=progress, leave=False):
            roots = psd_roots(hessian_blocks(self.likelihood, f[start : start + len(jac)]))
            rows = (roots @ jac.double()).reshape(-1, p)
            dense.addmm_(rows.mT, rows)
            start += len(jac)
        return self.network.sum_over_shards(self.x, dense)


#: the most outputs of a Linear layer whose Fisher is formed from its factors (one product per pair of outputs)
FACTORED_MAX_OUTPUTS = 64

#: inputs per chunk of the factored Fisher
FACTORED_CHUNK = 4096


def single_linear_layer(network: FunctionalNetwork, x: Inputs) -> LayerKernel | None:
    """The :class:`~ntkgp.operators.layer_kernel.LayerKernel` of ``network`` when its selected parameters are one
    nn.Linear layer (at most ``FACTORED_MAX_OUTPUTS`` outputs) applied at one position per input, and its factors
    agree with the network's products on the first two inputs; else None."""
    kernel = LayerKernel(network)
    if len(kernel.layers) != 1 or kernel.rest_names or not isinstance(kernel.layers[0].module, nn.Linear):
        return None
    if kernel.layers[0].module.out_features > FACTORED_MAX_OUTPUTS:
        return None
    try:
        first = kernel.factors(inputs_at(x, slice(0, 1)))
        if first.inputs[0].shape[1] != 1 or not kernel.agrees(x):
            return None
    except NotImplementedError:  # called twice per forward pass
        return None
    return kernel


def linear_layer_factors(kernel: LayerKernel, x: Inputs) -> tuple[Tensor, Tensor]:
    """The factors of one Linear layer at b inputs x: its inputs a (b, d_in) and output derivatives g (b, C, d_out),
    float64 (J_i = g_i ⊗ a_iᵀ in the weight, g_i in the bias)."""
    factors = kernel.factors(x)
    return factors.inputs[0][:, 0].double(), factors.grads[0][:, :, 0].double()


def layer_slices(kernel: LayerKernel) -> tuple[list[slice], list[int]]:
    """θ positions of one Linear layer's selected entries: per output o, the slice of its weight row (empty when the
    weight is not selected) and the index of its bias (-1 when not selected)."""
    network, layer = kernel.network, kernel.layers[0]
    module = layer.module
    assert isinstance(module, nn.Linear)
    prefix = f"{layer.name}." if layer.name else ""
    offsets = dict(zip(network.names, torch.cumsum(torch.tensor([0, *network.numels[:-1]]), 0).tolist()))
    d_in, d_out = module.in_features, module.out_features
    weight, bias = offsets.get(f"{prefix}weight"), offsets.get(f"{prefix}bias")
    rows = [
        slice(weight + o * d_in, weight + (o + 1) * d_in) if weight is not None else slice(0, 0) for o in range(d_out)
    ]
    return rows, [bias + o if bias is not None else -1 for o in range(d_out)]


def _factored_fisher(kernel: LayerKernel, x: Inputs, f: Tensor, likelihood: Any, progress: bool) -> Tensor:
    """F (p × p) float64 of one Linear layer from its factors (:meth:`FisherOperator.dense`), in θ's order: with
    M_i = g_iᵀ H_i g_i, the weight block (o, q) is Aᵀ diag(M[:, o, q]) A (one product per pair o ≤ q), the
    weight-bias block Aᵀ M[:, o, q] and the bias block Σ_i M_i."""
    network = kernel.network
    rows, biases = layer_slices(kernel)
    d_out = len(rows)
    dense = torch.zeros(network.num_params, network.num_params, dtype=torch.float64, device=f.device)
    starts = range(0, length(x), FACTORED_CHUNK)
    for start in progress_bar(starts, desc="Fisher (layer factors)", enabled=progress, leave=False):
        a, g = linear_layer_factors(kernel, inputs_at(x, slice(start, start + FACTORED_CHUNK)))
        m = g.mT @ hessian_blocks(likelihood, f[start : start + len(a)]) @ g  # (b, d_out, d_out)
        weighted_bias = a.mT @ m.reshape(len(a), -1)  # (d_in, d_out²): Aᵀ M[:, o, q]
        for o in range(d_out):
            for q in range(o, d_out):
                if rows[o].stop > rows[o].start:
                    dense[rows[o], rows[q]] += (a * m[:, o, q, None]).mT @ a
                    if biases[q] >= 0:
                        dense[rows[o], biases[q]] += weighted_bias[:, o * d_out + q]
                    if biases[o] >= 0 and q > o:
                        dense[rows[q], biases[o]] += weighted_bias[:, o * d_out + q]
                if biases[o] >= 0 and biases[q] >= 0:
                    dense[biases[o], biases[q]] += m[:, o, q].sum()
    dense.triu_()  # every block was added on or above the diagonal: mirror it, in place (one p × p copy more)
    return dense.add_(dense.triu(1).mT)


def fisher_operator(
    model: nn.Module | FunctionalNetwork,
    x: Inputs,
    likelihood: str = "gaussian",
    method: str = "finite_difference",
    epsilon: float | None = None,
    params: Sequence[str] | str | None = None,
    chunk_size: int | None = None,
    at: Tensor | None = None,
) -> FisherOperator:
    """The (p × p) Fisher of ``model`` on n inputs x (:mod:`ntkgp.inputs`) for ``likelihood``.

    Args:
        likelihood: "gaussian" (H = I), "categorical" (H = diag(π) − ππᵀ at the softmax of the
            outputs, C >= 2) or "heteroscedastic" (outputs [mean, log-variance]).
        method: "finite_difference" (one gradient per product, error O(ε)), "central_difference" (two
            gradients, error O(ε²)) or "exact" (JVP then VJP).
        epsilon: finite-difference step along v/‖v‖ (> 0); default :func:`default_epsilon`; steps lost in
            the rounding of θ0 + εv/‖v‖ are refused, small ones warned about (:func:`check_epsilon`).
        params: as in :func:`ntkgp.ntk_operator`.
        chunk_size: as in :func:`ntkgp.ntk_operator`.
        at: outputs (n, C) at which H is evaluated (default f(x; θ0)), e.g. linearised MAP logits.
    """
    check_choice(method, "method", FISHER_METHODS)
    lik = get_likelihood(likelihood)
    network = as_functional_network(model, params, chunk_size)
    x = check_inputs(x, network.dtype, "x", network.device)
    num_outputs = network.num_outputs(x)
    lik.check(num_outputs)
    epsilon = (
        default_epsilon(network.theta0, method) if epsilon is None else check_epsilon(epsilon, network.theta0, method)
    )
    if at is not None:
        check_tensor(at, "at", "(n, C)")
        if at.shape != (length(x), num_outputs) or at.dtype != network.dtype:
            raise ValueError(
                f"at must hold the outputs (n, C) = {(length(x), num_outputs)} in {network.dtype} at "
                f"which H is evaluated, got {tuple(at.shape)} in {at.dtype}"
            )
        check_finite(at, "at", "pass finite outputs")
    return FisherOperator.of(x, network=network, likelihood=likelihood, method=method, epsilon=epsilon, at=at)
