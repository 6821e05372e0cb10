"""Laplace posterior of the linearised network and its GLM predictive, in closed form through the NTK.

Model: f_lin(x; θ) = f0(x) + J(x) Δ with Δ = θ − θ0, prior Δ ~ N(0, I/δ), and a Gaussian (variance σ²)
or categorical likelihood. With K = J Jᵀ at the training inputs X (N × N, N = n·C):

- The MAP lies in the span of Jᵀ: Δ = Jᵀ α and f = f0 + K α. Regression: α = (K + σ²δ I)⁻¹ (y − f0).
  Classification: Newton's method in α, (δI + W K) α' = W (f − f0) + (onehot(y) − π) with W = H(f)
  block-diagonal (H = diag(π) − ππᵀ per input), halving steps that do not decrease the objective.
- F = Jᵀ H J with H at the MAP outputs (I/σ² for regression). With S = H^{1/2} blockwise, B = S J and
  S K S = U Λ Uᵀ (dense, exact):
      Σ = (F + δI)⁻¹ = (I − Jᵀ M J)/δ,    M = S U diag(1/(λ + δ)) Uᵀ S,
  so the covariance of f_lin at x* is (K** − K*X M KX*)/δ, and log det(I + F/δ) = Σ log(1 + λ/δ).
- Samples: Σ^{1/2} z = (z − Bᵀ U diag(1/(√(λ+δ)(√(λ+δ) + √δ))) Uᵀ B z)/√δ (one JVP and one VJP), or
  with a ``rank``, from the top Ritz pairs of F (Lanczos on products by ``hessian``) with the rest of
  tr F spread evenly over the orthogonal complement.

All N × N algebra runs in float64 whatever the network's dtype.

Matrix-free (``solver="cg"``, or ``"auto"`` beyond ``max_size`` or the memory budget, and on shards), nothing of
size N × N is formed: the MAP by CG on (JᵀJ/σ² + δI)Δ = Jᵀr/σ² (regression) or Newton-CG on the objective in
parameter space (classification: each step a CG solve with F(f) + δI by exact products, a line search along the
step at the cost of one JVP); Σ from the top r = ``solver.lanczos_rank`` Lanczos Ritz pairs (λ, Q) of F with the rest
of tr F (exact, from per-sample Jacobians) spread evenly over the other p − r directions,
Σ ≈ Q diag(1/(λ + δ)) Qᵀ + (I − QQᵀ)/(δ + ρ), exact once r reaches the rank of F; the GLM variance at x* is then
J* Q (r JVPs, or per-sample Jacobians times Q) and diag J*J*ᵀ; the evidence's log-determinant by stochastic
Lanczos quadrature on F, whose nodes serve every δ of a grid.

That rank-r posterior is an approximation unless r reaches the rank of F (r ≥ min(N, p)): it gives every direction
outside the top r the same variance 1/(δ + ρ), which understates the variance of the directions F barely sees (on
ImageNet MobileNetV2 features of Fashion-MNIST, a 10-way head, N = 10,000: probit probabilities 0.54 from the exact
ones, overconfident). ``fit`` then warns, and the first ``predict`` of each posterior (each δ) computes the exact GLM
variance of its first :attr:`Laplace.PROBES` test inputs by CG on F + δI (one solve per output, all at once,
preconditioned by the approximation) and reports the largest relative error of the variance there (``variance_error``:
the attribute, and the regression Prediction's) and, for classification, the largest difference of the probit
probabilities (``probability_error``), warning when either exceeds 1e-2.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from linear_operator.operators import LinearOperator, MatmulLinearOperator
from torch import Tensor, nn

from ..distributed import global_rows
from ..functional import FunctionalNetwork, as_functional_network, map_blocks
from ..gp.ntk_gp import Prediction
from ..gp.parameter_space import lanczos_spectrum, ntk_matrix
from ..gp.solver import Solver, as_solver, conjugate_gradients
from ..gp.variance_projections import parameter_projections
from ..inputs import (
    Inputs,
    Layout,
    check_inputs,
    chunks,
    convert,
    gather,
    inputs_at,
    layout,
    leaves,
    length,
    map_leaves,
    structure,
)
from ..lanczos import lanczos_quadrature
from ..likelihoods import get_likelihood, hessian_blocks, psd_roots
from ..lqf.kfac import KFACPreconditioner
from ..memory import default_budget
from ..operators.fisher_operator import (
    FISHER_METHODS,
    FisherOperator,
    default_epsilon,
    layer_slices,
    linear_layer_factors,
    single_linear_layer,
)
from ..operators.gram_operator import GramOperator
from ..operators.layer_kernel import LayerKernel
from ..operators.network_operator import NetworkOperator
from ..operators.ntk_operator import NTKOperator
from ..progress import progress_bar
from ..validation import (
    as_count,
    as_positive_float,
    check_choice,
    check_finite,
    check_generator,
    check_prediction,
    check_tensor,
)
from .hessian_structures import (
    PARAMETER_STRUCTURES,
    DiagStructure,
    FullStructure,
    KronStructure,
    Structure,
    StructureCovariance,
    restore_structure,
)
from .linearised_model import TASKS, check_task, log_likelihood, mc_class_probabilities, prepare_data, randn

__all__ = ["Laplace", "PosteriorCovariance"]

_LINKS = ("probit", "mc", "map")

#: how the approximate posteriors are named in warnings
_NAMES = {"lowrank": "low-rank", "kron": "K-FAC", "diag": "diagonal"}

#: ``hessian_structure`` values (laplace-torch's names; "gp" is "function")
STRUCTURES = ("full", "kron", "diag", "lowrank", "function", "gp")


def _scalar(delta: float | Tensor) -> float:
    """δ where only one value is possible (function space, low rank: _choose_posterior refuses vectors there)."""
    assert not isinstance(delta, Tensor), "a per-parameter prior precision reached a one-δ path"
    return delta


def _as_prior_precision(value: Any, network: FunctionalNetwork) -> float | Tensor:
    """δ > 0: a float, or a float64 (p,) tensor from one value per selected parameter tensor (per layer) or per
    parameter."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return as_positive_float(float(value) if isinstance(value, Tensor) else value, "prior_precision")
    layers, p = len(network.names), network.num_params
    if value.dim() != 1 or value.shape[0] not in (layers, p):
        raise TypeError(
            f"prior_precision must be a float, one value per selected parameter tensor ({layers}: "
            f"{', '.join(network.names[:4])}{', …' if layers > 4 else ''}) or one per parameter ({p},); got shape "
            f"{tuple(value.shape)}"
        )
    value = value.detach().to(dtype=torch.float64, device=network.device)
    if not bool((torch.isfinite(value) & (value > 0)).all()):
        raise ValueError("prior_precision must be finite and > 0 everywhere")
    if value.shape[0] == layers and layers != p:
        value = torch.repeat_interleave(value, torch.tensor(network.numels, device=value.device))
    return value


class PosteriorCovariance(NetworkOperator):
    """Σ = (I − J(x)ᵀ M J(x))/δ, shape (p, p): a product is one JVP and one VJP at x.

    Args: x (n, ...), middle M (n·C, n·C), delta δ (a 0-d tensor); keywords ``network`` and ``batch_shape``
    (see :class:`~ntkgp.operators.network_operator.NetworkOperator`). M was computed from the training inputs x, so
    the products are not differentiable in x (x is used detached); they are in M and δ.
    """

    def __init__(
        self,
        *tensors: Tensor,
        network: FunctionalNetwork,
        batch_shape: torch.Size | tuple[int, ...] = (),
        layouts: Any = None,
    ):
        super().__init__(*tensors, network=network, batch_shape=batch_shape, layouts=layouts)
        self.x, middle, delta = self.batches
        assert isinstance(middle, Tensor) and isinstance(delta, Tensor)
        self.middle, self.delta = middle, delta

    def _matrix_shape(self) -> tuple[int, int]:
        return self.network.num_params, self.network.num_params

    def _matmul_matrix(self, rhs: Tensor) -> Tensor:
        net, n, x = self.network, length(self.x), map_leaves(Tensor.detach, self.x)

        def block(v: Tensor) -> Tensor:
            jv = net.jvp(x, v).reshape(v.shape[0], -1)
            w = (jv.to(self.middle.dtype) @ self.middle.mT).to(v.dtype)  # rows (M J v)ᵀ
            return (v - net.vjp(x, w.reshape(v.shape[0], n, -1))) / self.delta.to(v.dtype)

        return map_blocks(block, rhs.mT, net.chunk_size).mT


def _prior_offset(prior_mean: Any, network: FunctionalNetwork) -> Tensor | None:
    """μ − θ0 (p,) for ``prior_mean`` "theta0" (None: no offset), "zero" (−θ0) or a (p,) tensor of the selected
    parameters, flat, in the network's dtype."""
    if isinstance(prior_mean, str):
        check_choice(prior_mean, "prior_mean", ("theta0", "zero"))
        return None if prior_mean == "theta0" else -network.theta0
    check_tensor(prior_mean, "prior_mean", f"({network.num_params},)")
    if prior_mean.shape != (network.num_params,) or prior_mean.dtype != network.dtype:
        raise ValueError(
            f"prior_mean must be 'theta0', 'zero' or a ({network.num_params},) {network.dtype} tensor (the selected "
            f"parameters, flat), got {tuple(prior_mean.shape)} {prior_mean.dtype}"
        )
    check_finite(prior_mean, "prior_mean", "pass finite values")
    return prior_mean.detach().to(network.device) - network.theta0


def _blockwise(blocks: Tensor, vectors: Tensor) -> Tensor:
    """Apply the block-diagonal matrix with blocks (n, C, C) to vectors (..., n·C) -> (..., n·C)."""
    n, c = blocks.shape[0], blocks.shape[-1]
    return torch.einsum("iab,...ib->...ia", blocks, vectors.reshape(*vectors.shape[:-1], n, c)).flatten(-2)


def _as_grid(grid: Any) -> Tensor:
    """A grid of prior precisions (a sequence or tensor) as a 1-d float64 tensor of finite values > 0."""
    try:
        values = torch.as_tensor(grid, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"grid must be a 1-d sequence or tensor of prior precisions > 0, got {grid!r}") from err
    if values.dim() != 1 or values.numel() == 0 or not bool((torch.isfinite(values) & (values > 0)).all()):
        raise ValueError(f"grid must be a non-empty 1-d sequence of finite prior precisions > 0, got {grid!r}")
    return values


class Laplace:
    """Laplace approximation N(θ_MAP, (F + δI)⁻¹) of the linearised network on new data.

    Args:
        model: a network in eval mode (or a :class:`FunctionalNetwork`) mapping (n, ...) to (n, C).
        likelihood: "regression" (Gaussian, variance ``noise``, default 1) or "classification"
            (categorical over C >= 2 logits; labels (n,) of integer dtype).
        params: parameter names or module prefixes to linearise (default: all trainable).
        hessian: how products with F are computed where they are needed (``precision``, ``sample``
            with a rank): "exact" (JVP, H, VJP), "finite_difference" (one gradient per product) or
            "central_difference" (two), see :func:`ntkgp.fisher_operator`.
        hessian_structure: the posterior covariance, as laplace-torch names it: ``"full"`` (default: exact, in the
            cheaper space — p × p in parameter space when p ≤ N = n·C and it fits ``memory_budget``, N × N in
            function space otherwise while it fits, the low-rank Lanczos form beyond, with a warning), ``"kron"``
            (K-FAC), ``"diag"`` (the exact diagonal of F), ``"lowrank"`` (the matrix-free rank-r Lanczos form) or
            ``"function"`` / ``"gp"`` (dense in function space). See :mod:`ntkgp.posteriors.hessian_structures`.
            The approximate ones report their estimated error at prediction (``variance_error``).
        prior_precision: δ > 0 of the prior N(μ, D⁻¹): one value, one per selected parameter tensor (per layer, in
            ``network.names`` order) or one per parameter (p,) — the last two with the parameter-space structures
            (``"full"`` taken in parameter space, ``"kron"``: equal on a layer's weight and bias, ``"diag"``).
        prior_mean: μ: ``"theta0"`` (the pretrained weights), ``"zero"`` or a (p,) tensor; default (None)
            ``"theta0"`` when :meth:`fit` finds the MAP and ``"zero"`` post hoc (``find_map=False``), as
            laplace-torch's prior: centred at θ0 = θ_MAP the evidence would only grow with δ.
        noise: σ² for regression; must be None for classification.
        num_classes: if given, must equal the network's output width C.
        max_size: largest N = n·C solved densely (the dense posterior holds N × N matrices).
        solver: ``"auto"`` (default: dense up to ``max_size`` while 3 N × N float64 matrices fit ``memory_budget``
            and the inputs are not sharded, matrix-free beyond), ``"cholesky"`` (dense; refused beyond
            ``max_size``) or ``"cg"`` (matrix-free: see the module's docstring), or a :class:`~ntkgp.Solver`
            whose ``cg_tolerance``, ``max_cg_iterations`` and ``lanczos_rank`` (the rank r of the matrix-free
            posterior) are used (its ``cholesky_max_size`` is not: ``max_size`` is).
        memory_budget: bytes (default half of the available memory) for the dense choice and the test Jacobians.
        progress: tqdm bars over CG products, test inputs and the prior-precision grid (after 1 s).
    """

    #: Lanczos steps and probes of the matrix-free evidence's stochastic Lanczos quadrature.
    SLQ_STEPS, SLQ_PROBES = 64, 16

    #: Test inputs of the first prediction of an approximate posterior whose exact GLM variance (by CG) estimates its
    #: error; 0 (on the class or an instance) skips the estimate, and ``variance_error`` stays None.
    PROBES = 4

    #: The most products with F + D of that CG (beyond, the estimate is rough, and says so).
    ESTIMATE_PRODUCTS = 50

    def __init__(
        self,
        model: nn.Module | FunctionalNetwork,
        likelihood: str = "regression",
        params: Sequence[str] | str | None = None,
        hessian: str = "exact",
        prior_precision: float | Tensor = 1.0,
        noise: float | None = None,
        num_classes: int | None = None,
        chunk_size: int | None = None,
        max_size: int = 8192,
        solver: Solver | str | None = None,
        memory_budget: int | None = None,
        progress: bool = True,
        prior_mean: str | Tensor | None = None,
        hessian_structure: str = "full",
    ):
        self.noise = check_task(likelihood, noise, 1.0)
        self.task, self.hessian = likelihood, check_choice(hessian, "hessian", FISHER_METHODS)
        self.hessian_structure = check_choice(hessian_structure, "hessian_structure", STRUCTURES)
        self.network = as_functional_network(model, params, chunk_size)
        self.prior_precision = _as_prior_precision(prior_precision, self.network)
        self.num_classes = None if num_classes is None else as_count(num_classes, "num_classes", minimum=2)
        self.max_size = as_count(max_size, "max_size")
        self.solver = as_solver(solver)
        self.memory_budget = (
            default_budget(self.network.device) if memory_budget is None else as_count(memory_budget, "memory_budget")
        )
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        self.progress = progress
        self._prior_mean_given = prior_mean is not None
        # μ − θ0 (p,), None for μ = θ0; the default is set by fit, by find_map
        self._prior_offset = None if prior_mean is None else _prior_offset(prior_mean, self.network)
        self._structure: Structure | None = None
        self._train_x: Inputs | None = None
        self._jacobian: Tensor | None = None
        self._step: Tensor | None = None
        self.variance_error: float | None = None  # of the last prediction, when the posterior is approximate
        self.estimate_converged = True  # whether the CG of that estimate reached its tolerance
        self.probability_error: float | None = None

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        train_x: Inputs | torch.utils.data.DataLoader,
        train_y: Tensor | None = None,
        max_iter: int = 100,
        find_map: bool = True,
    ) -> Laplace:
        """MAP of the linearised model on (n inputs train_x, train_y) — or on every (x, y) batch of a DataLoader
        (read once, concatenated) — and the posterior around it.

        ``find_map=False`` takes the network as the MAP already (θ_MAP = θ0, post-hoc Laplace of a
        trained network, as laplace-torch does); the posterior and evidence are then formed at θ0.
        """
        if isinstance(train_x, torch.utils.data.DataLoader):
            train_x, train_y = gather(train_x, train_y, self.network.dtype, self.network.device)
        targets, c = prepare_data(self.task, self.network, train_x, train_y, self.num_classes)
        max_iter = as_count(max_iter, "max_iter")
        if not isinstance(find_map, bool):
            raise TypeError(f"find_map must be True or False, got {find_map!r}")
        if not self._prior_mean_given:
            self._prior_offset = _prior_offset("theta0" if find_map else "zero", self.network)
        self.posterior = self._choose_posterior(train_x, c)
        self.dense = self.posterior == "function"
        self._train_x, self.targets, self.num_outputs, self.max_iter = train_x, targets, c, max_iter
        self.find_map = find_map
        # the outputs at the centre of the formulas: the prior mean, f(X; θ0) + J(X)(μ − θ0), when the MAP is
        # searched (the step θ_MAP − μ has the prior N(0, D⁻¹) whatever μ is); θ0 itself post hoc
        self.f0 = self.network.outputs(train_x, "train_x") + self._shift(train_x)
        self._jacobian, self._structure = None, None
        if self.dense:
            with torch.no_grad():  # J Jᵀ from per-sample Jacobians where they are cheaper than N products
                kernel = ntk_matrix(self.network, train_x, c, self.memory_budget).detach()
            self.kernel: Any = (0.5 * (kernel + kernel.mT)).double()  # (N × N) when dense, else None
            self._alpha = torch.zeros(kernel.shape[0], dtype=torch.float64, device=kernel.device)
        else:
            self.kernel = None
            self._delta = torch.zeros_like(self.network.theta0)
            self._nodes: tuple[Tensor, Tensor] | None = None
        self._update(self.prior_precision)
        if self.posterior == "lowrank" and self.approximate:
            size, rank = self.f0.numel(), min(self.solver.lanczos_rank, self.network.num_params)
            reason = (
                "solver='cg'"
                if self.solver.method == "cg"
                else "hessian_structure='lowrank'"
                if self.hessian_structure == "lowrank"
                else "neither the p × p nor the n·C × n·C posterior fits memory_budget and max_size, or train_x is "
                "a shard and p × p does not fit"
            )
            warnings.warn(
                f"Laplace: {reason}, so the posterior covariance is the rank-{rank} Lanczos approximation "
                f"(exact only from rank min(n·C, p) = {min(size, self.network.num_params)}); predict reports "
                "its estimated error (variance_error, probability_error). For the exact posterior raise "
                "memory_budget, max_size (dense in n·C) or Solver.lanczos_rank",
                RuntimeWarning,
                stacklevel=2,
            )
        return self

    @property
    def approximate(self) -> bool:
        """Whether the fitted posterior covariance is approximate: ``"kron"``, ``"diag"``, or the low-rank Lanczos
        form short of F's possible rank."""
        if self.posterior in ("kron", "diag"):
            return True
        rank = min(self.solver.lanczos_rank, self.network.num_params)
        return self.posterior == "lowrank" and rank < min(self.f0.numel(), self.network.num_params)

    def _choose_posterior(self, x: Inputs, num_outputs: int) -> str:
        """The posterior's form: "function" (dense N × N), "full" (dense p × p), "kron", "diag" or "lowrank"
        (matrix-free), from ``hessian_structure``, ``solver``, ``max_size`` and ``memory_budget``."""
        structure, method, sharded = self.hessian_structure, self.solver.method, self.network.is_sharded(x)
        p = self.network.num_params
        fits = lambda n: 3 * 8 * n**2 <= self.memory_budget  # noqa: E731  (three n × n float64 matrices)
        if structure in ("kron", "diag"):
            return structure
        if isinstance(self.prior_precision, Tensor) and (structure != "full" or not fits(p) or method != "auto"):
            raise ValueError(
                "a prior_precision per layer or per parameter needs a parameter-space posterior: "
                "hessian_structure='full' (with p × p within memory_budget and solver='auto'), 'kron' or 'diag'; "
                f"got hessian_structure={structure!r}, solver={method!r}, p = {p}"
            )
        if structure == "lowrank" or method == "cg":
            return "lowrank"
        if structure in ("function", "gp") or method == "cholesky":
            if sharded:
                raise ValueError(
                    "the function-space posterior needs every training input on one process, but train_x is a shard "
                    "(network.shard): use hessian_structure='full' (p × p, runs on shards), 'kron', 'diag' or "
                    "'lowrank'"
                )
            size = length(x) * num_outputs
            if size > self.max_size:
                raise ValueError(
                    f"n·C = {size} exceeds max_size = {self.max_size}: the function-space Laplace posterior holds "
                    "N × N matrices; use solver='auto' with hessian_structure='full' (the cheaper exact space), or "
                    "solver='cg' / hessian_structure='lowrank' (matrix-free), or raise max_size"
                )
            return "function"
        size = global_rows(self.network, x) * num_outputs  # (over the ranks: a shard's products need them)
        if (p <= size or sharded) and fits(p):
            return "full"
        if not sharded and size <= self.max_size and fits(size):
            return "function"
        return "full" if fits(p) else "lowrank"

    def _update(self, delta: float | Tensor) -> None:
        """MAP and posterior for prior precision δ (the NTK is reused: no network passes; the parameter-space
        structures are rebuilt only where F moved with the MAP)."""
        self.prior_precision = delta
        self.variance_error = self.probability_error = None  # estimated again at the next prediction
        if not self.dense:
            if self.find_map:
                self._delta = self._map_step_matrix_free(delta, self._delta)
                if self.task == "classification":
                    self._nodes = None  # F is evaluated at the MAP, which moved
                    self._structure = None
            self._f_map = self._linearised_outputs(self._delta)
            self._posterior: tuple[Tensor, Tensor, float] | None = None
            self._trace: float | None = None
            if self.posterior in PARAMETER_STRUCTURES and self._structure is None:
                self._structure = self._build_structure(self._f_map)
            return
        if self.find_map:
            self._alpha = self._map_coefficients(_scalar(delta), self._alpha)
        self._step = None
        self._f_map = self._outputs(self._alpha)
        s = self._sqrt_h = psd_roots(self._hessian_blocks(self._f_map))
        evals, evecs = torch.linalg.eigh(self._whitened_kernel(s))
        self._evals, self._evecs = evals.clamp_min(0), evecs
        su = _blockwise(s, evecs.mT).mT  # S U
        self._middle = (su / (self._evals + delta)) @ su.mT

    def _build_structure(self, f: Tensor) -> Structure:
        """F in the fitted structure, with H at the training outputs f (n, C) (1/σ²-scaled for regression)."""
        net, scale = self.network, 1.0 if self.noise is None else 1.0 / self.noise
        with torch.no_grad():
            if self.posterior == "kron":
                loss = "mse" if self.task == "regression" else "cross_entropy"
                offset = None if self.task == "regression" else (f - net.outputs(self.train_x)).to(net.dtype)
                with torch.enable_grad():  # curvlinops backpropagates
                    kfac = KFACPreconditioner(net, self.train_x, 1.0, loss, offset=offset)
                return KronStructure.of(kfac, scale / 2 if loss == "mse" else scale, net.num_params)
            fisher = FisherOperator.of(
                self.train_x,
                network=net,
                likelihood=TASKS[self.task],
                method="exact",
                epsilon=1.0,
                at=f.to(net.dtype),
            )
            if self.posterior == "diag":
                return DiagStructure(fisher._diagonal().double() * scale)
            return FullStructure(fisher.dense(self.progress) * scale)

    def _outputs(self, alpha: Tensor) -> Tensor:
        """f0 + Kα at the training inputs (n, C), float64."""
        return self.f0.double() + (self.kernel @ alpha).reshape(self.f0.shape)

    def _whitened_kernel(self, s: Tensor) -> Tensor:
        """S K S (N × N) for blockwise symmetric S (n, C, C)."""
        g = _blockwise(s, _blockwise(s, self.kernel).mT)
        return 0.5 * (g + g.mT)

    def _hessian_blocks(self, f: Tensor) -> Tensor:
        """The likelihood's Hessian in the outputs, blocks (n, C, C) at outputs f (n, C): the task's
        likelihood (:mod:`ntkgp.likelihoods`) applied to the identity, scaled by 1/σ² for regression."""
        blocks = hessian_blocks(get_likelihood(TASKS[self.task]), f)
        return blocks if self.noise is None else blocks / self.noise

    def _objective(self, alpha: Tensor, delta: float) -> Tensor:
        """−log p(y | f0 + Kα) + δ/2 ‖θ_MAP − μ‖², ‖θ_MAP − μ‖² = αᵀKα + ‖θ0 − μ‖² (the second post hoc only)."""
        f = self._outputs(alpha)
        quadratic = alpha @ (f - self.f0.double()).reshape(-1) + self._gap_squared()
        return -log_likelihood(self.task, f, self._targets64(), self.noise) + 0.5 * delta * quadratic

    def _gap(self) -> Tensor | None:
        """θ0 − μ (p,) post hoc (``find_map=False``: θ_MAP = θ0) with μ ≠ θ0; None otherwise (the formulas are
        centred at μ and the step θ_MAP − μ is their own)."""
        return None if self.find_map or self._prior_offset is None else -self._prior_offset

    def _gap_squared(self) -> float:
        gap = self._gap()
        return 0.0 if gap is None else float(gap.double().square().sum())

    def _evidence(self, delta: float | Tensor) -> float:
        """The Laplace evidence at δ; its MAP is kept as the warm start of the next δ. Dense: one Cholesky factor,
        no eigendecomposition. Matrix-free: the log-determinant by quadrature (:meth:`_slq_logdet`)."""
        if not self.dense:
            if self.find_map:
                self._delta = self._map_step_matrix_free(delta, self._delta)
            f = self._linearised_outputs(self._delta)
            moves = self.find_map and self.task == "classification"  # F is evaluated at the MAP
            if self.posterior in PARAMETER_STRUCTURES:
                if moves:
                    self._structure = self._build_structure(f)
                assert self._structure is not None
                logdet = self._structure.logdet(delta)
            else:
                f_hessian = f if moves else self._f_map
                logdet = self._slq_logdet(_scalar(delta), f_hessian, self.SLQ_STEPS, self.SLQ_PROBES, None)
            return float(self._data_fit(f, self._delta, delta) - 0.5 * logdet)
        delta = _scalar(delta)
        alpha = self._map_coefficients(delta, self._alpha) if self.find_map else self._alpha
        g = self._whitened_kernel(psd_roots(self._hessian_blocks(self._outputs(alpha))))
        chol = torch.linalg.cholesky(torch.eye(g.shape[0], dtype=g.dtype, device=g.device) + g / delta)
        logdet = 2 * chol.diagonal().log().sum()
        self._alpha = alpha
        return float(-self._objective(alpha, delta) - 0.5 * logdet)

    def _targets64(self) -> Tensor:
        return self.targets.double() if self.task == "regression" else self.targets

    def _map_coefficients(self, delta: float, start: Tensor) -> Tensor:
        """α of the MAP Δ = Jᵀα: closed form for regression, Newton from ``start`` for classification.

        Newton step: α' = (δI + WK)⁻¹ b = (b − S (δI + SKS)⁻¹ S K b)/δ with W = S², one Cholesky factor.
        """
        eye = torch.eye(self.kernel.shape[0], dtype=self.kernel.dtype, device=self.kernel.device)
        if self.task == "regression":
            residual = (self._targets64() - self.f0.double()).reshape(-1)
            return torch.cholesky_solve(
                residual.unsqueeze(-1), torch.linalg.cholesky(self.kernel + self._sigma2 * delta * eye)
            ).squeeze(-1)
        n, c = self.f0.shape
        f0 = self.f0.double().reshape(-1)
        onehot = torch.nn.functional.one_hot(self.targets, c).double().reshape(-1)
        alpha, value = start, self._objective(start, delta)
        for _ in range(self.max_iter):
            f = self._outputs(alpha).reshape(-1)
            h = self._hessian_blocks(f.reshape(n, c))
            s = psd_roots(h)
            b = _blockwise(h, f - f0) + onehot - torch.softmax(f.reshape(n, c), -1).reshape(-1)
            chol = torch.linalg.cholesky(delta * eye + self._whitened_kernel(s))
            inner = torch.cholesky_solve(_blockwise(s, self.kernel @ b).unsqueeze(-1), chol).squeeze(-1)
            step = (b - _blockwise(s, inner)) / delta - alpha
            t = 1.0
            while True:
                candidate = self._objective(alpha + t * step, delta)
                if candidate <= value or t < 1e-6:
                    break
                t /= 2
            if not candidate < value:
                break
            converged = value - candidate <= 1e-12 * max(1.0, abs(float(value)))
            alpha, value = alpha + t * step, candidate
            if converged:
                break
        return alpha

    # ------------------------------------------------------------------ matrix-free
    def _linearised_outputs(self, step: Tensor) -> Tensor:
        """f0 + J(X) Δ at the training inputs (n, C), float64 (one JVP)."""
        with torch.no_grad():
            return self.f0.double() + self.network.jvp(self.train_x, step.unsqueeze(0))[0].double()

    def _data_fit(self, f: Tensor, step: Tensor, delta: float | Tensor) -> Tensor:
        """log p(y | f) − ½ (θ_MAP − μ)ᵀ D (θ_MAP − μ) (float64; the likelihood summed over the ranks when train_x
        is a shard); θ_MAP − μ is the step Δ, plus θ0 − μ post hoc."""
        value = log_likelihood(self.task, f, self._targets64(), self.noise).reshape(1)
        value = self.network.sum_over_shards(self.train_x, value)[0]
        gap = self._gap()
        distance = step.double() if gap is None else step.double() + gap.double()
        d = torch.as_tensor(delta, dtype=torch.float64, device=distance.device)
        return value - 0.5 * (d * distance.square()).sum()

    def _cg(
        self,
        product: Callable[[Tensor], Tensor],
        rhs: Tensor,
        start: Tensor | None = None,
        preconditioner: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        return conjugate_gradients(
            product,
            rhs,
            self.solver.cg_tolerance,
            self.solver.max_cg_iterations,
            start,
            desc="Laplace MAP (CG products)",
            progress=self.progress,
            preconditioner=preconditioner,
        )

    def _structure_inverse(self, delta: float | Tensor, scale: float) -> Callable[[Tensor], Tensor] | None:
        """v (p, k) ↦ (F + D)⁻¹ v / ``scale`` from the structure, when one is held (a preconditioner for CG)."""
        structure = self._structure
        if structure is None:
            return None
        return lambda v: (structure.solve(delta, v.double()) / scale).to(v.dtype)

    def _map_step_matrix_free(self, delta: float | Tensor, start: Tensor) -> Tensor:
        """Δ_MAP (p,): CG on (JᵀJ + σ²D)Δ = Jᵀr for regression; Newton-CG from ``start`` for classification. With a
        parameter-space structure, CG is preconditioned by it (built first where none is held: for regression and
        ``"full"`` it is the exact inverse, and CG takes one step)."""
        net, x, c = self.network, self.train_x, self.f0.shape[-1]
        if self.posterior in PARAMETER_STRUCTURES and self._structure is None:
            self._structure = self._build_structure(self._linearised_outputs(start))
        if isinstance(delta, Tensor):
            delta = delta.to(net.dtype)
        with torch.no_grad(), net.linearised(x, budget=self.memory_budget):
            if self.task == "regression":
                gram, shift = GramOperator.of(x, network=net), self._sigma2 * delta
                shift = shift.unsqueeze(-1) if isinstance(shift, Tensor) else shift
                rhs = net.vjp(x, (self.targets - self.f0).unsqueeze(0))[0]
                inverse = self._structure_inverse(delta, self._sigma2)
                if self.posterior == "full" and inverse is not None:  # (F + D)⁻¹ exactly: no CG
                    return inverse(rhs.unsqueeze(-1)).squeeze(-1)
                return self._cg(lambda v: gram._matmul(v) + shift * v, rhs, start, inverse)
            onehot = torch.nn.functional.one_hot(self.targets, c).to(net.dtype)
            step, f = start, self._linearised_outputs(start)
            value = self._data_fit(f, step, delta)
            for _ in range(self.max_iter):
                gradient = net.vjp(x, (torch.softmax(f, -1).to(net.dtype) - onehot).unsqueeze(0))[0] + delta * step
                hessian = self._fisher_at(f, "exact")

                def product(v: Tensor, hessian: LinearOperator = hessian) -> Tensor:
                    return hessian._matmul(v) + (delta.unsqueeze(-1) if isinstance(delta, Tensor) else delta) * v

                if self.posterior == "full":  # an exact Newton step from F at f, dense
                    self._structure = self._build_structure(f)
                    direction = self._structure.solve(delta, -gradient.double().unsqueeze(-1)).squeeze(-1)
                    direction = direction.to(net.dtype)
                else:
                    direction = self._cg(product, -gradient, None, self._structure_inverse(delta, 1.0))
                moved = net.jvp(x, direction.unsqueeze(0))[0].double()  # the line search costs no more passes
                t = 1.0
                while True:
                    candidate = self._data_fit(f + t * moved, step + t * direction, delta)
                    if candidate >= value or t < 1e-6:
                        break
                    t /= 2
                if not candidate >= value:  # (a step the objective cannot resolve in float64 is still taken)
                    break
                converged = candidate - value <= 1e-12 * max(1.0, abs(float(value)))
                step, f, value = step + t * direction, f + t * moved, candidate
                if converged:
                    break
            return step

    def _fisher_at(self, f: Tensor, method: str | None = None) -> LinearOperator:
        """F (p × p) at the training inputs with H at outputs f (n, C) (1/σ²-scaled for regression), products by
        ``method`` (default ``hessian``)."""
        method = self.hessian if method is None else method
        op = FisherOperator.of(
            self.train_x,
            network=self.network,
            likelihood=TASKS[self.task],
            method=method,
            epsilon=default_epsilon(self.network.theta0, method),
            at=f.to(self.network.dtype),
        )
        return op if self.task == "classification" else op * (1.0 / self._sigma2)

    def _fisher_trace(self) -> float:
        """tr F: the eigenvalues' sum when dense, else exact from per-sample Jacobians (kept until δ changes)."""
        if self.dense:
            return float(self._evals.sum())
        if self._trace is None:
            self._trace = float(self.fisher().diagonal().sum())
        return self._trace

    def _low_rank(self) -> tuple[Tensor, Tensor, float]:
        """The matrix-free posterior: (λ (r,), Q (p, r), ρ) from ``solver.lanczos_rank`` Lanczos steps on F."""
        if self._posterior is None:
            with torch.no_grad(), self.network.linearised(self.train_x, budget=self.memory_budget):
                lam, q, rho, _ = self._lanczos(min(self.solver.lanczos_rank, self.network.num_params))
            self._posterior = (lam, q, rho)
        return self._posterior

    def _slq_logdet(
        self, delta: float, f: Tensor, steps: int, probes: int, generator: torch.Generator | None
    ) -> Tensor:
        """log det(I + F/δ) by stochastic Lanczos quadrature on F at outputs f; the nodes of the defaults are kept
        while F stays (regression, or classification until the MAP moves). Default probes: a generator seeded 0,
        the same on every rank."""
        generator = torch.Generator().manual_seed(0) if generator is None else generator
        default = steps == self.SLQ_STEPS and probes == self.SLQ_PROBES and generator.initial_seed() == 0
        nodes = self._nodes if default and not self.dense and f is self._f_map else None
        if nodes is None:
            with torch.no_grad(), self.network.linearised(self.train_x, budget=self.memory_budget):
                nodes = lanczos_quadrature(self._fisher_at(f), min(steps, self.network.num_params), probes, generator)
            if default and not self.dense and f is self._f_map:
                self._nodes = nodes
        theta, weights = nodes
        return (weights * torch.log1p(theta / delta)).sum().double()

    def _check_fitted(self) -> Inputs:
        """The training inputs of the last :meth:`fit`; before one, a RuntimeError saying to fit first."""
        if self._train_x is None:
            raise RuntimeError("call .fit(train_x, train_y) first")
        return self._train_x

    @property
    def train_x(self) -> Inputs:
        """The training inputs (n, ...) of the last :meth:`fit`."""
        return self._check_fitted()

    @property
    def _sigma2(self) -> float:
        """σ², the noise of a regression (what the regression formulas use)."""
        if self.noise is None:
            raise RuntimeError("a classification Laplace has no noise σ²")
        return self.noise

    def to(self, *args: Any, **kwargs: Any) -> Laplace:
        """Move and convert like ``nn.Module.to`` (in place; returns self): the network snapshot, the prior mean and,
        once fitted, the training data; a fitted posterior is then refitted there (same δ, MAP search and
        iterations), since every quantity of it is computed in the network's dtype and on its device."""
        device, dtype = torch._C._nn._parse_to(*args, **kwargs)[:2]
        old = self.network
        self.network = old.to(device=device, dtype=dtype)
        if self.network is old:
            return self
        if self._prior_offset is not None:
            self._prior_offset = self._prior_offset.to(device=self.network.device, dtype=self.network.dtype)
        if self._train_x is not None:
            targets = self.targets.to(self.network.device)
            targets = targets.to(self.network.dtype) if targets.is_floating_point() else targets
            train_x = convert(self._train_x, self.network.device, self.network.dtype)
            self._jacobian = self._step = None
            self.fit(train_x, targets, self.max_iter, self.find_map)
        return self

    #: what a Laplace keeps of its own and does not save: the network (rebuild with the same model and ``params``) and
    #: how it computes (solver, memory budget, progress bars)
    _NOT_SAVED = ("network", "solver", "memory_budget", "progress")

    def state_dict(self) -> dict[str, Any]:
        """The posterior (settings, training data, MAP and factors) as plain tensors and numbers, for ``torch.save``
        (it loads with ``weights_only=True``); with θ0, which :meth:`load_state_dict` checks."""
        state: dict[str, Any] = {"theta0": self.network.theta0}
        for name, value in vars(self).items():
            if name in self._NOT_SAVED:
                continue
            if name == "_train_x" and value is not None:
                held = layout(value)
                value = {"kind": held.kind, "names": list(held.names), "tensors": leaves(value)}
            elif name == "_structure" and value is not None:
                value = value.state()
            state[name] = list(value) if isinstance(value, tuple) else value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> Laplace:
        """Restore a posterior saved by :meth:`state_dict` into this Laplace, built with the same network and
        parameter selection (θ0 must match); no network pass. Returns self."""
        theta0 = state.get("theta0")
        if (
            not isinstance(theta0, Tensor)
            or theta0.shape != self.network.theta0.shape
            or not torch.equal(theta0.to(self.network.theta0), self.network.theta0)
            or theta0.dtype != self.network.dtype
        ):
            raise ValueError(
                "the state was saved from another network, parameter selection or dtype (its θ0 differs from this "
                "Laplace's): build this Laplace with the same model, params and dtype"
            )
        restored = {}
        for name, value in state.items():
            if name == "theta0":
                continue
            if name == "_train_x" and isinstance(value, dict):
                value = Layout(value["kind"], tuple(value["names"])).build(value["tensors"])
            elif name == "_structure" and isinstance(value, dict):
                value = restore_structure(value)
            elif isinstance(value, list):  # a tuple in the posterior (lists are how state_dict saves them)
                value = tuple(value)
            restored[name] = value
        vars(self).update(restored)
        return self

    # ------------------------------------------------------------------ posterior
    @property
    def mean(self) -> Tensor:
        """θ_MAP (p,): μ + Δ with the step Δ (Jᵀα in function space) when the MAP is searched, θ0 post hoc."""
        self._check_fitted()
        centre = self._centre()
        return self.network.theta0 + self._map_step() if centre is None else self.prior_mean + self._map_step()

    @property
    def prior_mean(self) -> Tensor:
        """μ (p,), the prior's mean: θ0, zero or the vector given as ``prior_mean``."""
        theta0 = self.network.theta0
        return theta0 if self._prior_offset is None else theta0 + self._prior_offset

    def _shift(self, x: Inputs) -> Tensor:
        """J(x)(c − θ0) (m, C): the linearised outputs' move from θ0 to the centre c of the formulas (zeros for
        c = θ0)."""
        centre = self._centre()
        if centre is None:
            return torch.zeros((), dtype=self.network.dtype, device=self.network.device)
        with torch.no_grad():
            return self.network.jvp(x, centre.unsqueeze(0))[0]

    def _centre(self) -> Tensor | None:
        """c − θ0 (p,) for the centre c of the formulas: the prior mean when the MAP is searched, θ0 (None) post hoc
        (and for μ = θ0)."""
        return self._prior_offset if self.find_map else None

    def _map_step(self) -> Tensor:
        """θ_MAP − μ = Jᵀα (p,): one VJP at the training inputs, kept until δ changes."""
        self._check_fitted()
        if not self.dense:
            return self._delta
        if self._step is None:
            alpha = self._alpha.to(self.network.dtype).reshape(1, *self.f0.shape)
            self._step = self.network.vjp(self.train_x, alpha)[0]
        return self._step

    @property
    def covariance(self) -> LinearOperator:
        """Σ = (F + δI)⁻¹ as a lazy (p × p) operator (matrix-free: its rank-r Lanczos form, module docstring)."""
        self._check_fitted()
        if self._structure is not None:
            return StructureCovariance.of(self._structure, self.prior_precision, self.network.dtype)
        if not self.dense:
            lam, q, rho = self._low_rank()
            delta, p = self.prior_precision, self.network.num_params
            rest = torch.full((p,), 1.0 / (_scalar(delta) + rho), dtype=q.dtype, device=q.device)
            return MatmulLinearOperator(q * (1.0 / (lam + delta) - 1.0 / (delta + rho)), q.mT).add_diagonal(rest)
        precision = torch.tensor(self.prior_precision, dtype=torch.float64, device=self.kernel.device)
        return PosteriorCovariance.of(self.train_x, self._middle, precision, network=self.network)

    def fisher(self) -> LinearOperator:
        """F (p × p) at the training inputs, H at the MAP outputs (1/σ²-scaled for regression)."""
        self._check_fitted()
        return self._fisher_at(self._f_map)

    @property
    def precision(self) -> LinearOperator:
        """F + δI as a lazy (p × p) operator, products by ``hessian``."""
        net = self.network
        eye = torch.as_tensor(self.prior_precision, dtype=net.dtype, device=net.device).expand(net.num_params)
        return self.fisher().add_diagonal(eye.clone())

    def log_marginal_likelihood(
        self, rank: int | None = None, probes: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Laplace evidence log p(y | f_MAP) − δ/2 ‖Δ_MAP‖² − ½ log det(I + F/δ) (exact for regression).

        The log-determinant:
        - rank None: from the exact eigendecomposition (dense in N = n·C); matrix-free, by stochastic Lanczos
          quadrature as below with ``SLQ_STEPS`` steps and ``SLQ_PROBES`` probes.
        - rank r, probes None: from r Lanczos Ritz values of F (products by ``hessian``) and the rest of
          tr F spread evenly over the other p − r directions, Σ log(1 + λ/δ) + (p − r) log(1 + ρ/δ); by
          concavity of log an upper bound on it (a lower bound on the evidence), exact once r reaches
          the rank of F.
        - rank r, probes m: stochastic Lanczos quadrature of tr log(I + F/δ), r steps from each of m
          Rademacher probes (:func:`ntkgp.lanczos.lanczos_quadrature`) from ``generator`` (default: seeded 0, the
          same probes on every call and every rank); unbiased once r exceeds the rank of F, standard error ∝ 1/√m.
          Needs no trace of F.
        """
        self._check_fitted()
        delta = self.prior_precision
        rank = None if rank is None else as_count(rank, "rank")
        if probes is not None:
            probes = as_count(probes, "probes")
            if rank is None:
                raise ValueError("probes needs rank: the number of Lanczos steps per probe")
            logdet = self._slq_logdet(_scalar(delta), self._f_map, rank, probes, check_generator(generator))
        elif rank is None and self.dense:
            logdet = torch.log1p(self._evals / delta).sum()
        elif rank is None and self._structure is not None:
            logdet = self._structure.logdet(delta)
        elif rank is None:
            logdet = self._slq_logdet(
                _scalar(delta), self._f_map, self.SLQ_STEPS, self.SLQ_PROBES, check_generator(generator)
            )
        else:
            with torch.no_grad(), self.network.linearised(self.train_x, budget=self.memory_budget):
                lam, _, rho, rest = self._lanczos(rank)
            logdet = torch.log1p(lam / delta).sum().double() + rest * math.log1p(rho / delta)
        if self.dense:
            return -self._objective(self._alpha, _scalar(delta)) - 0.5 * logdet
        return self._data_fit(self._f_map, self._delta, delta) - 0.5 * logdet

    def _lanczos(self, rank: int) -> tuple[Tensor, Tensor, float, int]:
        """Top Ritz pairs (λ (r,), Q (p, r)) of F after ``rank`` Lanczos steps, the mean ρ of the rest of
        its spectrum over the other directions, and their number p − r."""
        rank = as_count(rank, "rank")
        spectrum = lanczos_spectrum(self.fisher(), rank)
        lam, q = spectrum.eigenvalues, spectrum.eigenvectors
        rest = self.network.num_params - lam.numel()
        rho = max(0.0, self._fisher_trace() - float(lam.sum())) / rest if rest > 0 else 0.0
        return lam, q, rho, rest

    def optimize_prior_precision(
        self,
        grid: Tensor | None = None,
        progress: bool = True,
        method: str = "marglik",
        val_loader: Any = None,
        link: str = "probit",
        prior_structure: str = "scalar",
    ) -> float | Tensor:
        """Set δ to the best grid value (default 10^-4 … 10^4, 33 points); return it.

        ``method="marglik"`` (default): the largest evidence. Each grid value costs the MAP (Newton, warm-started)
        and one Cholesky factor of the N × N matrix, or matrix-free the MAP (CG or Newton-CG, warm-started) and the
        quadrature of the log-determinant, whose nodes are computed once when F does not move with δ (regression, or
        ``find_map=False``) and at each MAP otherwise; in parameter space ("full") the eigenvalues of F, once, where F
        does not move, a Cholesky factor per value otherwise. ``method="gridsearch"``: the smallest negative
        log-likelihood of the predictive on validation data ``val_loader`` — a DataLoader of (x, y) batches, read
        once, or an (x, y) pair —, the GLM predictive with ``link`` for classification, the Gaussian of mean and
        variance plus the noise σ² for regression; each grid value costs the MAP and one prediction at the validation
        inputs. A progress bar over the grid unless ``progress`` is False. Warns when the best value is an end of the
        grid (the optimum may lie beyond it).

        ``prior_structure="layerwise"``: one δ per selected parameter tensor (``network.names``; with "kron" one per
        layer, its weight and bias together), by coordinate ascent — each one over the grid with the others fixed,
        two sweeps — returned as a (tensors,) tensor (parameter-space structures only: "full" in parameter space,
        "kron", "diag").
        """
        self._check_fitted()
        check_choice(method, "method", ("marglik", "gridsearch"))
        check_choice(prior_structure, "prior_structure", ("scalar", "layerwise"))
        grid = torch.logspace(-4, 4, 33, dtype=torch.float64) if grid is None else _as_grid(grid)
        if method == "gridsearch":
            score = self._validation_score(val_loader, link)
        elif val_loader is not None:
            raise ValueError("val_loader is for method='gridsearch'; the evidence (method='marglik') needs none")
        else:
            score = self._evidence
        if prior_structure == "layerwise":
            return self._layerwise(grid, score, progress)
        if self._structure is not None and (self.task == "regression" or not self.find_map):
            self._structure.prepare_grid()  # F does not move with δ
        best, best_value = float(grid[0]), -math.inf
        for delta in progress_bar(grid.tolist(), desc="prior precision", enabled=progress):
            value = score(delta)
            if value > best_value:
                best, best_value = delta, value
        if grid.numel() > 1 and best in (float(grid.min()), float(grid.max())):
            end = "largest" if best == float(grid.max()) else "smallest"
            criterion = "evidence is highest" if method == "marglik" else "validation NLL is lowest"
            warnings.warn(
                f"the {criterion} at the {end} prior precision of the grid (δ = {best:g}); the "
                "optimum may lie beyond it: extend the grid",
                RuntimeWarning,
                stacklevel=2,
            )
        self._update(best)
        return best

    def _layerwise(self, grid: Tensor, score: Callable[[Any], float], progress: bool) -> Tensor:
        """One δ per parameter tensor by coordinate ascent over ``grid`` (two sweeps): (layers,) float64."""
        if self.posterior not in PARAMETER_STRUCTURES:
            raise ValueError(
                "prior_structure='layerwise' needs a parameter-space posterior (hessian_structure 'full' with "
                f"p ≤ n·C, 'kron' or 'diag'); this one is {self.posterior!r}"
            )
        net = self.network
        sizes = torch.tensor(net.numels, device=net.device)
        current = self.prior_precision
        if isinstance(current, Tensor):  # (p,): the first entry of each tensor
            layers = current[torch.cumsum(sizes, 0) - sizes].clone()
        else:
            layers = torch.full((len(net.names),), current, dtype=torch.float64, device=net.device)
        expand = lambda values: torch.repeat_interleave(values, sizes)  # noqa: E731
        best_value = score(expand(layers))
        # the tensors that share one δ: each on its own, a module's together for K-FAC (one δ per block)
        owners = [name.rsplit(".", 1)[0] if self.posterior == "kron" else name for name in net.names]
        groups = [[k for k, owner in enumerate(owners) if owner == first] for first in dict.fromkeys(owners)]
        steps = [(sweep, group) for sweep in range(2) for group in groups]
        for _, group in progress_bar(steps, desc="prior precision per layer", enabled=progress):
            for value in grid.tolist():
                trial = layers.clone()
                trial[group] = value
                result = score(expand(trial))
                if result > best_value:
                    layers, best_value = trial, result
        self._update(expand(layers))
        return layers

    def _validation_score(self, data: Any, link: str) -> Callable[[float], float]:
        """δ -> minus the mean negative log-likelihood of the predictive at δ on the validation data (a DataLoader of
        (x, y) batches or an (x, y) pair), checked once."""
        if data is None:
            raise ValueError("method='gridsearch' needs validation data: val_loader=DataLoader of (x, y), or (x, y)")
        if isinstance(data, torch.utils.data.DataLoader):
            x, y = gather(data, None, self.network.dtype, self.network.device)
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            x, y = data
        else:
            raise TypeError(
                f"val_loader must be a DataLoader of (x, y) batches or an (x, y) pair, got {type(data).__name__}"
            )
        x = check_inputs(x, self.network.dtype, "the validation x", self.network.device, like=structure(self.train_x))
        targets = prepare_data(self.task, self.network, x, y, self.num_classes)[0]

        def score(delta: float) -> float:
            self._update(delta)
            prediction = self.predict(x, link=link)
            if isinstance(prediction, Prediction):
                mean, variance = prediction.mean.reshape(targets.shape), prediction.variance.reshape(targets.shape)
                variance = variance + self._sigma2
                nll = 0.5 * (torch.log(2 * math.pi * variance) + (targets - mean).square() / variance).sum(-1)
            else:
                assert isinstance(prediction, Tensor)
                nll = -torch.log(prediction.gather(-1, targets[:, None]).clamp_min(1e-300)).squeeze(-1)
            return -float(nll.mean())

        return score

    # ------------------------------------------------------------------ prediction
    def _latent(self, x: Inputs, spread: str, total: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Mean (m, C) of f_lin at θ_MAP and, for ``spread`` "diag" / "full" / "none", its variance
        (m, C), its covariance blocks (m, C, C) or None."""
        net, c, delta = self.network, self.num_outputs, self.prior_precision
        if spread == "none" or not self.dense:  # the mean: one JVP along θ_MAP − θ0
            with torch.no_grad():
                mean = (net(x) + net.jvp(x, (self.mean - net.theta0).unsqueeze(0))[0]).double()
            if spread == "none":
                return mean, None
            structured = self.posterior in PARAMETER_STRUCTURES
            if structured:
                return mean, self._spread_structured(x, spread, length(x) if total is None else total)
            return mean, self._spread_matrix_free(x, spread)
        cross, diagonal = self._cross_kernel(x)
        with torch.no_grad():
            mean = (net(x) + self._shift(x)).double() + (cross @ self._alpha).reshape(-1, c)
        reduced = (cross @ self._middle).reshape(-1, c, cross.shape[-1])
        cross = cross.reshape(-1, c, cross.shape[-1])
        if spread == "diag":
            if diagonal is None:
                diagonal = NTKOperator.of(x, x, network=net, num_outputs=c).diagonal().detach()
            prior = diagonal.double().reshape(-1, c)
            return mean, ((prior - (reduced * cross).sum(-1)) / delta).clamp_min(0)
        prior = torch.cat([j @ j.mT for j in net.jacobian_chunks(x)]).detach().double()
        cov = (prior - reduced @ cross.mT) / delta
        return mean, 0.5 * (cov + cov.mT)

    def _spread_structured(self, x: Inputs, spread: str, total: int) -> Tensor:
        """J(x) Σ J(x)ᵀ = WᵀW, W = Rᵀ J(x)ᵀ (R Rᵀ = Σ, :mod:`~ntkgp.posteriors.hessian_structures`), from per-sample
        Jacobians in chunks: variances (m, C) or blocks (m, C, C)."""
        structure, delta, p = self._structure, self.prior_precision, self.network.num_params
        assert structure is not None
        # one Linear layer: from its factors (for "full" once m·C makes the explicit Σ cheaper than the solves)
        if not isinstance(structure, FullStructure) or total * self.num_outputs > p / 4:  # (total: the prediction's)
            kernel = single_linear_layer(self.network, x)
            if kernel is not None and structure.covers(layer_slices(kernel)):
                return self._spread_linear_layer(kernel, structure, x, spread)
        parts = []
        with torch.no_grad():
            for jac in self.network.jacobian_chunks(x):  # (b, C, p)
                w = structure.root(delta, jac.reshape(-1, p).mT.double(), transpose=True).reshape(p, *jac.shape[:2])
                parts.append(w.square().sum(0) if spread == "diag" else torch.einsum("pbc,pbd->bcd", w, w))
        return torch.cat(parts)

    def _spread_linear_layer(self, kernel: LayerKernel, structure: Structure, x: Inputs, spread: str) -> Tensor:
        """J(x) Σ J(x)ᵀ when the selection is one Linear layer (J_i = g_i ⊗ ã_iᵀ, ã = [a, 1]) from its factors:
        g_i V_i g_iᵀ with V_i[o, q] = ã_iᵀ Σ_{oq} ã_i (:meth:`Structure.layer_quadratic`)."""
        layout, parts = layer_slices(kernel), []
        with torch.no_grad():
            for block in chunks(x, 1024):
                a, g = linear_layer_factors(kernel, block)  # (b, d_in), (b, C, d_out)
                blocks = g @ structure.layer_quadratic(self.prior_precision, a, *layout) @ g.mT
                parts.append(blocks.diagonal(dim1=-2, dim2=-1) if spread == "diag" else 0.5 * (blocks + blocks.mT))
        return torch.cat(parts)

    def _spread_matrix_free(self, x: Inputs, spread: str) -> Tensor:
        """J(x) Σ J(x)ᵀ of the rank-r posterior: variances (m, C) or blocks (m, C, C), from J(x)Q and the prior
        J(x)J(x)ᵀ (per-sample Jacobians times Q, or r JVPs: :func:`~ntkgp.gp.variance_projections.choose_path`)."""
        net, c, delta = self.network, self.num_outputs, self.prior_precision
        lam, q, rho = self._low_rank()
        coef = (1.0 / (lam + delta) - 1.0 / (delta + rho)).double()
        with torch.no_grad():
            cross, diagonal = parameter_projections(net, x, c, q, "auto", self.memory_budget, self.progress)
        cross = cross.double().reshape(length(x), c, -1)
        if spread == "diag":
            prior = diagonal.double().reshape(-1, c)
            return ((cross.square() * coef).sum(-1) + prior / (delta + rho)).clamp_min(0)
        prior = torch.cat([j @ j.mT for j in net.jacobian_chunks(x)]).detach().double()
        cov = (cross * coef) @ cross.mT + prior / (delta + rho)
        return 0.5 * (cov + cov.mT)

    def _cross_kernel(self, x: Inputs) -> tuple[Tensor, Tensor | None]:
        """(K(x, X) (m·C, N) float64, diag K(x, x) (m·C,) or None). J(X) (N × p) is kept after the first call when
        N·p is at most 8 · ``jacobian_chunk_elements``; later batches and calls then project the test Jacobians on
        it by the cheaper of per-sample Jacobians (which give the diagonal too) and N JVPs at x
        (:func:`~ntkgp.gp.variance_projections.parameter_projections`)."""
        net, c, size = self.network, self.num_outputs, self.kernel.shape[0]
        if self._jacobian is None and size * net.num_params <= 8 * net.jacobian_chunk_elements:
            eye = torch.eye(size, dtype=net.dtype, device=net.device).reshape(size, -1, c)
            self._jacobian = net.vjp(self.train_x, eye).detach()  # row k: J(X)ᵀ e_k
        if self._jacobian is None:
            return NTKOperator.of(x, self.train_x, network=net, num_outputs=c).to_dense().detach().double(), None
        with torch.no_grad():
            cross, diagonal = parameter_projections(net, x, c, self._jacobian.mT, "auto", self.memory_budget, False)
        return cross.detach().double(), diagonal.detach()

    def predict(
        self,
        x: Inputs,
        link: str = "probit",
        num_samples: int = 1000,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
        pred_type: str = "glm",
    ) -> Prediction | Tensor | tuple[Tensor, Tensor]:
        """The predictive at m inputs x.

        ``pred_type="glm"`` (default), the linearised (GLM) predictive. Regression: a :class:`Prediction` of the latent
        function, mean and variance (m,) for C = 1, else (m, C). Classification: class probabilities (m, C), by the
        per-class probit softmax(μ / √(1 + π/8 · var)) (``link="probit"``), by ``num_samples`` Monte Carlo draws of
        the logits from their full C × C covariance (``link="mc"``), or softmax(μ), the linearised MAP network alone
        (``link="map"``).

        ``pred_type="latent"``: the outputs' (logits') own GLM distribution, (mean (m, C), covariance (m, C, C)), for
        regression and classification alike (laplace-torch's ``link_approx`` is then the caller's).

        ``pred_type="nn"``: the network itself (not its linearisation) at ``num_samples`` parameter draws θ ~ N(θ_MAP,
        Σ) (:meth:`sample`): regression, a :class:`Prediction` of the outputs' sample mean and variance;
        classification, the mean of their softmax (m, C).
        """
        self._check_fitted()
        x = check_inputs(x, self.network.dtype, "x", self.network.device, like=structure(self.train_x))
        check_choice(link, "link", _LINKS)
        check_choice(pred_type, "pred_type", ("glm", "latent", "nn"))
        num_samples, batch_size = as_count(num_samples, "num_samples"), as_count(batch_size, "batch_size")
        check_generator(generator)
        if pred_type == "nn":
            return self._sampled_network(x, num_samples, generator, batch_size)
        kind = "diag" if self.task == "regression" else {"probit": "diag", "mc": "full", "map": "none"}[link]
        kind = "full" if pred_type == "latent" else kind
        parts = [self._latent(block, kind, length(x)) for block in chunks(x, batch_size)]
        mean, dtype = torch.cat([m for m, _ in parts]), self.network.dtype
        if kind == "none":
            check_prediction(x, mean=mean)
            return torch.softmax(mean, -1).to(dtype)
        spread = torch.cat([s for _, s in parts if s is not None])
        check_prediction(x, mean=mean, variance=spread)
        if self.approximate and self.variance_error is None and self.PROBES > 0:  # once per posterior (per δ)
            self._estimate_error(inputs_at(x, slice(0, self.PROBES)), mean[: self.PROBES], spread[: self.PROBES])
        if pred_type == "latent":
            return mean.to(dtype), spread.to(dtype)
        if self.task == "regression":
            squeeze = (lambda t: t.squeeze(-1)) if self.num_outputs == 1 else (lambda t: t)
            return Prediction(squeeze(mean).to(dtype), squeeze(spread).to(dtype), self.variance_error)
        if link == "probit":
            return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * spread), -1).to(dtype)
        return mc_class_probabilities(mean, spread, num_samples, generator).to(dtype)

    def _sampled_network(
        self, x: Inputs, num_samples: int, generator: torch.Generator | None, batch_size: int
    ) -> Prediction | Tensor:
        """The network at ``num_samples`` posterior draws of θ, on x in blocks of ``batch_size`` inputs."""
        net, dtype = self.network, self.network.dtype
        thetas = self.sample(num_samples, generator=generator)
        with torch.no_grad():
            outputs = torch.stack(
                [torch.cat([net(block, theta) for block in chunks(x, batch_size)]) for theta in thetas]
            )
        check_prediction(x, mean=outputs)
        if self.task == "classification":
            return torch.softmax(outputs, -1).mean(0).to(dtype)
        squeeze = (lambda t: t.squeeze(-1)) if self.num_outputs == 1 else (lambda t: t)
        return Prediction(squeeze(outputs.mean(0)), squeeze(outputs.var(0)), self.variance_error)

    def _estimate_error(self, x: Inputs, mean: Tensor, spread: Tensor) -> None:
        """Set ``variance_error`` (and ``probability_error``) of the low-rank posterior from the exact GLM variance
        diag J(x) (F + δI)⁻¹ J(x)ᵀ at probe inputs x (b, ...), one CG solve per output, against the approximate
        ``spread`` ((b, C) variances or (b, C, C) blocks) and ``mean`` (b, C). CG is preconditioned by the low-rank
        posterior itself (it inverts F + δI on the top Ritz directions already) and stops at a relative residual of
        1e-4 (or the solver's, if smaller): the error of vᵀx is CG's squared error in the (F + δI)-norm — or after
        ``ESTIMATE_PRODUCTS`` products (a diagonal preconditioner can leave F + δI badly conditioned), when the
        estimate is rough and says so (CG's variances then bound the exact ones from below)."""
        net, c = self.network, self.num_outputs
        tolerance = min(self.solver.cg_tolerance, 1e-4)
        size = length(x) * c
        eye = torch.eye(size, dtype=net.dtype, device=net.device).reshape(size, length(x), c)
        with torch.no_grad(), net.linearised(self.train_x, budget=self.memory_budget):
            rows = net.vjp(x, eye)  # J(x) (b·C, p)
            precision, approximate_inverse = self.precision, self.covariance
            solved = conjugate_gradients(
                lambda v: precision @ v,
                rows.mT,
                tolerance,
                min(self.solver.max_cg_iterations, self.ESTIMATE_PRODUCTS),
                desc="Laplace error estimate (CG products)",
                progress=self.progress,
                preconditioner=lambda v: approximate_inverse @ v,
            )
            residual = float(((precision @ solved - rows.mT).norm(dim=0) / rows.mT.norm(dim=0).clamp_min(1e-300)).max())
        self.estimate_converged = residual <= 10 * tolerance
        exact = (rows.mT * solved).sum(0).double().reshape(-1, c)
        approximate = spread.diagonal(dim1=-2, dim2=-1) if spread.dim() == 3 else spread
        self.variance_error = float((approximate - exact).abs().max() / exact.abs().max().clamp_min(1e-300))
        message = f"variance {self.variance_error:.2g} relative"
        if self.task == "classification":
            probit = lambda var: torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)  # noqa: E731
            self.probability_error = float((probit(approximate) - probit(exact)).abs().max())
            message += f", probit probabilities {self.probability_error:.2g}"
        if not self.estimate_converged:
            message += (
                f" (a rough estimate: CG stopped after {self.ESTIMATE_PRODUCTS} products at relative residual "
                f"{residual:.1g}; the exact variances are at least CG's)"
            )
        if self.variance_error > 1e-2 or (self.probability_error or 0.0) > 1e-2 or not self.estimate_converged:
            warnings.warn(
                f"Laplace.predict: the {_NAMES[self.posterior]} posterior's error on {length(x)} probe inputs: "
                f"{message}. For the exact posterior "
                + (
                    "raise memory_budget, max_size or Solver.lanczos_rank"
                    if self.posterior == "lowrank"
                    else "use hessian_structure='full'"
                ),
                RuntimeWarning,
                stacklevel=3,
            )

    def sample(self, k: int, rank: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """k parameter vectors θ ~ N(θ_MAP, Σ): (k, p).

        rank None: exact, through the dense eigendecomposition (one JVP and one VJP at the training
        inputs); matrix-free, the rank-``solver.lanczos_rank`` posterior. rank r: Lanczos on F (products by
        ``hessian``) for its top r Ritz pairs; the remaining mass tr F − Σλ is spread evenly over the p − r other
        directions (precision δ + ρ there).
        """
        self._check_fitted()
        k, generator = as_count(k, "k"), check_generator(generator)
        net, delta = self.network, self.prior_precision
        z = randn(k, net.num_params, dtype=net.dtype, device=net.device, generator=generator)
        if rank is None and self._structure is not None:
            return self.mean + self._structure.root(delta, z.mT.double()).mT.to(net.dtype)
        if rank is None and self.dense:
            bz = _blockwise(self._sqrt_h, net.jvp(self.train_x, z).reshape(k, -1).double())
            root = self._evals + delta
            coef = 1.0 / (root.sqrt() * (root.sqrt() + math.sqrt(delta)))
            w = _blockwise(self._sqrt_h, ((bz @ self._evecs) * coef) @ self._evecs.mT)
            correction = net.vjp(self.train_x, w.to(net.dtype).reshape(k, *self.f0.shape))
            return self.mean + (z - correction) / math.sqrt(delta)
        if rank is None:
            lam, q, rho = self._low_rank()
        else:
            with torch.no_grad(), net.linearised(self.train_x, budget=self.memory_budget):
                lam, q, rho, _ = self._lanczos(rank)
        scale = (lam + delta).rsqrt() - (delta + rho) ** -0.5
        return self.mean + z * (delta + rho) ** -0.5 + ((z @ q) * scale) @ q.mT
