"""Iterative linearisation (Understanding Sparse Feature Updates in Deep Networks using Iterative Linearisation,
its Algorithm 1 and eqs. 3–4): train the proxy f_lin(x) = f(x; θ_s) + J(x; θ_s)(θ − θ_s) with any torch.optim
optimizer and re-linearise, θ_s ← θ, when a policy says so (every K steps by default). K = 1 is plain training with
that optimizer; K = ∞ trains the linearised network at θ0 (fixed features). The number of re-linearisations is the
paper's proxy for feature learning (its Definition 1).

The proxy's value is one JVP at θ_s and its gradient one VJP (:mod:`ntkgp.iterative.proxy`); a re-linearisation is a
new θ_s for the same :class:`~ntkgp.FunctionalNetwork` snapshot (:meth:`FunctionalNetwork.at`: no copy of the
module). The network must be in eval mode: BatchNorm then normalises with its running statistics, buffers that stay
what they were when the trainer was built at every θ_s (they are not re-estimated), and its affine weights are
linearised like any other parameter — the paper's fragile case (its ResNet-18 with BatchNorm diverged unless K was
small). Dropout is off.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..functional import FunctionalNetwork
from ..inputs import Inputs, check_inputs, inputs_at, length
from ..progress import progress_bar
from ..validation import as_count, check_eval_mode
from .kernel_distance import kernel_distance, probe_kernel
from .losses import as_loss, check_loss_value
from .policies import UNSET, Relinearisation, as_policy
from .proxy import linearised_forward

__all__ = ["History", "IterativeLinearisation"]


@dataclass
class History:
    """What a run recorded: ``proxy_loss`` the proxy's loss at every step (before its update); ``relinearised_at``
    the step after which each re-linearisation happened; ``evaluations`` one dict per evaluation (``step``,
    ``feature_updates``, ``{train,test}_{network,proxy}_{loss,accuracy}``, ``kernel_distance`` to θ0's kernel on
    the probe batch)."""

    proxy_loss: list[float] = field(default_factory=list)
    relinearised_at: list[int] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


def _check_optimizer(optimizer: object, names: Sequence[str], parameters: Sequence[Tensor]) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer over the trainer's parameters, got {type(optimizer).__name__}"
        )
    held = [p for group in optimizer.param_groups for p in group["params"]]
    ours, theirs = {id(p) for p in parameters}, {id(p) for p in held}
    foreign = sum(id(p) not in ours for p in held)
    missing = [n for n, p in zip(names, parameters) if id(p) not in theirs]
    if foreign or missing:
        what = (
            f"{foreign} tensor(s) that are not the model's selected parameters"
            if foreign
            else f"not the selected parameter(s) {missing[:4]}"
        )
        raise ValueError(
            f"the optimizer must be bound to exactly the parameters the trainer linearises (params=...): "
            f"it holds {what}; build it from those, e.g. torch.optim.SGD(trainer_parameters, lr=...) "
            "with the model's parameters named by params (all of them by default)"
        )


class IterativeLinearisation:
    """Train ``model`` by iterative linearisation.

    Args:
        model: the network, in eval mode; its selected parameters are θ and are updated in place.
        optimizer: a ``torch.optim`` optimizer over exactly the selected parameters of ``model``.
        period: K, proxy steps between re-linearisations (integer >= 1; None or ``math.inf``: never). Default 1.
        loss: ``"cross_entropy"`` (labels; the softmax of the linearised logits: not linearised), ``"mse"`` (½‖f − y‖²
            averaged over the batch) or ``loss(outputs (b, C), targets) -> scalar``.
        params: the parameters linearised and trained (names or module prefixes; default all).
        relinearise: a :class:`~ntkgp.iterative.policies.Relinearisation` policy instead of ``period``.
        probe: inputs (m, ...) on which the kernel distance is measured (needed by
            :class:`~ntkgp.iterative.policies.KernelDistanceThreshold` and for the distance in evaluations).
        chunk_size: vectors pushed through the network at once in NTK products.

    Use :meth:`step` in your own loop, or :meth:`fit` for minibatches, evaluations, a progress bar and checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        period: int | float | object | None = UNSET,
        loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
        params: Sequence[str] | str | None = None,
        relinearise: Relinearisation | None = None,
        probe: Inputs | None = None,
        chunk_size: int = 32,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_eval_mode(
            model,
            "iterative linearisation linearises the network in eval mode (BatchNorm with its "
            "running statistics frozen, Dropout off)",
        )
        self.policy = as_policy(period, relinearise)
        self.loss = as_loss(loss)
        self.model = model
        self.network0 = FunctionalNetwork(model, params, chunk_size)  # the snapshot at θ0 (frozen parts, buffers)
        named = dict(model.named_parameters())
        self.parameters = [named[n] for n in self.network0.names]
        _check_optimizer(optimizer, self.network0.names, self.parameters)
        self.optimizer = optimizer
        if isinstance(probe, Tensor) and probe.is_floating_point():  # the network's precision, as a convenience
            probe = probe.to(self.network0.dtype)
        self.probe = None if probe is None else check_inputs(probe, self.network0.dtype, "probe", self.network0.device)
        self.network = self.network0  # the linearisation at θ_s
        self.steps = self.since = self.feature_updates = 0
        self.history = History()
        self._kernels: dict[str, Tensor] = {}  # probe kernels at θ0 and at θ_s

    # --- the proxy -----------------------------------------------------------------------------------------------
    def theta(self) -> Tensor:
        """θ (p,), the model's selected parameters flattened (differentiable)."""
        return torch.cat([p.reshape(-1) for p in self.parameters])

    def proxy(self, x: Inputs) -> Tensor:
        """f_lin(x; θ) = f(x; θ_s) + J(x; θ_s)(θ − θ_s) (n, C), differentiable in the model's parameters."""
        return linearised_forward(self.network, x, self.theta())

    def outputs(self, x: Inputs) -> Tensor:
        """f(x; θ) (n, C), the network at its current weights (no gradient)."""
        with torch.no_grad():
            return self.network0(x, self.theta())

    def step(self, x: Inputs, targets: Tensor) -> float:
        """One optimizer step on the proxy's loss at the batch (x (b, ...), targets); re-linearises afterwards if
        the policy says so. Returns the proxy's loss before the step.

        The step is ``optimizer.step(closure)``, so optimizers that evaluate the loss several times per step
        (``torch.optim.LBFGS``) work as well as those that use the gradient once."""
        values: list[Tensor] = []

        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            out = self.proxy(x)
            value = check_loss_value(self.loss(out, targets), out)
            value.backward()
            values.append(value.detach())
            return value

        self.optimizer.step(closure)  # type: ignore[arg-type]  # torch.optim's closures may return the loss tensor
        if not values:
            raise RuntimeError(
                f"{type(self.optimizer).__name__}.step(closure) did not call the closure: the trainer "
                "needs an optimizer that evaluates the loss through it (as torch.optim's all do)"
            )
        loss = float(values[0])
        self.steps += 1
        self.since += 1
        self.history.proxy_loss.append(loss)
        if self.policy.due(self.since, loss, self.distance_from_linearisation):
            self.relinearise()
        return loss

    def relinearise(self) -> None:
        """θ_s ← θ: the proxy's features (its Jacobian) are updated: one feature update."""
        self.network = self.network0.at(self.theta().detach())
        self.since = 0
        self.feature_updates += 1
        self.history.relinearised_at.append(self.steps)
        self.policy.reset()
        self._kernels.pop("s", None)

    # --- measures of feature learning ----------------------------------------------------------------------------
    def _probe_kernel(self, which: str) -> Tensor:
        """The probe batch's NTK at θ0 (``"0"``) or at θ_s (``"s"``), computed once per linearisation."""
        if which not in self._kernels:
            network = self.network0 if which == "0" else self.network
            self._kernels[which] = probe_kernel(network, self._require_probe())
        return self._kernels[which]

    def _kernel_now(self) -> Tensor:
        """The probe batch's NTK at the current θ."""
        return probe_kernel(self.network0.at(self.theta().detach()), self._require_probe())

    def distance_from_linearisation(self) -> float:
        """Kernel distance between the network now and θ_s on the probe batch (how stale the proxy's features are)."""
        return kernel_distance(self._kernel_now(), self._probe_kernel("s"))

    def kernel_distance(self) -> float:
        """Kernel distance between the NTK at θ now and at θ0 on the probe batch."""
        return kernel_distance(self._kernel_now(), self._probe_kernel("0"))

    def _require_probe(self) -> Inputs:
        if self.probe is None:
            raise ValueError("the kernel distance needs a probe batch: pass probe=inputs (m, ...) to the trainer")
        return self.probe

    # --- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, x: Inputs, targets: Tensor, batch_size: int = 1024) -> dict[str, float]:
        """Loss and (for labels) accuracy of the network and of the proxy on (x, targets), in batches."""
        sums = {"network_loss": 0.0, "proxy_loss": 0.0, "network_accuracy": 0.0, "proxy_accuracy": 0.0}
        labels = not targets.is_floating_point()
        theta = self.theta().detach()
        with torch.no_grad():
            for start in range(0, length(x), batch_size):
                xb, yb = inputs_at(x, slice(start, start + batch_size)), targets[start : start + batch_size]
                for kind, out in (
                    ("network", self.network0(xb, theta)),
                    ("proxy", self.network.linearised_outputs(xb, theta - self.network.theta0)),
                ):
                    sums[f"{kind}_loss"] += float(self.loss(out, yb)) * length(xb)
                    if labels:
                        sums[f"{kind}_accuracy"] += float((out.argmax(-1) == yb).sum())
        result = {k: v / length(x) for k, v in sums.items()}
        return result if labels else {k: v for k, v in result.items() if k.endswith("loss")}

    def record(self, train: tuple[Inputs, Tensor], test: tuple[Inputs, Tensor] | None = None) -> dict:
        """Evaluate on ``train`` (and ``test``), with the kernel distance to θ0 when there is a probe batch; appended
        to ``history.evaluations`` and returned."""
        entry: dict[str, float] = {"step": self.steps, "feature_updates": self.feature_updates}
        for split, data in (("train", train), ("test", test)):
            if data is not None:
                entry.update({f"{split}_{k}": v for k, v in self.evaluate(*data).items()})
        if self.probe is not None:
            entry["kernel_distance"] = self.kernel_distance()
        self.history.evaluations.append(entry)
        return entry

    # --- training loop -------------------------------------------------------------------------------------------
    def fit(
        self,
        train: tuple[Inputs, Tensor],
        steps: int,
        batch_size: int | None = None,
        test: tuple[Inputs, Tensor] | None = None,
        eval_every: int | None = None,
        seed: int = 0,
        checkpoint: str | os.PathLike | None = None,
        progress: bool = True,
        callback: Callable[[IterativeLinearisation, dict], None] | None = None,
    ) -> History:
        """Train until ``steps`` proxy steps in all (a resumed run continues its count).

        Args:
            train: (x (n inputs, :mod:`ntkgp.inputs`), targets (n, ...)).
            steps: the total number of steps.
            batch_size: minibatches drawn without replacement in a seeded order per epoch; None: full batch.
            test: (x, targets) evaluated with the training set.
            eval_every: evaluate every this many steps, at step 0, at the end, and at each re-linearisation that
                ends a linearisation of at least ``eval_every`` steps (not after every step for K = 1); None: at
                step 0, the end and every re-linearisation.
            checkpoint: a file to which the whole state (model, optimizer, θ_s, policy, history, data order) is
                written atomically at every evaluation; when it exists the run resumes from it.
            callback: called with (trainer, evaluation) after each evaluation.
        """
        inputs, targets = train
        x = check_inputs(inputs, self.network0.dtype, "train[0] (the training inputs)", self.network0.device)
        train = (x, targets)
        steps = as_count(steps, "steps", minimum=0)
        n = length(x)
        batch_size = n if batch_size is None else min(as_count(batch_size, "batch_size"), n)
        every: float = math.inf if eval_every is None else as_count(eval_every, "eval_every")
        generator = torch.Generator().manual_seed(seed)
        order, position = torch.randperm(n, generator=generator), 0
        path = None if checkpoint is None else Path(checkpoint)
        if path is not None and path.exists():
            order, position = self._load(path, generator)

        def evaluate() -> None:
            entry = self.record(train, test)
            if path is not None:
                self._save(path, generator, order, position)
            if callback is not None:
                callback(self, entry)

        if not self.history.evaluations:
            evaluate()
        with progress_bar(
            total=steps,
            initial=min(self.steps, steps),
            desc="iterative linearisation",
            unit="step",
            enabled=progress,
        ) as bar:
            while self.steps < steps:
                if batch_size == n:
                    batch = None
                else:
                    if position + batch_size > n:
                        order, position = torch.randperm(n, generator=generator), 0
                    batch, position = order[position : position + batch_size], position + batch_size
                updates = self.feature_updates
                xb = x if batch is None else self.network0.take(x, batch)
                loss = self.step(xb, targets if batch is None else targets[batch])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", updates=self.feature_updates, refresh=False)
                long_enough = self._linearisation_length() >= (0 if every == math.inf else every)
                if self.steps % every == 0 or self.steps == steps or (self.feature_updates != updates and long_enough):
                    evaluate()
        return self.history

    def _linearisation_length(self) -> int:
        """Steps between the last two re-linearisations (the first counted from step 0)."""
        at = [0] + self.history.relinearised_at
        return at[-1] - at[-2] if len(at) > 1 else 0

    def _save(self, path: Path, generator: torch.Generator, order: Tensor, position: int) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "theta_s": self.network.theta0,
            "steps": self.steps,
            "since": self.since,
            "feature_updates": self.feature_updates,
            "policy": self.policy.state_dict(),
            "history": self.history.__dict__,
            "generator": generator.get_state(),
            "order": order,
            "position": position,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, path)

    def _load(self, path: Path, generator: torch.Generator) -> tuple[Tensor, int]:
        state = torch.load(path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.network = self.network0.at(state["theta_s"])
        self.steps, self.since, self.feature_updates = state["steps"], state["since"], state["feature_updates"]
        self.policy.load_state_dict(state["policy"])
        self.history = History(**state["history"])
        self._kernels.pop("s", None)
        generator.set_state(state["generator"])
        return state["order"], state["position"]
