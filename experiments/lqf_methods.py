"""The adaptation methods the LQF paper compares, each run on one task draw and timed.

- ``NLFT``: non-linear fine-tuning of the scope with the cross-entropy, SGD with momentum 0.9 and weight decay
  towards 0 (the usual one), BatchNorm statistics frozen (the network runs in eval mode through a snapshot);
- ``FC``: the same on the last layer of the fixed network (logistic regression on its features);
- ``LQF``: :class:`ntkgp.LQF` — the linearised network, MSE on α·one-hot (α = 15), K-FAC, the Leaky-ReLU network;
- ``LQF FC``: LQF on the last layer only;
- ``GaF``: the linearised ReLU network trained with the cross-entropy by plain SGD (:class:`ntkgp.LQF` with
  ``loss="cross_entropy"``, no preconditioner; LQF's default lr for it, 1/λ_max of the Hessian at θ0).

Every run trains ``epochs`` passes of minibatches of ``batch_size``, at least ``min_steps`` steps (a 1-shot
10-way task has one minibatch per epoch), and reports the test error in % and the seconds of the adaptation
(fit and test prediction; the frozen prefix of a draw's first run is included in that run's time).
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from torch import Tensor, nn

from ntkgp import LQF, FunctionalNetwork
from ntkgp.progress import progress_bar

__all__ = ["epochs_for", "fine_tune", "lqf", "sgd_cross_entropy", "test_error"]


def epochs_for(num_data: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """``epochs``, raised so that the run takes at least ``min_steps`` minibatch steps."""
    return max(epochs, math.ceil(min_steps / math.ceil(num_data / batch_size)))


def test_error(predicted: Tensor, labels: Tensor) -> float:
    """Test error in % of predicted labels (m,)."""
    return 100.0 * float((predicted != labels).double().mean())


def sgd_cross_entropy(
    network: FunctionalNetwork,
    x: Tensor,
    y: Tensor,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    seed: int,
    theta: Tensor | None = None,
    stop=None,
    desc: str | None = None,
) -> tuple[Tensor, int]:
    """SGD (momentum 0.9, weight decay towards 0) on the cross-entropy of f(x; θ) from ``theta`` (default θ0),
    minibatches in a seeded order; ``stop(θ)`` (optional) is asked after each epoch; ``desc``: a tqdm bar over the
    epochs with that label. Returns (θ (p,), epochs run)."""
    theta = (network.theta0 if theta is None else theta).clone().requires_grad_(True)
    optimizer = torch.optim.SGD([theta], lr=lr, momentum=0.9, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for epoch in progress_bar(range(epochs), desc=desc, unit="epoch", enabled=desc is not None):
        for rows in torch.randperm(len(x), generator=generator).split(batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(network(network.take(x, rows), theta), y[rows]).backward()
            optimizer.step()
        if stop is not None and stop(theta.detach()):
            return theta.detach(), epoch + 1
    return theta.detach(), epochs


def fine_tune(net: FunctionalNetwork, task, lr: float, weight_decay: float, config: dict, seed: int) -> dict:
    """NLFT (or FC, on a network of the last layer) on ``task``: test error %, seconds, final train error %."""
    start = time.perf_counter()
    epochs = epochs_for(len(task.train_y), config["batch_size"], config["epochs"], config["min_steps"])
    theta, _ = sgd_cross_entropy(net, task.train_x, task.train_y, lr, weight_decay, epochs, config["batch_size"], seed)
    with torch.no_grad():
        error = test_error(net(task.test_x, theta).argmax(-1), task.test_y)
        train_error = test_error(net(task.train_x, theta).argmax(-1), task.train_y)
    if not math.isfinite(float(theta.sum())):
        error = train_error = 100.0 * (1 - 1 / int(task.train_y.max() + 1))  # diverged: chance level
    return {"error": error, "train_error": train_error, "seconds": time.perf_counter() - start}


def lqf(
    net: FunctionalNetwork,
    task,
    config: dict,
    seed: int,
    loss: str = "mse",
    preconditioner: str | None = "kfac",
    lr: float | None = None,
) -> dict:
    """:class:`ntkgp.LQF` on ``task`` (``lr`` None: LQF's default for the preconditioner): test error %, seconds,
    the lr used; a run that diverges (LQF raises FloatingPointError) scores chance level and says so."""
    start = time.perf_counter()
    learner = LQF(net, loss=loss, preconditioner=preconditioner, weight_decay=config["weight_decay"])
    epochs = epochs_for(len(task.train_y), config["batch_size"], config["epochs"], config["min_steps"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # K-FAC: BatchNorm and depthwise parameters go diagonal
        try:
            learner.fit(
                task.train_x,
                task.train_y,
                epochs=epochs,
                lr=lr,
                batch_size=config["batch_size"],
                seed=seed,
                progress=False,
            )
        except FloatingPointError:
            chance = 100.0 * (1 - 1 / int(task.train_y.max() + 1))
            return {"error": chance, "seconds": time.perf_counter() - start, "lr": learner.lr, "diverged": True}
        error = test_error(learner.classify(task.test_x), task.test_y)
    return {"error": error, "seconds": time.perf_counter() - start, "lr": learner.lr, "diverged": False}
