"""A BoTorch model on the NTK-GP of a pretrained network with one output (``import ntkgp.botorch``; ``import ntkgp``
does not import BoTorch, whose import changes GPyTorch's global settings).

The GP has prior mean m(x) = f(x; θ0) (``mean="network"``) or 0, and covariance s²·J(x)J(x')ᵀ, observations with
noise σ². With the per-sample Jacobian J_t (batch × n × p) of the training inputs, C = s²J_tJ_tᵀ + σ²I = LLᵀ and the
residual r = y − m(X), everything the posterior needs from the training inputs is computed once and cached:

    w = s²J_tᵀC⁻¹r (p),  B = L⁻¹J_t (n × p);   mean(X*) = m(X*) + J* w,   cov(X*) = s²J*J*ᵀ − s⁴(J*Bᵀ)(J*Bᵀ)ᵀ

so a posterior at X* of any batch shape (b × q × d, as BoTorch's acquisition optimisers produce) costs the
per-sample Jacobians J* of its b·q points (differentiable in X*: gradients of acquisition values flow through J(X*))
and matrix products; no product at the training inputs is repeated for the b batch members. Conditioning on new
points (``condition_on_observations``, ``fantasize``, so knowledge-gradient acquisitions work) appends their
Jacobians to J_t, batched over the fantasies, and refactors C: the old points' Jacobians are not recomputed.
Memory: J_t holds n·p numbers per batch member (BO's n is small; p is the network's selected parameters).

Transforms are explicit. By default none: the network mean and the NTK's own scale are in the units of the
network's output, which is what the targets are assumed to be in (BoTorch's ``SingleTaskGP`` standardises by
default; here that would put the targets and the network's predictions in different units). An
``outcome_transform`` (e.g. ``Standardize(m=1)``) is applied to the targets *and* to the network mean, so the GP
models the transformed outcome with the transformed network as its mean, and posteriors are untransformed back; an
``input_transform`` is applied to X before the network sees it (train and test alike).

Dtypes: the model works in the dtype of ``train_X`` (BoTorch runs in float64): a network snapshot of another floating
dtype is converted to it (a copy: the module passed is untouched), so a float32 network gives float64 posteriors to
float64 BoTorch code. ``train_Y`` and every later X and Y must then have that dtype (a TypeError otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from botorch.models.model import FantasizeMixin, Model
from botorch.posteriors.gpytorch import GPyTorchPosterior
from gpytorch.constraints import GreaterThan
from gpytorch.distributions import MultivariateNormal
from gpytorch.likelihoods import GaussianLikelihood
from linear_operator.operators import DenseLinearOperator
from torch import Tensor, nn

from .functional import FunctionalNetwork, as_functional_network
from .gp.ntk_gp import NTKGP
from .validation import as_positive_float, check_choice

__all__ = ["NTKGPModel"]


def _jacobians(network: FunctionalNetwork, x: Tensor) -> Tensor:
    """Per-sample Jacobians (..., p) of the one output at inputs x (..., d), differentiable in x."""
    flat = x.reshape(-1, *x.shape[-1:])
    if flat.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], network.num_params)
    rows = torch.cat([jac[:, 0] for jac in network.jacobian_chunks(flat)])
    return rows.reshape(*x.shape[:-1], network.num_params)


class NTKGPModel(Model, FantasizeMixin):
    """The NTK-GP of ``model`` (one output) as a BoTorch model.

    Args:
        model: the pretrained network, in eval mode, mapping (n, d) to (n,) or (n, 1).
        train_X: (n, d) inputs.
        train_Y: (n, 1) observations (raw: transforms below).
        params: the parameters linearised (names or module prefixes; default all).
        mean: ``"network"`` (f(x; θ0)) or ``"zero"``.
        outputscale: s²; None (default) learns it (with σ²) by the exact marginal likelihood
            (:meth:`ntkgp.NTKGP.fit`); a number fixes it.
        noise: σ², likewise.
        outcome_transform: a BoTorch outcome transform, none by default (module docstring).
        input_transform: a BoTorch input transform, none by default.

    The network snapshot is converted to ``train_X``'s dtype (module docstring).
    """

    def __init__(
        self,
        model: nn.Module | FunctionalNetwork,
        train_X: Tensor,
        train_Y: Tensor,
        params: Sequence[str] | str | None = None,
        mean: str = "network",
        outputscale: float | None = None,
        noise: float | None = None,
        outcome_transform: Any = None,
        input_transform: Any = None,
    ):
        super().__init__()
        self.network = as_functional_network(model, params)
        check_choice(mean, "mean", ("network", "zero"))
        self.mean_kind = mean
        if not isinstance(train_X, Tensor) or train_X.dim() != 2:
            raise ValueError(f"train_X must be a (n, d) tensor, got {getattr(train_X, 'shape', type(train_X))}")
        if not isinstance(train_Y, Tensor) or train_Y.shape != (train_X.shape[0], 1):
            raise ValueError(
                f"train_Y must have shape ({train_X.shape[0]}, 1) (one output), got "
                f"{tuple(getattr(train_Y, 'shape', ()))}"
            )
        if not train_X.is_floating_point():
            raise TypeError(f"train_X has dtype {train_X.dtype}; BoTorch inputs must be floating (float64)")
        self.network = self.network.to(train_X.dtype)  # the model's dtype is train_X's (module docstring)
        self._check_dtype(train_Y, "train_Y")
        if self.network.num_outputs(train_X[:1]) != 1:
            raise ValueError("NTKGPModel is for networks with one output; build one model per output")
        if input_transform is not None:
            self.input_transform = input_transform
        if outcome_transform is not None:
            self.outcome_transform = outcome_transform
        x = self._network_inputs(train_X, train=True)
        y = train_Y
        if outcome_transform is not None:
            y, _ = outcome_transform(y, X=train_X)
        residual = y[:, 0] - self._prior_mean(x)
        learn = outputscale is None or noise is None
        gp = NTKGP(
            self.network,
            x.detach(),
            residual.detach(),
            mean="zero",
            noise=noise,
            outputscale=1.0 if outputscale is None else outputscale,
            progress=False,
        )
        if learn:
            gp.fit()
        self.outputscale = gp.outputscale if outputscale is None else as_positive_float(outputscale, "outputscale")
        self.noise = gp.noise
        self.likelihood = GaussianLikelihood(noise_constraint=GreaterThan(self.noise / 2)).to(self.network.dtype)
        self.likelihood.noise = self.noise
        self.likelihood.requires_grad_(False)  # (σ² as BoTorch's fantasize reads it; fixed here)
        self._set_data(x.detach(), residual.detach(), _jacobians(self.network, x.detach()).detach())

    # --- the cached training part -------------------------------------------------------------------------
    def _set_data(self, x: Tensor, residual: Tensor, jacobian: Tensor) -> None:
        """Training inputs (batch, n, d), residuals (batch, n), Jacobians (batch, n, p) and the caches w, B."""
        self.train_x, self.train_residual, self.train_jacobian = x, residual, jacobian
        s2 = self.outputscale
        kernel = s2 * jacobian @ jacobian.mT
        eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
        factor = torch.linalg.cholesky(kernel + self.noise * eye)
        alpha = torch.cholesky_solve(residual.unsqueeze(-1), factor)
        self._w = s2 * (jacobian.mT @ alpha).squeeze(-1)  # (batch, p)
        self._b = torch.linalg.solve_triangular(factor, jacobian, upper=False)  # (batch, n, p)

    def _check_dtype(self, t: Tensor, name: str) -> None:
        if t.dtype != self.network.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but this model works in {self.network.dtype} (train_X's "
                f"dtype): convert with {name}.to({self.network.dtype})"
            )

    def _network_inputs(self, X: Tensor, train: bool = False) -> Tensor:
        self._check_dtype(X, "X")
        x = X
        if hasattr(self, "input_transform"):
            x = self.input_transform.preprocess_transform(x) if train else self.input_transform(x)
        return x

    def _prior_mean(self, x: Tensor) -> Tensor:
        """m(x) (...,) in the model's (outcome-transformed) space."""
        if self.mean_kind == "zero":
            return x.new_zeros(x.shape[:-1])
        flat = x.reshape(-1, x.shape[-1])
        f = self.network(flat).reshape(*x.shape[:-1], 1)
        if hasattr(self, "outcome_transform"):
            f, _ = self._transform_mean(f)
        return f[..., 0]

    def _transform_mean(self, f: Tensor) -> tuple[Tensor, None]:
        """The outcome transform with the statistics of the training targets (eval mode) applied to f (..., 1)."""
        transform = self.outcome_transform
        was = transform.training
        transform.eval()  # eval mode: the statistics of the training targets, not of f
        try:
            return transform(f)
        finally:
            transform.train(was)

    # --- BoTorch's interface ------------------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return 1

    @property
    def batch_shape(self) -> torch.Size:
        return self.train_residual.shape[:-1]

    # Model.posterior's signature; FantasizeMixin declares a narrower one (X, *args, observation_noise) that no
    # BoTorch model with output_indices can match
    def posterior(  # type: ignore[override]
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: Any = None,
        **kwargs: Any,
    ) -> GPyTorchPosterior:
        """The joint posterior at X (batch × q × d): a ``GPyTorchPosterior`` over (batch × q × 1)."""
        if output_indices not in (None, [0]):
            raise ValueError(f"NTKGPModel has one output; output_indices must be None or [0], got {output_indices}")
        if X.dim() < 2:
            raise ValueError(f"X must have shape (batch..., q, d), got {tuple(X.shape)}")
        x = self._network_inputs(X)
        jac = _jacobians(self.network, x)  # (..., q, p)
        mean = self._prior_mean(x) + (jac * self._w.unsqueeze(-2)).sum(-1)
        projected = jac @ self._b.mT  # (..., q, n)
        cov = self.outputscale * jac @ jac.mT - self.outputscale**2 * projected @ projected.mT
        if observation_noise is not False:
            noise = self.noise if observation_noise is True else observation_noise[..., 0]
            cov = cov + torch.diag_embed(torch.as_tensor(noise, dtype=cov.dtype).expand(cov.shape[:-1]))
        cov = 0.5 * (cov + cov.mT)
        # lazy: a dense q × q covariance of many close candidates is PSD only to rounding, and torch's eager Cholesky
        # refused it (200 points on a line); GPyTorch factors a linear operator when sampling, with jitter
        posterior = GPyTorchPosterior(MultivariateNormal(mean, DenseLinearOperator(cov)))
        if hasattr(self, "outcome_transform"):
            posterior = self.outcome_transform.untransform_posterior(posterior, X=X)
        if posterior_transform is not None:
            return posterior_transform(posterior)
        return posterior

    def condition_on_observations(self, X: Tensor, Y: Tensor, **kwargs: Any) -> NTKGPModel:
        """A copy conditioned on (X (batch × q × d), Y (batch' × q × 1), raw): the GP posterior with the same
        hyperparameters, batched over the broadcast of the batch shapes (fantasies included)."""
        if Y.shape[-1] != 1 or X.shape[-2] != Y.shape[-2]:
            raise ValueError(f"Y must have shape (..., {X.shape[-2]}, 1) for X of shape {tuple(X.shape)}")
        x = self._network_inputs(X)
        self._check_dtype(Y, "Y")
        y = Y
        if hasattr(self, "outcome_transform"):
            y, _ = self._transform_mean(y)
        residual = y[..., 0] - self._prior_mean(x)
        jac = _jacobians(self.network, x)
        batch = torch.broadcast_shapes(self.batch_shape, x.shape[:-2], residual.shape[:-1])
        expand = lambda t, *tail: t.expand(*batch, *tail)  # noqa: E731
        new = object.__new__(type(self))
        new.__dict__.update({k: v for k, v in self.__dict__.items()})
        new._modules = dict(self._modules)
        new._set_data(
            torch.cat([expand(self.train_x, *self.train_x.shape[-2:]), expand(x, *x.shape[-2:])], -2),
            torch.cat(
                [expand(self.train_residual, self.train_residual.shape[-1]), expand(residual, residual.shape[-1])], -1
            ),
            torch.cat([expand(self.train_jacobian, *self.train_jacobian.shape[-2:]), expand(jac, *jac.shape[-2:])], -2),
        )
        return new

    def transform_inputs(self, X: Tensor, input_transform: Any = None) -> Tensor:
        return X  # posterior() applies the input transform itself
