"""Mean-field variational inference for the linearised network f0(x) + J(x) Δ, Δ = θ − θ0.

q(Δ) = N(m, diag(s²)) against the prior N(0, I/δ); the reparameterised ELBO
    E_q[log p(y | f0 + J Δ)] − KL(q ‖ p)
is maximised with Adam over minibatches (likelihood term scaled by N/B). A step costs one batched JVP
(the outputs for k samples Δ = m + s ⊙ ε) and one batched VJP (Jᵀ of the output gradient), whose
product with ∂Δ/∂(m, s) gives the gradient: no autograd through the network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from ..functional import FunctionalNetwork, as_functional_network
from ..gp.ntk_gp import Prediction
from ..inputs import Inputs, Structure, check_inputs, length
from ..progress import progress_bar
from ..validation import as_count, as_positive_float, check_generator, check_prediction
from .linearised_model import (
    check_task,
    linearised_outputs,
    log_likelihood,
    mc_class_probabilities,
    prepare_data,
    randn,
)
from .minibatches import Minibatches

__all__ = ["SVI"]


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


class SVI:
    """Mean-field Gaussian posterior over the linearised network's parameters.

    Args:
        model: as in :class:`ntkgp.Laplace`.
        likelihood: as in :class:`ntkgp.Laplace`.
        params: as in :class:`ntkgp.Laplace`.
        prior_precision: as in :class:`ntkgp.Laplace`.
        noise: regression noise σ² (default 1).
        num_classes: as in :class:`ntkgp.Laplace`.
        chunk_size: as in :class:`ntkgp.Laplace`.
        init_scale: initial standard deviations s, relative to the prior's 1/√δ.
    """

    def __init__(
        self,
        model: nn.Module | FunctionalNetwork,
        likelihood: str = "regression",
        params: Sequence[str] | str | None = None,
        prior_precision: float = 1.0,
        noise: float | None = None,
        num_classes: int | None = None,
        chunk_size: int | None = None,
        init_scale: float = 1.0,
    ):
        self.noise = check_task(likelihood, noise, prior_precision)
        init_scale = as_positive_float(init_scale, "init_scale")
        self.task, self.prior_precision = likelihood, as_positive_float(prior_precision, "prior_precision")
        self.num_classes = None if num_classes is None else as_count(num_classes, "num_classes", minimum=2)
        self.network = as_functional_network(model, params, chunk_size)
        self.structure: Structure | None = None  # of the training inputs, once fitted
        net = self.network
        self.loc = torch.zeros(net.num_params, dtype=net.dtype, device=net.device, requires_grad=True)
        scale = torch.full_like(self.loc, init_scale / math.sqrt(self.prior_precision))
        self.raw_scale = _inverse_softplus(scale).requires_grad_(True)
        self.history: list[float] = []

    @property
    def scale(self) -> Tensor:
        """Posterior standard deviations s (p,)."""
        return softplus(self.raw_scale)

    @property
    def mean(self) -> Tensor:
        """Posterior mean of θ: θ0 + m (p,)."""
        return self.network.theta0 + self.loc.detach()

    def kl(self) -> Tensor:
        """KL(N(m, diag s²) ‖ N(0, I/δ)), differentiable in (m, s)."""
        d, s = self.prior_precision, self.scale
        return 0.5 * (d * (s.square() + self.loc.square()) - 1 - torch.log(d * s.square())).sum()

    def fit(
        self,
        train_x: Inputs | torch.utils.data.DataLoader,
        train_y: Tensor | None = None,
        epochs: int = 100,
        batch_size: int | None = None,
        lr: float = 1e-2,
        num_samples: int = 1,
        anneal: bool = True,
        progress: bool = True,
        generator: torch.Generator | None = None,
    ) -> SVI:
        """Maximise the ELBO over ``epochs`` passes.

        Args:
            train_x: n inputs (:mod:`ntkgp.inputs`) with targets ``train_y`` (both moved to the network's device), or a
                DataLoader of (x, y) batches.
            batch_size: minibatch size for tensors (default: the full batch).
            num_samples: reparameterised samples of Δ per step.
            anneal: cosine decay of the learning rate to 0 over the epochs (the iterates settle).
            generator: for the noise ε and the minibatch order (reproducible runs).
        Records the ELBO estimate of each epoch (the mean over its steps) in ``history``.
        """
        epochs, num_samples = as_count(epochs, "epochs"), as_count(num_samples, "num_samples")
        lr, generator = as_positive_float(lr, "lr"), check_generator(generator)
        net = self.network
        batches = Minibatches(net, self.task, train_x, train_y, batch_size, generator, self.num_classes, self.structure)
        self.structure, num_data = batches.structure, batches.num_data
        optimizer = torch.optim.Adam([self.loc, self.raw_scale], lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs) if anneal else None
        for epoch in progress_bar(range(epochs), desc="SVI", enabled=progress):
            values = []
            for x, targets, f0 in batches:
                eps = randn(num_samples, net.num_params, dtype=net.dtype, device=net.device, generator=generator)
                delta = self.loc + self.scale * eps
                with torch.no_grad():
                    f = linearised_outputs(net, x, f0, delta.detach()).requires_grad_(True)
                expected = log_likelihood(self.task, f, targets, self.noise).mean() * (num_data / length(x))
                (grad_f,) = torch.autograd.grad(expected, f)
                grad_delta = net.vjp(x, grad_f)  # ∂ E[log p] / ∂Δ for each sample
                kl = self.kl()
                loss = kl - (delta * grad_delta).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                values.append(float(expected.detach()) - float(kl.detach()))  # both at the pre-step q
                if not math.isfinite(values[-1]):
                    raise FloatingPointError(
                        f"SVI diverged at epoch {epoch + 1}, step {len(values)}: the ELBO "
                        f"estimate is {values[-1]}; lower the learning rate (lr = {lr:g}) or "
                        "pass a smaller init_scale"
                    )
            self.history.append(sum(values) / len(values))
            if schedule is not None:
                schedule.step()
        self.structure = batches.structure  # a DataLoader's first batch sets it
        return self

    def latent(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """Mean f0 + J m (m, C) and covariance J diag(s²) Jᵀ (m, C, C) of the outputs at x under q."""
        net = self.network
        x = check_inputs(x, net.dtype, "x", net.device, like=self.structure)
        with torch.no_grad():
            mean = linearised_outputs(net, x, net(x), self.loc.detach().unsqueeze(0))[0]
            s2 = self.scale.detach().square()
            cov = torch.cat([(j * s2) @ j.mT for j in net.jacobian_chunks(x)])
        check_prediction(x, mean=mean, covariance=cov)
        return mean, cov

    def elbo(self, x: Inputs, y: Tensor) -> Tensor:
        """The ELBO on (x, y), exact for regression (E‖y − f0 − JΔ‖² needs Σ_j J_ij² s_j²)."""
        if self.task != "regression":
            raise NotImplementedError(
                "the exact ELBO is available for regression; classification records its Monte Carlo estimate in history"
            )
        targets, _ = prepare_data(self.task, self.network, x, y, self.num_classes)
        mean, cov = self.latent(x)
        variance = cov.diagonal(dim1=-2, dim2=-1)
        noise = self.noise
        assert noise is not None  # regression (checked above)
        expected = log_likelihood(self.task, mean, targets, noise) - 0.5 * variance.sum() / noise
        return expected - self.kl().detach()

    def predict(
        self, x: Inputs, num_samples: int = 100, generator: torch.Generator | None = None
    ) -> Prediction | Tensor:
        """Predictive at x (m, ...) of the linearised network under q.

        The outputs are Gaussian under q, N(f0 + J m, J diag(s²) Jᵀ) (:meth:`latent`, from per-input
        Jacobians). Regression: a :class:`Prediction` of the latent function (mean and variance (m,) or
        (m, C)). Classification: class probabilities (m, C), the Monte Carlo mean of the softmax over
        ``num_samples`` draws of the logits.
        """
        num_samples = as_count(num_samples, "num_samples")
        mean, cov = self.latent(x)
        if self.task == "classification":
            return mc_class_probabilities(mean, cov, num_samples, generator)
        var = cov.diagonal(dim1=-2, dim2=-1)
        return Prediction(mean.squeeze(-1), var.squeeze(-1)) if mean.shape[-1] == 1 else Prediction(mean, var)
