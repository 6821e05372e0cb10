"""LQF, linear quadratic fine-tuning (Achille et al., CVPR 2021), as the MAP of the NTK-GP.

LQF trains the linearisation f_lin(x; θ) = f(x; θ0) + J(x)(θ − θ0) of a pretrained network on

    L(θ) = Σ_i ‖α y_i − f_lin(x_i; θ)‖² + (λ/2)‖θ − θ0‖²        (paper eq. 3; y_i one-hot, α = 15)

whose minimiser θ* − θ0 = (JᵀJ + (λ/2)I)⁻¹ Jᵀ(αY − f0(X)) = Jᵀ(K + (λ/2)I)⁻¹(αY − f0(X)) is the NTK-GP
posterior mean for targets αY with σ²/s² = λ/2 (GUIDE §1): with σ² = ½ and s² = 1/λ, L/(2σ²) is the negative
log posterior, and that GP's predictive variance is the one :meth:`LQF.predict` reports. Everything here runs
on the functional layer and the operators: one JVP (f_lin on a batch) and one VJP (its gradient) per SGD
step, the NTK operator for the closed form, the influence and leave-one-out; the network is never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import Tensor, nn

from ..distributed import global_rows
from ..functional import FunctionalNetwork, as_functional_network
from ..gp.ntk_gp import NTKGP, Prediction
from ..gp.parameter_space import ntk_matrix
from ..gp.solver import conjugate_gradients
from ..inputs import Inputs, Structure, cat, check_inputs, length, structure
from ..lanczos import ritz_values
from ..memory import default_budget
from ..operators.fisher_operator import FisherOperator
from ..operators.gram_operator import GramOperator
from ..operators.layer_kernel import LayerKernel, cheap_layer_kernel, dense_ntk
from ..operators.ntk_operator import NTKOperator
from ..posteriors.minibatches import Minibatches
from ..progress import progress_bar
from ..validation import as_count, as_nonnegative_float, as_positive_float, check_choice, check_prediction
from .influence import kfac_influence
from .kernel_system import KernelSystem
from .kfac import KFACPreconditioner, kfac_layers

__all__ = ["LQF"]


@dataclass
class _TrainingData:
    """What a fit keeps: n inputs x, loss targets, f(X; θ0) (n, C), the inputs' structure and C."""

    x: Inputs
    targets: Tensor
    outputs: Tensor
    structure: Structure
    num_outputs: int


LOSSES = ("mse", "cross_entropy")
SOLVERS = ("sgd", "closed_form")


class LQF:
    """Linear quadratic fine-tuning of a pretrained network.

    Args:
        model: the pretrained network in eval mode (or a :class:`FunctionalNetwork`), inputs (n, ...) ->
            outputs (n, C); not modified (snapshotted at θ0).
        params: the parameters to fine-tune (names or module prefixes, e.g. ``["classifier."]``; default all
            trainable), in ``named_parameters()`` order.
        alpha: target scale α for classification with the MSE loss (default 15, the paper's). Regression
            targets and the cross-entropy loss take no α: leave it None.
        weight_decay: λ >= 0 of the penalty (λ/2)‖θ − θ0‖² (on the distance from θ0, not on θ).
        loss: ``"mse"`` (LQF) or ``"cross_entropy"`` (softmax of f_lin, labels; the "GaF" ablation).
        preconditioner: ``"kfac"`` ((K + λI)⁻¹, K the K-FAC of the loss curvature at θ0, computed once per fit:
            :class:`~ntkgp.lqf.kfac.KFACPreconditioner`) or None (plain SGD).
        task: ``"classification"`` (labels (n,), C = the network's outputs) or ``"regression"`` (targets (n, C)).
        momentum: SGD momentum (0.9, the paper's).
        chunk_size: vectors pushed through the network at once in the closed form and influence products.

    After :meth:`fit`: ``delta`` θ − θ0 (p,), ``weights`` θ (p,), ``history`` (one dict per epoch: epoch, loss,
    accuracy for classification, lr), ``lr`` (the learning rate used), ``lr_curvature`` (the curvature λ̂ a default
    lr came from, None when lr was given).
    """

    #: random minibatches, and Lanczos steps on each, whose preconditioned curvature sets the default SGD step
    STEP_BATCHES = 3
    STEP_LANCZOS = 10

    def __init__(
        self,
        model: nn.Module | FunctionalNetwork,
        params: Sequence[str] | str | None = None,
        alpha: float | None = None,
        weight_decay: float = 1e-4,
        loss: str = "mse",
        preconditioner: str | None = "kfac",
        task: str = "classification",
        momentum: float = 0.9,
        chunk_size: int | None = None,
    ):
        self.task = check_choice(task, "task", ("classification", "regression"))
        self.loss = check_choice(loss, "loss", LOSSES)
        if preconditioner is not None:
            check_choice(preconditioner, "preconditioner", ("kfac",))
        if self.task == "regression" and self.loss == "cross_entropy":
            raise ValueError("loss='cross_entropy' is a classification loss; regression uses loss='mse'")
        if alpha is not None and (self.task == "regression" or self.loss == "cross_entropy"):
            raise ValueError(
                f"alpha scales one-hot targets for the MSE loss; {self.task} with loss={self.loss!r} "
                "takes no alpha: leave it None"
            )
        self.alpha = 15.0 if alpha is None and self.task == "classification" else alpha
        if self.alpha is not None:
            self.alpha = as_positive_float(self.alpha, "alpha")
        self.weight_decay = as_nonnegative_float(weight_decay, "weight_decay")
        self.momentum = as_nonnegative_float(momentum, "momentum")
        if self.momentum >= 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum:g}")
        self.preconditioner = preconditioner
        if preconditioner == "kfac" and self.weight_decay == 0:
            raise ValueError(
                "preconditioner='kfac' applies (K + λI)⁻¹ and needs weight_decay λ > 0 (K-FAC factors "
                "are singular); pass weight_decay > 0 or preconditioner=None"
            )
        self.network = as_functional_network(model, params, chunk_size)
        if preconditioner == "kfac":
            kfac_layers(self.network.module, self.network.names)  # raises if K-FAC has nothing to cover
        self.delta = torch.zeros(self.network.num_params, dtype=self.network.dtype, device=self.network.device)
        self.history: list[dict] = []
        self.lr: float | None = None
        self.lr_curvature: float | None = None
        self._data: _TrainingData | None = None
        self._kfac: KFACPreconditioner | None = None
        self._system: KernelSystem | None = None
        self._gp: NTKGP | None = None
        self._layer_kernel: LayerKernel | Literal[False] | None = None  # None: not yet decided; False: NTK products
        self._fit_options: dict = {}

    # --- data --------------------------------------------------------------------------------------
    @property
    def weights(self) -> Tensor:
        """θ = θ0 + δ (p,), in the order of the network's ``named_parameters()`` restricted to the scope."""
        return self.network.theta0 + self.delta

    def _minibatches(
        self,
        x: Inputs | torch.utils.data.DataLoader,
        y: Tensor | None,
        batch_size: int | None,
        generator: torch.Generator | None,
        like: Structure | None,
    ) -> Minibatches:
        if self.task == "classification" and isinstance(y, Tensor) and y.is_floating_point():
            raise TypeError(
                f"train_y holds floats of shape {tuple(y.shape)}: classification takes integer labels "
                "(n,); for regression targets (n, C) use LQF(..., task='regression'), for one-hot "
                "targets pass train_y.argmax(-1)"
            )
        return Minibatches(self.network, self.task, x, y, batch_size, generator, like=like)

    def _targets(self, targets: Tensor, num_outputs: int) -> Tensor:
        """What the loss compares f_lin with: α·one-hot (n, C) for MSE classification, else the targets."""
        if self.task == "classification" and self.loss == "mse":
            assert self.alpha is not None  # set for classification in __init__
            return self.alpha * nn.functional.one_hot(targets, num_outputs).to(self.network.dtype)
        return targets

    def _store(self, x: Inputs, targets: Tensor, outputs: Tensor) -> None:
        """Keep the training data, the loss targets and f(X; θ0)."""
        num_outputs = self.network.num_outputs(x)
        self._data = _TrainingData(x, self._targets(targets, num_outputs), outputs, structure(x), num_outputs)
        self._kfac = self._system = self._gp = None  # they describe the training data

    def _fitted(self, what: str = "this") -> _TrainingData:
        """The training data of the last fit; before one, a RuntimeError saying that ``what`` needs it."""
        if self._data is None:
            raise RuntimeError(f"{what} needs a fitted LQF: call fit(train_x, train_y) first")
        return self._data

    @property
    def train_x(self) -> Inputs:
        """The n training inputs (:mod:`ntkgp.inputs`)."""
        return self._fitted().x

    @property
    def train_targets(self) -> Tensor:
        """The loss targets: regression targets, α·one-hot (MSE classification) or labels (cross-entropy)."""
        return self._fitted().targets

    @property
    def train_outputs(self) -> Tensor:
        """f(X; θ0) (n, C)."""
        return self._fitted().outputs

    @property
    def structure(self) -> Structure:
        """The training inputs' structure (:class:`ntkgp.inputs.Structure`), which later inputs must have."""
        return self._fitted().structure

    @property
    def num_outputs(self) -> int:
        return self._fitted().num_outputs

    # --- the objective -------------------------------------------------------------------------------
    def _data_loss(self, f: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(Σ over the batch of the loss, its gradient in f (b, C))."""
        if self.loss == "mse":
            residual = f - targets
            return residual.square().sum(), 2 * residual
        logp = torch.log_softmax(f, -1)
        onehot = nn.functional.one_hot(targets, f.shape[-1]).to(f.dtype)
        return -(logp * onehot).sum(), logp.exp() - onehot

    def objective(self) -> float:
        """L(θ) on the training data at the current δ (one JVP over the training inputs)."""
        self._fitted("objective()")
        f = self._train_linearised()
        return float(self._data_loss(f, self.train_targets)[0]) + 0.5 * self.weight_decay * float(
            self.delta @ self.delta
        )

    def _linearised(self, x: Inputs, outputs: Tensor | None = None) -> Tensor:
        """f_lin(x) = f(x; θ0) + J(x)δ (m, C); f(x; θ0) computed unless given."""
        with torch.no_grad():
            outputs = self.network.outputs(x) if outputs is None else outputs
            return outputs + self.network.jvp(x, self.delta.unsqueeze(0))[0]

    def _train_linearised(self) -> Tensor:
        return self._linearised(self.train_x, self.train_outputs)

    # --- fitting -------------------------------------------------------------------------------------
    def fit(
        self,
        train_x: Inputs | torch.utils.data.DataLoader,
        train_y: Tensor | None = None,
        epochs: int = 10,
        lr: float | None = None,
        batch_size: int = 32,
        solver: str = "sgd",
        seed: int = 0,
        progress: bool = True,
        callback: Callable[[LQF, dict], None] | None = None,
    ) -> LQF:
        """Fit on inputs ``train_x`` (n, ...) with labels (n,) or regression targets (n, C) ``train_y``, or on a
        DataLoader of (x, y) batches (its batches are the SGD steps; its data is gathered once for K-FAC and the
        closed form). Starts from θ0.

        Args:
            epochs: SGD passes over the data.
            batch_size: the minibatch size for tensors.
            lr: learning rate; default (1 − momentum)/λ̂ (1/λ̂ without momentum) with λ̂ the largest eigenvalue of
                the preconditioned curvature P⁻¹H_B of the minibatch objective SGD steps on — H_B =
                (N/b)·∇²(Σ_batch ℓ) + λI, P the K-FAC preconditioner (the identity without one) — by
                ``STEP_LANCZOS`` = 10 Lanczos steps on each of ``STEP_BATCHES`` = 3 random batches of the epoch's
                sizes (the smallest, most scaled one included; the whole data when b ≥ N; on shards with b < N, the
                whole data's curvature times N/b, an upper bound). Momentum sums steps to lr/(1 − momentum), so the
                effective step is 1/λ̂, half the 2/λ_max beyond which gradient descent diverges: room for Lanczos'
                underestimate and for the batches not sampled. (1/λ̂ itself, inside heavy ball's full-batch bound
                2(1 + momentum)/λ_max, grew the loss 14-fold over 30 epochs of alternating minibatches in
                tests/test_lqf.py.) The paper's 0.1 with K-FAC assumes P⁻¹H ≈ I, true where K-FAC is exact (a last
                Linear layer); on MobileNetV2's last block P⁻¹H reaches ≥ 857 and 0.1 diverged (``ntkgp run
                lqf-conditioning``). ``lr_curvature`` keeps λ̂.
            solver: ``"sgd"`` (minibatch SGD with momentum; each step one JVP and one VJP on the batch, the
                gradient scaled to the whole data set: (N/b)·Σ_batch + λ(θ − θ0)) or ``"closed_form"`` (the exact
                minimiser, MSE only: :meth:`solve`).
            seed: for the minibatch order.
            progress: a tqdm bar over the epochs.
            callback: called as ``callback(lqf, record)`` after each epoch.
        Returns self.
        """
        check_choice(solver, "solver", SOLVERS)
        epochs, batch_size = as_count(epochs, "epochs"), as_count(batch_size, "batch_size")
        lr = None if lr is None else as_positive_float(lr, "lr")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        generator = torch.Generator().manual_seed(as_count(seed, "seed", minimum=0))
        data = self._minibatches(train_x, train_y, batch_size, generator, None)
        self._store(*data.tensors())
        self.delta = torch.zeros_like(self.delta)
        self.history = []
        self._fit_options = {
            "solver": solver,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "progress": progress,
        }
        if solver == "closed_form":
            self.lr = None
            return self.solve(progress=progress)
        return self._sgd(data, epochs, lr, progress, callback)

    def _preconditioner(self) -> KFACPreconditioner | None:
        if self.preconditioner == "kfac" and self._kfac is None:
            self._kfac = KFACPreconditioner(self.network, self.train_x, self.weight_decay, self.loss)
        return self._kfac if self.preconditioner == "kfac" else None

    def _default_lr(self, data: Minibatches, num_data: int) -> float:
        """1/λ̂, λ̂ the largest eigenvalue of P⁻¹H_B over a few minibatches (:meth:`fit`'s ``lr``); sets
        ``lr_curvature``."""
        x, net = self.train_x, self.network
        size = data.batch_size if data.loader is None else data.loader.batch_size
        size = num_data if size is None else size
        if net.is_sharded(x):  # the global batch: every rank's
            size = int(net.sum_over_shards(x, torch.tensor([float(size)], dtype=torch.float64))[0])
        size = min(size, num_data)
        if size >= num_data or net.is_sharded(x):
            batches, scales = [x], [num_data / size]
        else:
            generator = torch.Generator().manual_seed(0)
            sizes = sorted({size, num_data % size or size})  # the smallest batch is the most scaled
            sizes += [size] * (self.STEP_BATCHES - len(sizes))
            batches = [net.take(x, torch.randperm(num_data, generator=generator)[:b].to(net.device)) for b in sizes]
            scales = [num_data / b for b in sizes]
        self.lr_curvature = max(
            float(self._ritz_values(batch, scale, self.STEP_LANCZOS, self._preconditioner())[-1])
            for batch, scale in zip(batches, scales)
        )
        return (1.0 - self.momentum) / self.lr_curvature

    def _sgd(
        self,
        data: Minibatches,
        epochs: int,
        lr: float | None,
        progress: bool,
        callback: Callable[[LQF, dict], None] | None,
    ) -> LQF:
        decay = self.weight_decay
        num_data = self._check_shard_batches(data)
        precondition = self._preconditioner()
        self.lr_curvature = None
        self.lr = self._default_lr(data, num_data) if lr is None else as_positive_float(lr, "lr")
        w = self.delta.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([w], lr=self.lr, momentum=self.momentum)
        for epoch in progress_bar(range(as_count(epochs, "epochs")), desc="LQF", enabled=progress):
            total, correct = 0.0, 0
            for x, targets, f0 in data:
                value, f = self._step(
                    w, optimizer, x, self._targets(targets, self.num_outputs), f0, num_data, precondition
                )
                total += float(value)
                if self.task == "classification":
                    correct += int((f.argmax(-1) == targets).sum())
            if self.network.is_sharded(self.train_x):  # the epoch's loss and hits over every rank's shard
                sums = self.network.sum_over_shards(
                    self.train_x, torch.tensor([total, float(correct)], dtype=torch.float64)
                )
                total, correct = float(sums[0]), int(sums[1])
            self.delta = w.detach().clone()
            loss = total + 0.5 * decay * float(self.delta @ self.delta)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"LQF diverged at epoch {epoch + 1} (loss {loss}): lower the learning rate (lr = {self.lr:g})"
                )
            record = {"epoch": epoch + 1, "loss": loss, "lr": self.lr}
            if self.task == "classification":
                record["accuracy"] = correct / num_data
            self.history.append(record)
            if callback is not None:
                callback(self, record)
        return self

    def _check_shard_batches(self, data: Minibatches) -> int:
        """N over every rank; on shards, a check that every rank takes the same number of minibatches per epoch
        (each step's VJP is a collective: unequal counts would leave a rank waiting)."""
        if not self.network.is_sharded(self.train_x):
            return data.num_data
        size = data.num_data if data.batch_size is None else data.batch_size
        steps = float(math.ceil(data.num_data / size))
        sums = self.network.sum_over_shards(
            self.train_x, torch.tensor([steps, steps**2, float(data.num_data), 1.0], dtype=torch.float64)
        )
        if abs(float(sums[3] * sums[1] - sums[0] ** 2)) > 0.5:
            raise ValueError(
                f"the shards give the ranks different numbers of minibatches per epoch (this rank "
                f"{int(steps)}): give every rank a shard of the same size, or a batch_size that divides "
                "them into as many batches"
            )
        return int(sums[2])

    def _step(
        self,
        w: Tensor,
        optimizer: torch.optim.Optimizer,
        x: Inputs,
        targets: Tensor,
        f0: Tensor,
        num_data: int,
        precondition: KFACPreconditioner | None,
    ) -> tuple[Tensor, Tensor]:
        """One SGD step on a batch x (b, ...): f_lin = f0 + J δ (one JVP), the gradient of the objective scaled
        to the data set, (N/b)·Jᵀ ∂ℓ/∂f + λδ (one VJP), preconditioned. Returns (Σ_batch ℓ, f_lin (b, C)).
        On shards (``network.shard``) the VJP sums every rank's batch, and N and b count them all."""
        net = self.network
        with torch.no_grad():
            f = f0 + net.jvp(x, w.detach().unsqueeze(0))[0]
            value, grad_f = self._data_loss(f, targets)
            batch = global_rows(net, x)
            gradient = (num_data / batch) * net.vjp(x, grad_f.unsqueeze(0))[0] + self.weight_decay * w
            w.grad = gradient if precondition is None else precondition @ gradient
        optimizer.step()
        return value, f

    def solve(self, space: str = "auto", progress: bool = True) -> LQF:
        """Set δ to the exact minimiser (MSE loss): in function space, δ = Jᵀ(K + (λ/2)I)⁻¹r by a float64
        Cholesky factor of the dense N × N NTK (N = n·C ≤ 4096 for ``"auto"``); in parameter space by CG on
        JᵀJ + (λ/2)I (p × p, lazy Gram operator; the linearisation at X cached for its products when it fits,
        a tqdm bar over them shown after 1 s). Returns self."""
        self._fitted("solve()")
        check_choice(space, "space", ("auto", "function", "parameter"))
        if self.loss != "mse":
            raise ValueError("the closed form is the minimiser of the MSE loss; loss='cross_entropy' is fitted by SGD")
        size = length(self.train_x) * self.num_outputs
        if self.network.is_sharded(self.train_x):  # ntkgp.distributed: only p-vectors are shared by the ranks
            if space == "function":
                raise ValueError(
                    "the training inputs are sharded across processes (network.shard): the function-space "
                    "system needs them all on one process; use space='parameter' (CG on p-vectors)"
                )
            space = "parameter"
        if space == "function" or (space == "auto" and size <= 4096):
            self._update_delta_from_system()
            return self
        if self.weight_decay == 0:
            raise ValueError("the parameter-space closed form solves JᵀJ + (λ/2)I and needs weight_decay > 0")
        net, n, k = self.network, length(self.train_x), self.num_outputs
        gram, c = GramOperator.of(self.train_x, network=net), self.weight_decay / 2
        with torch.no_grad(), net.linearised(self.train_x):  # one forward pass for all the CG products
            b = net.vjp(self.train_x, self._residual().reshape(1, n, k))[0]
            self.delta = conjugate_gradients(
                lambda v: gram._matmul(v) + c * v,
                b,
                max(1e-10, 10 * torch.finfo(net.dtype).eps),
                10 * b.numel(),
                desc="LQF closed form (CG products)",
                progress=progress,
            )
        return self

    def _residual(self) -> Tensor:
        """r = targets − f(X; θ0) (n, C)."""
        return self.train_targets - self.train_outputs

    def kernel_system(self) -> KernelSystem:
        """The function-space system K(X, X) + (λ/2)I of the training data (built on first use: N products)."""
        self._fitted("the closed form, leave-one-out and influence")
        if self.loss != "mse":
            raise ValueError("leave-one-out, influence and the closed form are exact for the MSE loss only")
        if self._system is None:
            kernel = self.kernel_matrix(self.train_x)
            self._system = KernelSystem(kernel, self._residual().reshape(-1), self.weight_decay / 2, self.num_outputs)
        return self._system

    def kernel_matrix(self, x1: Inputs, x2: Inputs | None = None) -> Tensor:
        """The NTK K(x1, x2) of the network at θ0 (n1·C × n2·C, rows interleaved: i·C + c) as a dense matrix, x2
        defaulting to x1: from per-layer factors (:class:`~ntkgp.operators.LayerKernel`: one forward and C
        backward passes per input) when they cost at most half of p per pair of rows; else K(x1, x1) from per-sample
        Jacobians where they are cheaper (:func:`~ntkgp.gp.parameter_space.ntk_matrix`), n2·C NTK products otherwise."""
        self._fitted("kernel_matrix()")
        symmetric = x2 is None
        x2 = x1 if x2 is None else x2
        for x, name in ((x1, "x1"), (x2, "x2")):
            check_inputs(x, self.network.dtype, name, self.network.device, like=self.structure)
        factored = self._factored()
        if symmetric and not factored:
            with torch.no_grad():
                return ntk_matrix(self.network, x1, self.num_outputs, default_budget(self.network.device))
        return dense_ntk(self.network, x1, x2, factored or False)

    def _factored(self) -> LayerKernel | None:
        """The layer-factor kernel when it costs at most half of p per pair of rows (decided once), else None."""
        if self._layer_kernel is None:
            self._layer_kernel = cheap_layer_kernel(self.network, self.train_x) or False
        return self._layer_kernel or None

    def _update_delta_from_system(self) -> None:
        system, n, k = self.kernel_system(), length(self.train_x), self.num_outputs
        cotangent = system.solution.to(self.network.dtype).reshape(1, n, k)
        with torch.no_grad():
            self.delta = self.network.vjp(self.train_x, cotangent)[0]

    # --- prediction ----------------------------------------------------------------------------------
    @overload
    def predict(self, x: Inputs, variance: Literal[False] = False) -> Tensor: ...

    @overload
    def predict(self, x: Inputs, variance: Literal[True]) -> Prediction: ...

    def predict(self, x: Inputs, variance: bool = False) -> Tensor | Prediction:
        """f_lin(x) (m, C) at inputs x (m, ...); with ``variance=True`` a :class:`Prediction` whose mean is
        f_lin(x) and whose variance (m, C) is that of the NTK-GP whose posterior mean the LQF minimiser is — σ²/s² =
        λ/2 — at the overall scale its evidence prefers: σ² = t/2, s² = t/λ with t = :meth:`variance_scale`
        (:class:`~ntkgp.NTKGP`; MSE loss and λ > 0). Units: those of f_lin² — the targets' squared, so for MSE
        classification of (α·one-hot)², α = 15 by default. The ratio is λ's: a small λ is a broad prior, and away
        from the data the variance approaches the prior's t·K(x, x)/λ — on MobileNetV2's last block with the default
        λ = 1e-4 and 50 Fashion-MNIST images, t = 1.07 and variances of 2.7e5 to 1.4e7 (targets ±15). For variances
        the data calibrate, fit both scales by the evidence: ``NTKGP(model, x, targets).fit()``."""
        self._fitted("predict()")
        x = check_inputs(x, self.network.dtype, "x", self.network.device, like=self.structure)
        mean = self._linearised(x)
        if not variance:
            check_prediction(x, mean=mean)
            return mean
        if self.loss != "mse" or self.weight_decay == 0:
            raise ValueError(
                "variance=True is the NTK-GP's, defined for the MSE loss with weight_decay > 0; for "
                "cross-entropy use ntkgp.Laplace(model, 'classification')"
            )
        if self._gp is None:
            targets = self.train_targets.squeeze(-1) if self.num_outputs == 1 else self.train_targets
            self._gp = NTKGP(self.network, self.train_x, targets, noise=0.5, outputscale=1 / self.weight_decay)
        var = self.variance_scale() * self._gp.predict(x).variance.reshape(mean.shape)
        check_prediction(x, mean=mean, variance=var)
        return Prediction(mean, var)

    def variance_scale(self) -> float:
        """t = 2·L(θ)/N (N = n·C), the scale of the GP with covariance t·(K/λ + I/2) that maximises its evidence
        for the residuals r = targets − f(X; θ0): rᵀ(K/λ + I/2)⁻¹r / N, which is 2·L at the exact minimiser (L, the
        objective, equals (λ/2)·rᵀ(K + (λ/2)I)⁻¹r there). After SGD L(θ) is above its minimum, so t is too: the
        variance errs large. One JVP over the training data."""
        return 2 * self.objective() / (length(self.train_x) * self.num_outputs)

    def predict_proba(self, x: Inputs) -> Tensor:
        """softmax(f_lin(x)) (m, C) (classification)."""
        self._classification_only("predict_proba")
        return torch.softmax(self.predict(x), -1)

    def classify(self, x: Inputs) -> Tensor:
        """argmax_c f_lin(x)_c (m,) labels (classification)."""
        self._classification_only("classify")
        return self.predict(x).argmax(-1)

    def _classification_only(self, name: str) -> None:
        if self.task != "classification":
            raise ValueError(f"{name}() is for classification; this LQF does regression: use predict()")

    # --- online updates ------------------------------------------------------------------------------
    def update(self, new_x: Inputs, new_y: Tensor, epochs: int | None = None, lr: float | None = None) -> LQF:
        """Add inputs (m, ...) with labels/targets and re-solve as the last fit did: the closed form by bordering
        the function-space Cholesky factor with the new rows (:class:`KernelSystem`; no refactorisation), SGD
        warm-started from the current δ on the union (``epochs``, ``lr``: default those of the last fit; K-FAC
        recomputed on the union). Returns self."""
        self._fitted("update()")
        new_x = check_inputs(new_x, self.network.dtype, "new_x", self.network.device, like=self.structure)
        data = self._minibatches(new_x, new_y, None, None, self.structure)
        x_new, targets_new, outputs_new = data.tensors()
        targets_new = self._targets(targets_new, self.num_outputs)
        closed_form = self._fit_options["solver"] == "closed_form"
        if closed_form and self._system is not None:  # bordered first: a singular system changes nothing
            cross, corner = self.kernel_matrix(self.train_x, x_new), self.kernel_matrix(x_new)
            self._system.add(cross, corner, (targets_new - outputs_new).reshape(-1))
        kept = self._fitted()
        kept.x, kept.targets = cat([kept.x, x_new]), torch.cat([kept.targets, targets_new])
        kept.outputs = torch.cat([kept.outputs, outputs_new])
        self._kfac = self._gp = None
        if closed_form:
            return self.solve()
        options = self._fit_options
        generator = torch.Generator().manual_seed(len(self.history))
        union = Minibatches(
            self.network,
            self.task,
            self.train_x,
            self._union_labels(),
            options["batch_size"],
            generator,
            like=self.structure,
            outputs=self.train_outputs,
        )
        return self._sgd(
            union,
            options["epochs"] if epochs is None else epochs,
            options["lr"] if lr is None else lr,
            options["progress"],
            None,
        )

    def _union_labels(self) -> Tensor:
        """The stored targets in the form the minibatches take (labels for classification)."""
        if self.task == "classification" and self.loss == "mse":
            return self.train_targets.argmax(-1)
        return self.train_targets

    # --- interpretability ----------------------------------------------------------------------------
    def leave_one_out(self) -> Tensor:
        """f_{−i}(x_i) (n, C): the prediction at every training input by the exact minimiser fitted without it,
        in closed form from the C × C diagonal blocks of (K + (λ/2)I)⁻¹ (MSE loss; of the exact minimiser also
        when the fit was by SGD)."""
        system = self.kernel_system()
        return self.train_targets - system.leave_one_out_residuals().to(self.network.dtype)

    def influence(self, x_test: Inputs, method: str = "exact") -> Tensor:
        """f(x_test) − f_{−i}(x_test) (m, n, C) for every training sample i.

        ``"exact"``: the rank-C downdate of the function-space solve, K(x*, X) V (one NTK product with n
        columns, or K(x*, X) from layer factors when they are cheaper: :meth:`kernel_matrix`;
        :meth:`KernelSystem.downdate_directions`), for the exact minimiser. ``"kfac"``: the paper's
        eq. (8) with K-FAC for the inverse curvature, at the current δ (:func:`~ntkgp.lqf.influence.kfac_influence`).
        """
        check_choice(method, "method", ("exact", "kfac"))
        self._fitted("influence()")
        if self.loss != "mse":
            raise ValueError(
                "influence and informativeness are those of the MSE (linear-quadratic) model; this LQF "
                "uses loss='cross_entropy'"
            )
        x_test = check_inputs(x_test, self.network.dtype, "x_test", self.network.device, like=self.structure)
        if method == "kfac":
            precondition = self._kfac or KFACPreconditioner(self.network, self.train_x, self.weight_decay, "mse")
            residual = self.train_targets - self._train_linearised()
            return kfac_influence(self.network, self.train_x, x_test, residual, precondition)
        system, k = self.kernel_system(), self.num_outputs
        directions = system.downdate_directions().to(self.network.dtype)  # (N, n)
        if self._factored() is not None:  # K(x*, X) from layer factors, then n columns of it
            change = self.kernel_matrix(x_test, self.train_x) @ directions
        else:
            with torch.no_grad():
                change = NTKOperator.of(x_test, self.train_x, network=self.network, num_outputs=k) @ directions
        return change.reshape(length(x_test), k, -1).permute(0, 2, 1)

    def informativeness(self, x_val: Tensor, method: str = "exact") -> Tensor:
        """F-SI (paper eq. 9) of every training sample (n,): the mean over x_val (m, ...) of
        ‖f(x) − f_{−i}(x)‖², from :meth:`influence`."""
        return self.influence(x_val, method).square().sum(-1).mean(0)

    # --- conditioning --------------------------------------------------------------------------------
    def hessian_ritz_values(self, steps: int = 50, preconditioned: bool = False) -> Tensor:
        """Ritz values (ascending, float64) of the Hessian H of the objective at θ0 — 2(JᵀJ + (λ/2)I) for MSE,
        Jᵀ(diag π − ππᵀ)J + λI for cross-entropy — or, ``preconditioned``, of P⁻¹H with P = K + λI the K-FAC
        preconditioner (eigenvalues of the pencil (H, P)); ``steps`` Lanczos steps. H's condition number is
        that of F + (λ/2)I (they differ by the factor 2)."""
        self._fitted("hessian_ritz_values()")
        steps = as_count(steps, "steps")
        precondition = None
        if preconditioned:
            net = self.network
            precondition = self._preconditioner() or KFACPreconditioner(net, self.train_x, self.weight_decay, self.loss)
        return self._ritz_values(self.train_x, 1.0, steps, precondition)

    def _ritz_values(self, x: Inputs, scale: float, steps: int, precondition: KFACPreconditioner | None) -> Tensor:
        """Ritz values (ascending) of scale·∇²(Σ_x ℓ) + λI at θ0 on inputs x, or of P⁻¹ times it (K-FAC's P)."""
        net = self.network
        likelihood, factor = ("gaussian", 2.0) if self.loss == "mse" else ("categorical", 1.0)
        fisher = FisherOperator.of(x, network=net, likelihood=likelihood, method="exact", epsilon=1.0)

        def apply(v: Tensor) -> Tensor:
            with torch.no_grad():
                return scale * factor * (fisher @ v.unsqueeze(-1)).squeeze(-1) + self.weight_decay * v

        if precondition is None:
            return ritz_values(apply, net.num_params, steps, net.dtype, net.device)
        return ritz_values(
            apply,
            net.num_params,
            steps,
            net.dtype,
            net.device,
            metric=precondition.curvature,
            solve=lambda v: precondition @ v,
        )
