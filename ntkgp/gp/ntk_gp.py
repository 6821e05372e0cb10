"""NTKGP: exact GP regression with the finite NTK of a pretrained network, in function or parameter space.

Prior f ~ GP(m, s² K) with K = J Jᵀ and m = f(·; θ0) (``mean="network"``) or 0 (``mean="zero"``),
Gaussian noise σ² shared across outputs. Function space solves with s²K + σ²I (n·C × n·C): when the
solver is dense, through the float64 eigendecomposition of K (the one the evidence uses) and one lazy
cross-kernel product K(X*, X)[a, U]; beyond, GPyTorch's exact GP on the lazy :class:`JacobianKernel` (CG,
LOVE). Parameter space solves with JᵀJ + (σ²/s²)I (p × p) through :mod:`ntkgp.gp.parameter_space`. Both
give the same numbers; pick the smaller of n·C and p. Directions whose eigenvalue the network's dtype
cannot resolve at the current σ²/s² are numerically zero in both (:func:`ntkgp.gp.parameter_space.resolved`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import gpytorch
import torch
from gpytorch.constraints import GreaterThan
from linear_operator.operators import (
    AddedDiagLinearOperator,
    ConstantDiagLinearOperator,
    LinearOperator,
    MatmulLinearOperator,
    SumLinearOperator,
)
from linear_operator.utils.errors import NotPSDError
from torch import Tensor, nn

from ..distributed import global_rows
from ..functional import FunctionalNetwork, as_functional_network
from ..inputs import Inputs, Unpack, check_inputs, gather, inputs_at, length, pack, requires_grad, structure
from ..memory import check_fits, default_budget
from ..operators.gram_operator import GramOperator
from ..operators.layer_kernel import LayerFactors, LayerKernel
from ..operators.ntk_operator import NTKOperator
from ..progress import progress_bar
from ..validation import (
    as_count,
    as_positive_float,
    check_choice,
    check_finite,
    check_not_sharded,
    check_prediction,
    check_targets,
)
from .jacobian_kernel import JacobianKernel
from .mean import NetworkMean
from .parameter_space import (
    GramSpectrum,
    gram_spectrum,
    kernel_of_rows,
    ntk_eigh,
    resolved,
    resolved_eigh,
    spectral_log_marginal_likelihood,
    spectral_solve,
    spectral_weights,
    train_jacobian,
)
from .solver import Solver, as_solver
from .variance_projections import PATHS, choose_path, parameter_projections, tangent_projections

__all__ = ["NTKGP", "Prediction"]


@dataclass
class Prediction:
    """Predictive marginals: ``mean`` and ``variance`` of shape (m,) for C = 1, (m, C) otherwise.

    ``variance_error``: for a low-rank variance, its largest relative error against the exact variance on the
    probe inputs (None when the variance is exact); ``rank``: the directions it used. ``covariance``: with
    ``predict(x, full_cov=True)``, the joint covariance (m·C, m·C), outputs interleaved (row i·C + c is output c
    of input i), whose diagonal is ``variance``; None otherwise.
    """

    mean: Tensor
    variance: Tensor
    variance_error: float | None = None
    rank: int | None = None
    covariance: Tensor | None = None

    @property
    def stddev(self) -> Tensor:
        return self.variance.clamp_min(0).sqrt()

    def confidence_region(self, z: float = 1.959964) -> tuple[Tensor, Tensor]:
        """(lower, upper) of the central interval mean ± z·stddev (95% by default; z > 0)."""
        z = as_positive_float(z, "z")
        return self.mean - z * self.stddev, self.mean + z * self.stddev


class _ExactNTKModel(gpytorch.models.ExactGP):
    def __init__(
        self, train_x: Tensor, train_y: Tensor, likelihood: Any, mean_module: Any, covar_module: Any, num_outputs: int
    ):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module, self.covar_module, self.num_outputs = mean_module, covar_module, num_outputs

    def forward(self, x: Tensor) -> Any:
        mean, covar = self.mean_module(x), self.covar_module(x)
        if self.num_outputs == 1:
            return gpytorch.distributions.MultivariateNormal(mean, covar)
        return gpytorch.distributions.MultitaskMultivariateNormal(mean, covar, interleaved=True)


class _ZeroMean(gpytorch.means.Mean):
    def __init__(self, num_outputs: int):
        super().__init__()
        self.num_outputs = num_outputs

    def forward(self, x: Tensor) -> Tensor:
        shape = (length(x),) if self.num_outputs == 1 else (length(x), self.num_outputs)
        return torch.zeros(shape, dtype=x.dtype, device=x.device)


class NTKGP(nn.Module):
    """Exact NTK-GP regression on a pretrained network.

    Args:
        model: the pretrained network in eval mode (or a :class:`FunctionalNetwork`); inputs (n, ...) ->
            outputs (n,) or (n, C). Not modified; snapshotted as :class:`FunctionalNetwork` describes.
        train_x: n inputs (:mod:`ntkgp.inputs`), or a DataLoader of (x, y) batches (read once and concatenated).
        train_y: (n,) for C = 1, (n, C) otherwise; None with a DataLoader.
        params: the parameters to linearise in (names or module prefixes; default all trainable).
        space: ``"auto"`` (default: ``"parameter"`` when p ≤ N = n·C or the inputs are sharded, ``"function"``
            otherwise — the smaller Gram; both give the same posterior), ``"function"`` (N × N solves) or
            ``"parameter"`` (p × p solves).
        mean: ``"network"`` (prior mean f(x; θ0), the first-order Taylor model) or ``"zero"``
            (the Jacobian alone as features).
        noise: σ², shared by all outputs; learned by :meth:`fit` when None.
        outputscale: s², the prior scale of the kernel; learned by :meth:`fit`.
        solver: a :class:`Solver` or its method name (default ``"auto"``: Cholesky up to 2048 rows,
            preconditioned CG beyond).
        chunk_size: vectors pushed through the network at once (default 32).
        memory_budget: bytes one step of a prediction or of the kernel's densification may hold (default half of
            the device's available memory): the test-Jacobian path and K(X, X) from per-sample Jacobians are
            used only within it (:mod:`ntkgp.gp.variance_projections`); an operation estimated not to fit raises a
            MemoryError saying which knob to turn.
        progress: tqdm bars over the test inputs and tangents of a prediction (shown after 1 s).
        cache_linearisation: inside CG and Lanczos, reuse one forward pass at the training inputs
            (``FunctionalNetwork.linearised``) when it fits ``memory_budget`` (default True).

    A GPyTorch model as GPyTorch's own are used: ``gp(x)`` is the joint posterior at x (:meth:`forward`),
    ``gp.likelihood(gp(x))`` adds the noise, :meth:`predict` gives the marginals (``full_cov=True``: the joint
    covariance too) and :meth:`posterior` BoTorch's posterior; ``gp.noise``, ``gp.outputscale`` are plain numbers.
    ``.to(dtype/device)``, ``.double()``, ``.float()`` convert the network snapshot with the GP.
    """

    train_targets: Tensor  # (n, C), a buffer
    _train_inputs: Tensor  # a buffer: train_x itself, or packed (ntkgp.inputs.pack) when it is not one float tensor

    #: Test inputs on which a low-rank variance is also computed exactly, to choose its rank and report its error
    #: (8 understated the error over 200 MobileNetV2 test images thirteenfold: 9.8e-3 against 0.13).
    PROBES = 64

    def __init__(
        self,
        model: nn.Module | FunctionalNetwork,
        train_x: Inputs | torch.utils.data.DataLoader,
        train_y: Tensor | None = None,
        params: Sequence[str] | str | None = None,
        space: str = "auto",
        mean: str = "network",
        noise: float | None = None,
        outputscale: float = 1.0,
        solver: Solver | str | None = None,
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        progress: bool = True,
        cache_linearisation: bool = True,
    ):
        super().__init__()
        check_choice(space, "space", ("auto", "function", "parameter"))
        check_choice(mean, "mean", ("network", "zero"))
        noise = as_positive_float(noise, "noise", allow_none=True)
        outputscale = as_positive_float(outputscale, "outputscale")
        self.solver = as_solver(solver)
        self.network = as_functional_network(model, params, chunk_size)
        self.memory_budget = (
            default_budget(self.network.device) if memory_budget is None else as_count(memory_budget, "memory_budget")
        )
        for name, flag in (("progress", progress), ("cache_linearisation", cache_linearisation)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.progress, self.cache_linearisation = progress, cache_linearisation
        if isinstance(train_x, torch.utils.data.DataLoader):
            train_x, train_y = gather(train_x, train_y, self.network.dtype, self.network.device)
        train_x = check_inputs(train_x, self.network.dtype, "train_x", self.network.device)
        if space == "auto":
            size = global_rows(self.network, train_x) * self.network.num_outputs(train_x)
            sharded = self.network.is_sharded(train_x)
            space = "parameter" if self.network.num_params <= size or sharded else "function"
        if space == "function":
            check_not_sharded(self.network, train_x, "NTKGP in function space (space='parameter' runs on shards)")
        self.num_outputs = self.network.num_outputs(train_x)
        targets = check_targets(train_y, length(train_x), self.num_outputs, self.network.dtype)
        self.space, self.mean_kind = space, mean
        self.train_structure = structure(train_x)
        floating = isinstance(train_x, Tensor) and train_x.is_floating_point()
        #: GPyTorch's (n, d) float inputs -> the network's (None: a reshape to the training inputs' shape)
        self._unpack = None if floating else Unpack(self.train_structure)
        held = train_x if isinstance(train_x, Tensor) and floating else pack(train_x, self.network.dtype)
        self.register_buffer("_train_inputs", held, persistent=False)
        self.learn_noise = noise is None

        # converted before any value is set: GPyTorch's setters go through a tensor of the module's dtype (and a float
        # through torch's default dtype), which held s² = 1 − 4.5e-10 and σ² = 0.1 + 1.5e-9 for a float64 network
        as_network_tensor = partial(torch.tensor, dtype=self.network.dtype, device=self.network.device)
        shape = None if self._unpack else self.train_structure.shapes[0]
        kernel = gpytorch.kernels.ScaleKernel(JacobianKernel(self.network, input_shape=shape, inputs=self._unpack))
        kernel = kernel.to(device=self.network.device, dtype=self.network.dtype)
        kernel.outputscale = as_network_tensor(outputscale)
        floor = 1e-6 if noise is None else min(1e-6, noise / 2)
        self._noise_floor = floor
        if self.num_outputs == 1:
            likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=GreaterThan(floor))
        else:
            likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(
                num_tasks=self.num_outputs, rank=0, has_task_noise=False, noise_constraint=GreaterThan(floor)
            )
        likelihood = likelihood.to(device=self.network.device, dtype=self.network.dtype)
        if noise is None:
            likelihood.noise = as_network_tensor(max(1e-2 * self._variance_of(targets), 2 * floor))
        else:
            likelihood.noise = as_network_tensor(noise)
            likelihood.raw_noise.requires_grad_(False)
        mean_module = (
            NetworkMean(self.network, shape, inputs=self._unpack) if mean == "network" else _ZeroMean(self.num_outputs)
        )
        y = targets.squeeze(-1) if self.num_outputs == 1 else targets
        self.gp = _ExactNTKModel(self._packed(train_x), y, likelihood, mean_module, kernel, self.num_outputs)
        self.register_buffer("train_targets", targets, persistent=False)  # (n, C)
        self._clear_caches()
        _ = self._residual  # checks the network's outputs at train_x now, not at the first prediction

    @property
    def train_x(self) -> Inputs:
        """The training inputs (n of them, as given: a tensor, a tuple or a dict; :mod:`ntkgp.inputs`)."""
        return self._train_inputs if self._unpack is None else self._unpack(self._train_inputs)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-input shape of one-tensor training inputs."""
        return self.train_structure.shapes[0]

    def _packed(self, x: Inputs) -> Tensor:
        """GPyTorch's (n, d) float inputs for inputs x of the training inputs' structure."""
        if self._unpack is None:
            assert isinstance(x, Tensor)
            return x.reshape(length(x), -1)
        return pack(x, self.network.dtype)

    def _clear_caches(self) -> None:
        self._residual_cache: Tensor | None = None
        self._ntk: tuple[Tensor, Tensor, float] | None = None
        self._jacobian: Tensor | None = None  # J(X) (N × p), kept when K(X, X) was formed from it
        self._layer_kernel: tuple[LayerKernel | Literal[False], float] | None = None  # (kernel or False, cost / p)
        self._factors: LayerFactors | None = None  # the layer factors of train_x
        self._spectrum: GramSpectrum | None = None
        self._gradient: Tensor | None = None
        self._terms: tuple[Tensor, Tensor, Tensor, float] | None = None
        self.gp.prediction_strategy = None

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> Any:
        """``.to``, ``.double()``, …: the GP's tensors, the network snapshot (through the kernel and the mean)
        and the training data are converted; caches computed in the old dtype are dropped."""
        super()._apply(fn, *args, **kwargs)  # the kernel and the mean convert the shared network snapshot
        self._clear_caches()
        return self

    # --- hyperparameters -------------------------------------------------------------------------
    @property
    def noise(self) -> float:
        """σ², a plain number (what :meth:`fit` learned or what was given)."""
        return float(self._noise.detach())

    @property
    def outputscale(self) -> float:
        """s², a plain number."""
        return float(self._outputscale.detach())

    @property
    def _noise(self) -> Tensor:
        """σ² (scalar tensor, differentiable in GPyTorch's raw parameter)."""
        return self.gp.likelihood.noise.reshape(())

    @property
    def _outputscale(self) -> Tensor:
        """s² (scalar tensor, differentiable in GPyTorch's raw parameter)."""
        return self.gp.covar_module.outputscale.reshape(())

    @property
    def likelihood(self) -> Any:
        """GPyTorch's Gaussian likelihood (multitask for C > 1): ``gp.likelihood(gp(x))`` adds σ² to ``gp(x)``."""
        return self.gp.likelihood

    def _prior_mean(self, x: Inputs) -> Tensor:
        """m(x) as (m, C)."""
        out = self.network(x)
        return out if self.mean_kind == "network" else torch.zeros_like(out)

    # --- cached pieces: they depend on the data, not on the hyperparameters ----------------------
    @property
    def _residual(self) -> Tensor:
        """r = y − m(X) (n·C,), interleaved."""
        if self._residual_cache is None:
            targets = self.train_targets
            prior = self.network.outputs(self.train_x, "train_x") if self.mean_kind == "network" else 0 * targets
            self._residual_cache = (targets - prior).reshape(-1)
        return self._residual_cache

    def _residual_summary(self) -> tuple[Tensor, int]:
        """(‖r‖² float64, N = n·C) over every rank's shard when train_x is one (``FunctionalNetwork.shard``)."""
        r = self._residual.double()
        total = self.network.sum_over_shards(self.train_x, torch.stack([r.square().sum(), r.new_tensor(r.numel())]))
        return total[0], int(total[1].item())

    def _variance_of(self, targets: Tensor) -> float:
        """The variance of all target entries (over the ranks too), 1 for a single entry."""
        t = targets.double().reshape(-1)
        total = self.network.sum_over_shards(
            self.train_x, torch.stack([t.sum(), t.square().sum(), t.new_tensor(t.numel())])
        )
        count = float(total[2])
        return float((total[1] - total[0] ** 2 / count) / (count - 1)) if count > 1 else 1.0

    def _gram(self) -> GramOperator:
        return GramOperator.of(self.train_x, network=self.network)

    def _ntk_eigenpairs(self) -> tuple[Tensor, Tensor, float]:
        """All eigenpairs of the dense NTK K(X, X) in float64 and the floor of the network's dtype."""
        if self._ntk is None:
            size = self._residual.numel()
            check_fits(
                3 * size**2 * 8,
                self.memory_budget,
                f"the dense float64 eigendecomposition of K(X, X) ({size} × {size})",
                "pass solver='cg' (no N × N matrix), use fewer training points, or raise memory_budget",
            )
            factored = self._factored()
            if factored is not None:  # K(X, X) from layer factors: no Jacobian of the factored layers
                factors = self._train_factors()
                kernel = factored.kernel(factors, factors, self._block_elements())
                self._ntk = resolved_eigh(
                    check_finite(
                        kernel.detach(),
                        "the NTK K(X, X)",
                        "the network's Jacobian at the training inputs is too large: rescale the inputs",
                    )
                )
                return self._ntk
            with torch.no_grad():
                self._jacobian = train_jacobian(self.network, self.train_x, self.num_outputs, self.memory_budget)
                if self._jacobian is None:
                    self._ntk = ntk_eigh(self.network, self.train_x, self.num_outputs)
                else:
                    self._ntk = resolved_eigh(kernel_of_rows(self._jacobian))
        return self._ntk

    def _factored(self, required: bool = False) -> LayerKernel | None:
        """The layer-factor kernel (:mod:`ntkgp.operators.layer_kernel`) in function space when it is cheaper than
        per-sample Jacobians (its cost per pair of rows at most half of p) or ``required``; else None."""
        if self._layer_kernel is None:
            candidate = LayerKernel(self.network) if self.space == "function" else None
            chosen: LayerKernel | Literal[False] = False
            cost = float("inf")
            if candidate is not None and candidate.layers:
                try:
                    cost = candidate.cost(self.train_x)
                    chosen = candidate if candidate.agrees(self.train_x) else False
                except NotImplementedError:  # a shared layer
                    cost = float("inf")
            self._layer_kernel = (chosen, cost)
        kernel, cost = self._layer_kernel
        if required and kernel is False:
            raise ValueError(
                "variance_path='kernel' needs function space and a stock Linear or ungrouped Conv2d layer "
                "in scope that runs once per forward pass and agrees with NTK products; use "
                "variance_path='jacobians' or 'tangents'"
            )
        if kernel is False or (cost > 0.5 and not required):
            return None
        if self._factors is None:
            with torch.no_grad():
                self._factors = kernel.factors(self.train_x)
        return kernel

    def _train_factors(self) -> LayerFactors:
        """The layer factors of train_x, which :meth:`_factored` computes with the kernel."""
        if self._factors is None:
            raise RuntimeError("the layer factors of train_x are made by _factored() first")
        return self._factors

    def _block_elements(self) -> int:
        """Elements of the largest intermediate of a layer-factor kernel block: 2^25, or a quarter of the budget."""
        return max(1, min(2**25, self.memory_budget // (4 * self.network.theta0.element_size())))

    def _kernel_projections(self, kernel: LayerKernel, x: Inputs, columns: Tensor) -> tuple[Tensor, Tensor]:
        """(K(x, X) columns (m·C, k), diag K(x, x) (m·C,)) from layer factors, test inputs in chunks (tqdm bar)."""
        cross, diagonal, step = [], [], max(1, self.network.chunk_size * 8)
        with torch.no_grad():
            self.network.features(x)  # the frozen prefix once for all of x: its chunks are row blocks of it
            for start in progress_bar(range(0, length(x), step), desc="test kernel", enabled=self.progress):
                factors = kernel.factors(inputs_at(x, slice(start, start + step)))
                cross.append(kernel.kernel(factors, self._train_factors(), self._block_elements()) @ columns)
                diagonal.append(kernel.diagonal_blocks(factors).diagonal(dim1=-2, dim2=-1).reshape(-1))
        return torch.cat(cross), torch.cat(diagonal)

    def _parameter_cache(self) -> tuple[GramSpectrum, Tensor]:
        """(spectrum of JᵀJ, Jᵀ r (p,))."""
        if self._spectrum is None:
            with torch.no_grad(), self._linearised():
                self._spectrum = gram_spectrum(
                    self.network, self.train_x, self.num_outputs, self.solver, budget=self.memory_budget
                )
                n, c = length(self.train_x), self.num_outputs
                self._gradient = self.network.vjp(self.train_x, self._residual.reshape(1, n, c))[0]
        if self._gradient is None:
            raise RuntimeError("Jᵀr is computed with the spectrum")
        return self._spectrum, self._gradient

    def _spectral_terms(self) -> tuple[Tensor, Tensor, Tensor, float] | None:
        """(λ, Qᵀ Jᵀ r, ‖Jᵀ r‖², floor) for the closed-form evidence; None when function space runs CG.

        From all eigenpairs of the smaller Gram in float64 whenever they are at hand (the NTK's as √λ·Uᵀr,
        no division by λ; G's as Qᵀ Jᵀr), with the floor below which eigenvalues are not resolved
        (:mod:`ntkgp.gp.parameter_space`); from the Lanczos Ritz pairs otherwise. (From Q = JᵀU/√λ and a
        float32 Jᵀr the evidence was 0.3 % off in float32.)
        """
        if self._terms is None:
            residual = self._residual.double()
            if self.space == "parameter":
                spectrum, b = self._parameter_cache()
                if spectrum.ntk is not None:
                    evals, evecs = spectrum.ntk
                    projected = evals.sqrt() * (evecs.mT @ residual)
                elif spectrum.gram is not None:
                    evals, evecs = spectrum.gram
                    projected = evecs.mT @ b.double()
                else:
                    evals, projected = spectrum.eigenvalues, spectrum.eigenvectors.mT @ b
                    self._terms = (evals, projected, b.square().sum(), 0.0)
                    return self._terms
                floor = spectrum.floor
            elif self.solver.dense(self._residual.numel()):
                evals, evecs, floor = self._ntk_eigenpairs()
                projected = evals.sqrt() * (evecs.mT @ residual)
            else:
                return None
            self._terms = (evals, projected, projected.square().sum(), floor)
        return self._terms

    # --- marginal likelihood and fitting -----------------------------------------------------------
    def log_marginal_likelihood(self) -> Tensor:
        """log p(train_y) under the current hyperparameters (a differentiable scalar, not divided by n).

        Closed form from the spectrum when the solver is dense (or in parameter space), in float64;
        GPyTorch's exact marginal likelihood (CG and stochastic Lanczos quadrature) in function space otherwise.
        """
        return self._evidence().to(self.network.dtype)

    def _evidence(self) -> Tensor:
        """:meth:`log_marginal_likelihood`, in float64 when it has the closed form (what ``fit`` optimises: in
        float32 the value would round away the changes L-BFGS looks for)."""
        terms = self._spectral_terms()
        if terms is not None:
            evals, projected, b_sq, floor = terms
            r_sq, num_data = self._residual_summary()
            return spectral_log_marginal_likelihood(
                evals, projected, b_sq, r_sq, num_data, self._outputscale, self._noise, floor
            )
        self.gp.train()
        with self.solver.settings(), self._memoized(), self._explained_singularity(), self._linearised():
            prior = self.gp(*self.gp.train_inputs)
            return self.gp.likelihood(prior).log_prob(self.gp.train_targets).sum()

    def fit(self, max_iter: int = 50) -> NTKGP:
        """Learn the output scale (and the noise, if it was not given) by the exact marginal likelihood.

        With the closed-form evidence (dense solves, or parameter space) the search starts from the best
        point of a log-spaced grid, evaluated in one vectorised pass; then L-BFGS with strong-Wolfe line
        search refines the raw (unconstrained) hyperparameters, at most ``max_iter`` iterations. Returns self.
        """
        max_iter = as_count(max_iter, "max_iter")
        terms = self._spectral_terms()
        if terms is not None:
            self._start_from_grid(terms)
        raw = [self.gp.covar_module.raw_outputscale] + ([self.gp.likelihood.raw_noise] if self.learn_noise else [])
        optimizer = torch.optim.LBFGS(
            raw,
            lr=1.0,
            max_iter=max_iter,
            history_size=10,
            tolerance_grad=1e-4,
            tolerance_change=1e-7,
            line_search_fn="strong_wolfe",
        )
        scale = float(self._residual_summary()[1])

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = -self._evidence() / scale
            if not torch.isfinite(loss):
                raise FloatingPointError(self._non_finite_evidence_message())
            loss.backward()
            return loss

        with self._memoized(), self._linearised():
            optimizer.step(closure)
        return self

    def _memoized(self) -> AbstractContextManager[Any]:
        """Within: the dense K(X, X) is computed once and reused while the hyperparameters change, when the solver is
        dense; a no-op for CG, which never forms an N × N matrix."""
        if self.solver.dense(self._residual.numel()):
            return self.gp.covar_module.base_kernel.memoize()
        return nullcontext()

    def _linearised(self) -> AbstractContextManager[Any]:
        """Within: products at the training inputs reuse one forward pass (FunctionalNetwork.linearised), when
        iterative solvers will run (CG or Lanczos) and it fits the memory budget; a no-op otherwise."""
        iterative = self.space == "parameter" or not self.solver.dense(self._residual.numel())
        wanted = iterative and self.cache_linearisation
        return self.network.linearised(self.train_x, budget=self.memory_budget if wanted else 0)

    def _non_finite_evidence_message(self) -> str:
        state = (
            f"at output scale s² = {self.outputscale:.3g} and noise σ² = {self.noise:.3g}"
            f" ({'learned' if self.learn_noise else 'fixed'})"
        )
        if self.learn_noise:
            return (
                f"the marginal likelihood became non-finite while fitting, {state}; pass a fixed noise, or rescale "
                "the targets"
            )
        return (
            f"the marginal likelihood became non-finite while fitting, {state}: s²K + σ²I is numerically "
            f"singular in {self.network.dtype} (repeated or nearly repeated inputs with a tiny noise?); raise the "
            "fixed noise, remove duplicate inputs, or use float64"
        )

    @contextmanager
    def _explained_singularity(self) -> Iterator[None]:
        """Re-raise GPyTorch's NotPSDError (a Cholesky factor that failed even with jitter) saying why and what
        to do."""
        try:
            yield
        except NotPSDError as err:
            raise FloatingPointError(
                f"s²K + σ²I ({self._residual.numel()} × {self._residual.numel()}) is numerically singular in "
                f"{self.network.dtype} at s² = {self.outputscale:.3g}, σ² = {self.noise:.3g}: the "
                "noise is below what this dtype resolves for this kernel, as with repeated or nearly repeated inputs. "
                "Raise the noise, remove duplicate inputs, use float64, or a dense solver (which treats unresolved "
                "directions as numerically zero)"
            ) from err

    def _start_from_grid(self, terms: tuple[Tensor, Tensor, Tensor, float], points: int = 25) -> None:
        """Set the hyperparameters to the best of a log grid scaled to the residuals and the kernel's trace."""
        r_sq, num_data = self._residual_summary()
        level = (r_sq / num_data).clamp_min(1e-12)
        trace = terms[0].sum().double().clamp_min(1e-12)
        grid = torch.logspace(-3, 2, points, dtype=level.dtype, device=level.device)
        scales = grid * level * num_data / trace
        if self.learn_noise:
            noises = torch.logspace(-6, 0.5, points, dtype=level.dtype, device=level.device) * level
            noises = noises.clamp_min(2 * self._noise_floor)
        else:
            noises = self._noise.detach().double().reshape(1)
        with torch.no_grad():
            evals, projected, b_sq, floor = terms
            values = spectral_log_marginal_likelihood(
                evals, projected, b_sq, r_sq, num_data, scales.unsqueeze(-1), noises, floor
            )
            values = torch.nan_to_num(values, nan=-math.inf)
            if not torch.isfinite(values).any():
                raise FloatingPointError(self._non_finite_evidence_message())
            best = torch.nonzero(values == values.max())[0]
            self.gp.covar_module.outputscale = scales[best[0]].to(self.network.dtype)
            if self.learn_noise:
                self.gp.likelihood.noise = noises[best[1]].to(self.network.dtype)

    # --- prediction ------------------------------------------------------------------------------
    def predict(
        self,
        x: Inputs,
        observation_noise: bool = False,
        variance: str = "exact",
        rank: int | None = None,
        tolerance: float = 1e-2,
        variance_path: str = "auto",
        full_cov: bool = False,
    ) -> Prediction:
        """Posterior marginals of the latent function at x (m, ...) (plus σ² if ``observation_noise``), and with
        ``full_cov=True`` their joint covariance too (``Prediction.covariance``, dense (m·C, m·C); ``variance`` must
        be ``"exact"``). For the lazy joint posterior as a GPyTorch distribution call the model: ``gp(x)``.

        ``variance``: ``"exact"``, or ``"low_rank"``: the variance reduction from the ``rank`` leading directions
        of the training data only (eigenvectors of K(X, X), or of JᵀJ in parameter space, by eigenvalue) — the
        approximation LOVE makes with Lanczos; an upper bound on the exact variance. Without ``rank``, the
        smallest rank whose relative variance error is at most ``tolerance`` on up to ``PROBES`` = 64 probe inputs
        (the first of x, where it is computed exactly too); ``Prediction.variance_error`` reports that error and
        ``Prediction.rank`` the rank. The mean is exact in both. ``variance_path``: ``"auto"`` (the cheapest exact
        path by a count of flops and memory), ``"kernel"`` (function space: K(x, X) and diag K(x, x) from layer
        factors, :mod:`ntkgp.operators.layer_kernel`; not differentiable in x, so "auto" takes it only for inputs
        that do not require grad), ``"jacobians"`` or ``"tangents"`` (:mod:`ntkgp.gp.variance_projections`). The mean
        is differentiable with respect to x. Shapes (m,) for C = 1, (m, C) otherwise.
        """
        x = check_inputs(x, self.network.dtype, "x", self.network.device, like=self.train_structure)
        if not isinstance(observation_noise, bool):
            raise TypeError(f"observation_noise must be True or False, got {observation_noise!r}")
        check_choice(variance, "variance", ("exact", "low_rank"))
        check_choice(variance_path, "variance_path", PATHS)
        rank = None if rank is None else as_count(rank, "rank")
        tolerance = as_positive_float(tolerance, "tolerance")
        if not isinstance(full_cov, bool):
            raise TypeError(f"full_cov must be True or False, got {full_cov!r}")
        if full_cov:
            if variance != "exact":
                raise ValueError("full_cov=True gives the exact joint covariance: leave variance='exact'")
            mean, lazy = self._joint(x, variance_path)
            covariance = lazy.to_dense()
            if observation_noise:
                covariance = covariance + self._noise.detach() * torch.eye(
                    covariance.shape[-1], dtype=covariance.dtype, device=covariance.device
                )
            var = covariance.diagonal().reshape(mean.shape)
            if self.num_outputs == 1:
                mean, var = mean.squeeze(-1), var.squeeze(-1)
            check_prediction(x, mean=mean, variance=var)
            if not requires_grad(x):
                mean, var, covariance = mean.detach(), var.detach(), covariance.detach()
            return Prediction(mean, var, covariance=covariance)
        if self.space == "function" and not self.solver.dense(self._residual.numel()):
            mean, var, error, used = *self._predict_gpytorch(x), None, None
        else:
            setup = self._parameter_directions if self.space == "parameter" else self._function_directions
            columns, coefficients, directions = setup()
            mean, var, error, used = self._predict_from_directions(
                x, columns, coefficients, directions, variance, rank, tolerance, variance_path
            )
        if self.num_outputs == 1:
            mean, var = mean.squeeze(-1), var.squeeze(-1)
        if observation_noise:
            var = var + self.noise
        check_prediction(x, mean=mean, variance=var)
        if not requires_grad(x):
            mean, var = mean.detach(), var.detach()
        return Prediction(mean, var, error, used)

    def forward(self, x: Inputs) -> gpytorch.distributions.MultivariateNormal:
        """The joint posterior of the latent function at x (m, ...), as GPyTorch's models return it in eval mode.

        A ``MultivariateNormal`` with mean (m,) for C = 1, a ``MultitaskMultivariateNormal`` (``interleaved``) with
        mean (m, C) otherwise; its covariance is lazy: s²K(x, x) − P diag(w) Pᵀ with the NTK operator K(x, x) and the
        projections P (m·C, r) of x on the r directions of the training data that :meth:`predict` uses (GPyTorch's
        own lazy posterior when function space runs CG). ``gp.likelihood(gp(x))`` adds the noise. The evidence is
        :meth:`log_marginal_likelihood`, not ``gp(train_x)`` (the model is always conditioned on its data).
        """
        x = check_inputs(x, self.network.dtype, "x", self.network.device, like=self.train_structure)
        mean, covariance = self._joint(x, "auto")
        if self.num_outputs == 1:
            return gpytorch.distributions.MultivariateNormal(mean.squeeze(-1), covariance)
        return gpytorch.distributions.MultitaskMultivariateNormal(mean, covariance, interleaved=True)

    def posterior(self, x: Inputs, observation_noise: bool = False) -> Any:
        """BoTorch's ``GPyTorchPosterior`` of the joint posterior at x (m, ...): mean (m, C) — the same numbers as
        :class:`ntkgp.botorch.NTKGPModel` with this GP's hyperparameters (which is the BoTorch *model*, for
        acquisition functions and batched candidate sets). Imports BoTorch (which changes GPyTorch's settings)."""
        from botorch.posteriors.gpytorch import GPyTorchPosterior

        if not isinstance(observation_noise, bool):
            raise TypeError(f"observation_noise must be True or False, got {observation_noise!r}")
        distribution = self(x)
        return GPyTorchPosterior(self.likelihood(distribution) if observation_noise else distribution)

    def _joint(self, x: Inputs, path: str) -> tuple[Tensor, LinearOperator]:
        """(mean (m, C), lazy joint covariance (m·C, m·C) interleaved) of the latent function at checked inputs x."""
        m = length(x)
        if self.space == "function" and not self.solver.dense(self._residual.numel()):
            self.gp.eval()
            with self.solver.settings(), self._explained_singularity(), self._linearised():
                posterior = self.gp(self._packed(x))
                return posterior.mean.reshape(m, -1), posterior.lazy_covariance_matrix
        setup = self._parameter_directions if self.space == "parameter" else self._function_directions
        columns, coefficients, directions = setup()
        cross, _ = self._projections(x, columns, directions, 1 + coefficients.numel(), path)
        mean = self._prior_mean(x) + cross[:, 0].reshape(m, -1)
        prior = NTKOperator.of(x, x, network=self.network, num_outputs=self.num_outputs)
        reduction = MatmulLinearOperator(-cross[:, 1:] * coefficients, cross[:, 1:].mT)
        return mean, SumLinearOperator(prior * self._outputscale.detach(), reduction)

    def _predict_gpytorch(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """GPyTorch's exact GP (CG for the mean, LOVE for the variance) beyond dense sizes: (m, C) each."""
        self.gp.eval()
        with self.solver.settings(), self._explained_singularity(), self._linearised():
            posterior = self.gp(self._packed(x))
            return posterior.mean.reshape(length(x), -1), posterior.variance.reshape(length(x), -1)

    def _function_directions(self) -> tuple[Tensor, Tensor, Callable[[int], Tensor]]:
        """Function space, dense: from the eigenpairs (λ, U) of K in float64, w = 1/(λ + c) on the resolved
        directions, mean = m(X*) + K*X a with a = U (w ⊙ Uᵀr), variance = s²·diag K** − s² Σ_i w_i (K*X u_i)².
        Returns the output-space columns [a, u_1, …] (N, 1 + r) by decreasing λ, the coefficients s²·w (r,),
        and their parameter-space directions Jᵀ[a, u_i] (p, k) for the first k columns, made on demand."""
        evals, evecs, floor = self._ntk_eigenpairs()
        s2, noise = self._outputscale.detach(), self._noise.detach()
        c = (noise / s2).double()
        self._warn_unresolved(evals, floor, c)
        weights = spectral_weights(evals, c, floor)
        keep = torch.nonzero(weights > 0).squeeze(-1).flip(0)  # eigh's order is ascending
        a = spectral_solve(evals, evecs, self._residual, c, floor)
        columns = torch.cat([a.unsqueeze(-1), evecs[:, keep]], dim=-1).to(self.network.dtype)
        n, k = length(self.train_x), self.num_outputs

        made: list[Tensor] = []  # the widest direction matrix so far: a low-rank prediction asks twice

        def directions(count: int) -> Tensor:
            if not made or made[0].shape[-1] < count:
                if self._jacobian is not None:
                    made[:] = [self._jacobian.mT @ columns[:, :count]]
                else:
                    made[:] = [self.network.vjp(self.train_x, columns[:, :count].mT.reshape(count, n, k)).mT]
            return made[0][:, :count]

        return columns, (s2 * weights[keep]).to(self.network.dtype), directions

    def _parameter_directions(self) -> tuple[None, Tensor, Callable[[int], Tensor]]:
        """Parameter space: mean = m(X*) + J*α with α = (JᵀJ + cI)⁻¹Jᵀr, variance = s²·diag K** −
        σ² Σ_k λ_k/(c(λ_k + c)) (J* q_k)² over the eigenpairs (λ_k, q_k) of JᵀJ, by decreasing λ."""
        spectrum, b = self._parameter_cache()
        s2, noise = self._outputscale.detach(), self._noise.detach()
        c = noise / s2
        with torch.no_grad():
            alpha = self._mean_tangent(spectrum, b, c)
        basis = spectrum.ntk or spectrum.gram
        if basis is not None:
            self._warn_unresolved(basis[0], spectrum.floor, c)
        order = torch.argsort(spectrum.eigenvalues, descending=True)
        evals = spectrum.eigenvalues[order]
        tangents = torch.cat([alpha.unsqueeze(-1), spectrum.eigenvectors[:, order]], dim=-1)  # (p, 1 + r)
        return None, noise * evals / (c * (evals + c)), lambda count: tangents[:, :count]

    def _projections(
        self, x: Inputs, columns: Tensor | None, directions: Callable[[int], Tensor], count: int, path: str
    ) -> tuple[Tensor, Tensor]:
        """(J(x) D (m·C, count), diag K(x, x) (m·C,)) for the first ``count`` directions D, by ``path``; in function
        space (D = J(X)ᵀ columns) by the layer-factor kernel K(x, X) columns where it is cheaper (or asked for)."""
        if columns is not None and path in ("auto", "kernel") and not requires_grad(x):
            kernel = self._factored(required=path == "kernel")
            if kernel is not None:
                return self._kernel_projections(kernel, x, columns[:, :count])
        if path == "kernel":
            raise ValueError(
                "variance_path='kernel' is for function space, at inputs that do not require grad (it "
                "is not differentiable in x); use variance_path='jacobians' or 'tangents'"
            )
        if (
            columns is None
            or choose_path(self.network, x, self.num_outputs, count, path, self.memory_budget) == "jacobians"
        ):
            return parameter_projections(
                self.network, x, self.num_outputs, directions(count), path, self.memory_budget, self.progress
            )
        cross = NTKOperator.of(x, self.train_x, network=self.network, num_outputs=self.num_outputs)
        return tangent_projections(
            self.network,
            x,
            count,
            lambda start, stop: cross @ columns[:, start:stop],
            self.memory_budget,
            self.progress,
        )

    def _predict_from_directions(
        self,
        x: Inputs,
        columns: Tensor | None,
        coefficients: Tensor,
        directions: Callable[[int], Tensor],
        variance: str,
        rank: int | None,
        tolerance: float,
        path: str,
    ) -> tuple[Tensor, Tensor, float | None, int | None]:
        """Mean and variance (m, C) from the mean direction and the variance directions, all or the leading ones."""
        s2, total = self._outputscale.detach(), coefficients.numel()
        error, used = None, total
        if variance == "low_rank":
            probe = inputs_at(x, slice(0, self.PROBES))
            cross, prior = self._projections(probe, columns, directions, 1 + total, path)
            terms = (cross[:, 1:].square() * coefficients).cumsum(-1)  # reductions of rank 1, …, r
            reductions = torch.cat([torch.zeros_like(prior).unsqueeze(-1), terms], dim=-1)  # rank 0, …, r
            exact = s2 * prior - reductions[:, -1]
            scale = (exact.abs() + torch.finfo(exact.dtype).eps * s2 * prior).unsqueeze(-1)
            errors = ((reductions[:, -1:] - reductions) / scale).amax(0).detach()  # relative errors of rank 0, …, r
            if rank is None:
                fits = torch.nonzero(errors <= tolerance).squeeze(-1)
                used = int(fits[0]) if fits.numel() else total
            else:
                used = min(rank, total)
            error = float(errors[used])
        cross, prior = self._projections(x, columns, directions, 1 + used, path)
        mean = self._prior_mean(x) + cross[:, 0].reshape(length(x), -1)
        reduction = (cross[:, 1:].square() * coefficients[:used]).sum(-1)
        var = (s2 * prior - reduction).reshape(mean.shape)
        return mean, var, error, (used if variance == "low_rank" else None)

    def _mean_tangent(self, spectrum: GramSpectrum, b: Tensor, c: Tensor) -> Tensor:
        """α = (JᵀJ + cI)⁻¹ Jᵀ r (p,), solved in float64 in the basis of the smaller Gram when it is dense
        (:mod:`ntkgp.gp.parameter_space`), by CG on the lazy Gram otherwise."""
        dtype = self.network.dtype
        if spectrum.ntk is not None:
            cotangent = spectral_solve(*spectrum.ntk, self._residual, c, spectrum.floor)
            n, k = length(self.train_x), self.num_outputs
            return self.network.vjp(self.train_x, cotangent.to(dtype).reshape(1, n, k))[0]
        if spectrum.gram is not None:
            return spectral_solve(*spectrum.gram, b, c, spectrum.floor).to(dtype)
        system = AddedDiagLinearOperator(self._gram(), ConstantDiagLinearOperator(c.reshape(1), b.shape[0]))
        with self.solver.settings(), self._linearised():
            return system.solve(b.unsqueeze(-1)).squeeze(-1)

    def _warn_unresolved(self, eigenvalues: Tensor, floor: float, c: Tensor) -> None:
        """Say so when σ²/s² is below the floor and some of the eigenvalues (all of a dense spectrum) are too."""
        unresolved = int((~resolved(eigenvalues, c.to(eigenvalues.dtype), floor)).sum())
        if unresolved:
            warnings.warn(
                f"σ²/s² = {float(c):.3g} is below what {self.network.dtype} resolves for this kernel "
                f"(eigenvalues under {floor:.3g}): {unresolved} of {eigenvalues.numel()} directions of the "
                "data are treated as numerically zero, exact for repeated inputs; for nearly repeated inputs "
                "use float64 or a larger noise",
                RuntimeWarning,
                stacklevel=4,
            )
