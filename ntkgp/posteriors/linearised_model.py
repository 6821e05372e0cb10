"""What the Laplace and SVI posteriors share: the tasks, their targets and log-likelihoods, and the
linearised network f_lin(x; θ) = f(x; θ0) + J(x)(θ − θ0) with the prior N(θ0, I/δ)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..functional import FunctionalNetwork
from ..inputs import Inputs, check_inputs, length
from ..likelihoods import get_likelihood
from ..validation import as_positive_float, check_choice, check_generator, check_labels, check_targets

__all__ = [
    "TASKS",
    "check_task",
    "linearised_outputs",
    "log_likelihood",
    "mc_class_probabilities",
    "prepare_data",
    "randn",
]

# task -> likelihood of :mod:`ntkgp.likelihoods` whose Fisher is the task's Hessian in the outputs
TASKS = {"regression": "gaussian", "classification": "categorical"}


def check_task(likelihood: str, noise: float | None, prior_precision: float) -> float | None:
    """Validate the task name, noise and prior precision; return the noise (1.0 by default for regression)."""
    check_choice(likelihood, "likelihood", tuple(TASKS))
    as_positive_float(prior_precision, "prior_precision")
    noise = as_positive_float(noise, "noise", allow_none=True)
    if likelihood == "classification":
        if noise is not None:
            raise ValueError(
                "noise is a regression setting (the Gaussian variance σ²); leave it None for classification"
            )
        return None
    return 1.0 if noise is None else noise


def prepare_data(
    task: str, network: FunctionalNetwork, x: Inputs, y: Any, num_classes: int | None
) -> tuple[Tensor, int]:
    """Checked targets — regression (n, C) floats, classification (n,) labels — and C (y of any other kind raises)."""
    check_inputs(x, network.dtype, "train_x", network.device)  # (raises for what the network cannot take)
    c = network.num_outputs(x)
    if task == "regression":
        return check_targets(y, length(x), c, network.dtype), c
    if num_classes is not None and num_classes != c:
        raise ValueError(
            f"num_classes = {num_classes} but the network has {c} outputs: classification needs one "
            "logit per class (replace the network's last layer)"
        )
    get_likelihood(TASKS[task]).check(c)
    return check_labels(y, length(x), c), c


def log_likelihood(task: str, f: Tensor, targets: Tensor, noise: float | Tensor | None) -> Tensor:
    """Σ_i log p(y_i | f_i) for outputs f (..., n, C): Gaussian with variance ``noise`` or categorical."""
    if task == "regression":
        if noise is None:
            raise ValueError("a regression log-likelihood needs the noise σ²")
        return -0.5 * (
            ((targets - f) ** 2 / noise).sum((-1, -2))
            + targets.numel() * (math.log(2 * math.pi) + torch.log(torch.as_tensor(noise)))
        )
    logp = torch.log_softmax(f, dim=-1)
    return logp.gather(-1, targets.expand(*f.shape[:-1]).unsqueeze(-1)).squeeze(-1).sum(-1)


def linearised_outputs(network: FunctionalNetwork, x: Inputs, f0: Tensor, deltas: Tensor) -> Tensor:
    """f0 + J(x) Δ for parameter offsets Δ (k, p): (k, n, C), by one batched JVP."""
    return f0 + network.jvp(x, deltas)


def randn(*shape: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Standard normal draws on ``device``, made on the generator's own device (a CPU generator drives
    CUDA runs reproducibly)."""
    check_generator(generator)
    source = device if generator is None else generator.device
    return torch.randn(*shape, dtype=dtype, device=source, generator=generator).to(device)


def mc_class_probabilities(mean: Tensor, cov: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
    """E[softmax(f)] for f ~ N(mean (m, C), cov (m, C, C)) per input, by ``num_samples`` draws: (m, C)."""
    c = mean.shape[-1]
    jitter = 1e-10 * cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    chol = torch.linalg.cholesky(cov + jitter[:, None, None] * torch.eye(c, dtype=cov.dtype, device=cov.device))
    z = randn(num_samples, *mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
    return torch.softmax(mean + (chol @ z.unsqueeze(-1)).squeeze(-1), -1).mean(0)
