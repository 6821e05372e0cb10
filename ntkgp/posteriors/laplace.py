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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..operators.fisher_operator import FISHER_METHODS, FisherOperator, default_epsilon
from ..functional import FunctionalNetwork, as_functional_network, map_blocks
from ..operators.network_operator import NetworkOperator
from ..lanczos import stochastic_lanczos_quadrature
from ..likelihoods import get_likelihood
from .linearised_model import (TASKS, check_task, log_likelihood, mc_class_probabilities,
                               prepare_data, randn)
from ..gp.ntk_gp import Prediction
from ..operators.ntk_operator import NTKOperator
from ..gp.parameter_space import lanczos_spectrum
from ..validation import (as_count, as_positive_float, check_choice, check_generator, check_inputs, check_not_sharded,
                          check_prediction)

__all__ = ["Laplace", "PosteriorCovariance"]

_LINKS = ("probit", "mc", "map")


class PosteriorCovariance(NetworkOperator):
    """Σ = (I − J(x)ᵀ M J(x))/δ, shape (p, p): a product is one JVP and one VJP at x.

    Args: x (n, ...), middle M (n·C, n·C), delta δ (a 0-d tensor); keywords ``network`` and ``batch_shape``
    (see :class:`~ntkgp.operators.network_operator.NetworkOperator`). M was computed from the training inputs x, so
    the products are not differentiable in x (x is used detached); they are in M and δ.
    """

    def __init__(self, x: Tensor, middle: Tensor, delta: Tensor, *, network: FunctionalNetwork,
                 batch_shape: torch.Size | tuple[int, ...] = ()):
        super().__init__(x, middle, delta, network=network, batch_shape=batch_shape)
        self.x, self.middle, self.delta = x, middle, delta

    def _matrix_shape(self) -> tuple[int, int]:
        return self.network.num_params, self.network.num_params

    def _matmul_matrix(self, rhs: Tensor) -> Tensor:
        net, n, x = self.network, self.x.shape[0], self.x.detach()

        def block(v: Tensor) -> Tensor:
            jv = net.jvp(x, v).reshape(v.shape[0], -1)
            w = (jv.to(self.middle.dtype) @ self.middle.mT).to(v.dtype)  # rows (M J v)ᵀ
            return (v - net.vjp(x, w.reshape(v.shape[0], n, -1))) / self.delta.to(v.dtype)

        return map_blocks(block, rhs.mT, net.chunk_size).mT


def _blockwise(blocks: Tensor, vectors: Tensor) -> Tensor:
    """Apply the block-diagonal matrix with blocks (n, C, C) to vectors (..., n·C) -> (..., n·C)."""
    n, c = blocks.shape[0], blocks.shape[-1]
    return torch.einsum("iab,...ib->...ia", blocks, vectors.reshape(*vectors.shape[:-1], n, c)).flatten(-2)


def _as_grid(grid) -> Tensor:
    """A grid of prior precisions (a sequence or tensor) as a 1-d float64 tensor of finite values > 0."""
    try:
        values = torch.as_tensor(grid, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"grid must be a 1-d sequence or tensor of prior precisions > 0, got {grid!r}") from err
    if values.dim() != 1 or values.numel() == 0 or not bool((torch.isfinite(values) & (values > 0)).all()):
        raise ValueError(f"grid must be a non-empty 1-d sequence of finite prior precisions > 0, got {grid!r}")
    return values


def _psd_sqrt(blocks: Tensor) -> Tensor:
    """Symmetric square roots of PSD blocks (n, C, C)."""
    evals, evecs = torch.linalg.eigh(blocks)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.mT


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
        prior_precision: δ > 0 of the prior N(θ0, I/δ) centred at the pretrained weights.
        noise: σ² for regression; must be None for classification.
        num_classes: if given, must equal the network's output width C.
        max_size: largest N = n·C accepted (the posterior is dense in N).
    """

    def __init__(self, model: nn.Module | FunctionalNetwork, likelihood: str = "regression",
                 params: Sequence[str] | str | None = None, hessian: str = "exact", prior_precision: float = 1.0,
                 noise: float | None = None, num_classes: int | None = None, chunk_size: int | None = None,
                 max_size: int = 8192):
        self.noise = check_task(likelihood, noise, prior_precision)
        self.task, self.hessian = likelihood, check_choice(hessian, "hessian", FISHER_METHODS)
        self.prior_precision = as_positive_float(prior_precision, "prior_precision")
        self.network = as_functional_network(model, params, chunk_size)
        self.num_classes = None if num_classes is None else as_count(num_classes, "num_classes", minimum=2)
        self.max_size = as_count(max_size, "max_size")
        self.train_x: Tensor | None = None

    # ------------------------------------------------------------------ fitting
    def fit(self, train_x: Tensor, train_y: Tensor, max_iter: int = 100, find_map: bool = True) -> Laplace:
        """MAP of the linearised model on (train_x (n, ...), train_y) and the posterior around it.

        ``find_map=False`` takes the network as the MAP already (θ_MAP = θ0, post-hoc Laplace of a
        trained network, as laplace-torch does); the posterior and evidence are then formed at θ0.
        """
        check_not_sharded(self.network, train_x, "Laplace")
        targets, c = prepare_data(self.task, self.network, train_x, train_y, self.num_classes)
        max_iter = as_count(max_iter, "max_iter")
        if not isinstance(find_map, bool):
            raise TypeError(f"find_map must be True or False, got {find_map!r}")
        size = train_x.shape[0] * c
        if size > self.max_size:
            raise ValueError(f"n·C = {size} exceeds max_size = {self.max_size}: this Laplace posterior is exact "
                             "and dense in n·C; use fewer training points, raise max_size, or use ntkgp.SVI")
        self.train_x, self.targets, self.num_outputs, self.max_iter = train_x, targets, c, max_iter
        self.find_map = find_map
        self.f0 = self.network.outputs(train_x, "train_x")
        kernel = NTKOperator(train_x, train_x, network=self.network, num_outputs=c).to_dense().detach()
        self.kernel = (0.5 * (kernel + kernel.mT)).double()
        self._alpha = torch.zeros(size, dtype=torch.float64, device=kernel.device)
        self._jacobian = None
        self._update(self.prior_precision)
        return self

    def _update(self, delta: float) -> None:
        """MAP and posterior for prior precision δ (the NTK is reused: no network passes)."""
        self.prior_precision = delta
        if self.find_map:
            self._alpha = self._map_coefficients(delta, self._alpha)
        self._step = None
        self._f_map = self._outputs(self._alpha)
        s = self._sqrt_h = _psd_sqrt(self._hessian_blocks(self._f_map))
        evals, evecs = torch.linalg.eigh(self._whitened_kernel(s))
        self._evals, self._evecs = evals.clamp_min(0), evecs
        su = _blockwise(s, evecs.mT).mT  # S U
        self._middle = (su / (self._evals + delta)) @ su.mT

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
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device).expand(f.shape[0], -1, -1)
        blocks = get_likelihood(TASKS[self.task]).fisher(f.unsqueeze(-2), eye)
        return blocks if self.noise is None else blocks / self.noise

    def _objective(self, alpha: Tensor, delta: float) -> Tensor:
        """−log p(y | f0 + Kα) + δ/2 αᵀKα."""
        f = self._outputs(alpha)
        quadratic = alpha @ (f - self.f0.double()).reshape(-1)
        return -log_likelihood(self.task, f, self._targets64(), self.noise) + 0.5 * delta * quadratic

    def _evidence(self, delta: float) -> tuple[float, Tensor]:
        """(Laplace evidence, α) at δ through one Cholesky factor, without the eigendecomposition."""
        alpha = self._map_coefficients(delta, self._alpha) if self.find_map else self._alpha
        g = self._whitened_kernel(_psd_sqrt(self._hessian_blocks(self._outputs(alpha))))
        chol = torch.linalg.cholesky(torch.eye(g.shape[0], dtype=g.dtype, device=g.device) + g / delta)
        logdet = 2 * chol.diagonal().log().sum()
        return float(-self._objective(alpha, delta) - 0.5 * logdet), alpha

    def _targets64(self) -> Tensor:
        return self.targets.double() if self.task == "regression" else self.targets

    def _map_coefficients(self, delta: float, start: Tensor) -> Tensor:
        """α of the MAP Δ = Jᵀα: closed form for regression, Newton from ``start`` for classification.

        Newton step: α' = (δI + WK)⁻¹ b = (b − S (δI + SKS)⁻¹ S K b)/δ with W = S², one Cholesky factor.
        """
        eye = torch.eye(self.kernel.shape[0], dtype=self.kernel.dtype, device=self.kernel.device)
        if self.task == "regression":
            residual = (self._targets64() - self.f0.double()).reshape(-1)
            return torch.cholesky_solve(residual.unsqueeze(-1),
                                        torch.linalg.cholesky(self.kernel + self.noise * delta * eye)).squeeze(-1)
        n, c = self.f0.shape
        f0 = self.f0.double().reshape(-1)
        onehot = torch.nn.functional.one_hot(self.targets, c).double().reshape(-1)
        alpha, value = start, self._objective(start, delta)
        for _ in range(self.max_iter):
            f = self._outputs(alpha).reshape(-1)
            h = self._hessian_blocks(f.reshape(n, c))
            s = _psd_sqrt(h)
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

    def _check_fitted(self) -> None:
        if self.train_x is None:
            raise RuntimeError("call .fit(train_x, train_y) first")

    # ------------------------------------------------------------------ posterior
    @property
    def mean(self) -> Tensor:
        """θ_MAP = θ0 + Jᵀα (p,)."""
        return self.network.theta0 + self._map_step()

    def _map_step(self) -> Tensor:
        """θ_MAP − θ0 = Jᵀα (p,): one VJP at the training inputs, kept until δ changes."""
        self._check_fitted()
        if self._step is None:
            alpha = self._alpha.to(self.network.dtype).reshape(1, *self.f0.shape)
            self._step = self.network.vjp(self.train_x, alpha)[0]
        return self._step

    @property
    def covariance(self) -> PosteriorCovariance:
        """Σ = (F + δI)⁻¹ as a lazy (p × p) operator."""
        self._check_fitted()
        delta = torch.tensor(self.prior_precision, dtype=torch.float64, device=self.kernel.device)
        return PosteriorCovariance(self.train_x, self._middle, delta, network=self.network)

    def fisher(self) -> LinearOperator:
        """F (p × p) at the training inputs, H at the MAP outputs (1/σ²-scaled for regression)."""
        self._check_fitted()
        op = FisherOperator(self.train_x, network=self.network, likelihood=TASKS[self.task], method=self.hessian,
                            epsilon=default_epsilon(self.network.theta0, self.hessian),
                            at=self._f_map.to(self.network.dtype))
        return op if self.task == "classification" else op * (1.0 / self.noise)

    @property
    def precision(self) -> LinearOperator:
        """F + δI as a lazy (p × p) operator, products by ``hessian``."""
        eye = torch.full((self.network.num_params,), self.prior_precision, dtype=self.network.dtype,
                         device=self.network.device)
        return self.fisher().add_diagonal(eye)

    def log_marginal_likelihood(self, rank: int | None = None, probes: int | None = None,
                                generator: torch.Generator | None = None) -> Tensor:
        """Laplace evidence log p(y | f_MAP) − δ/2 ‖Δ_MAP‖² − ½ log det(I + F/δ) (exact for regression).

        The log-determinant:
        - rank None: from the exact eigendecomposition (dense in N = n·C).
        - rank r, probes None: from r Lanczos Ritz values of F (products by ``hessian``) and the rest of
          tr F spread evenly over the other p − r directions, Σ log(1 + λ/δ) + (p − r) log(1 + ρ/δ); by
          concavity of log an upper bound on it (a lower bound on the evidence), exact once r reaches
          the rank of F.
        - rank r, probes m: stochastic Lanczos quadrature of tr log(I + F/δ), r steps from each of m
          Rademacher probes (:func:`ntkgp.lanczos.stochastic_lanczos_quadrature`); unbiased
          once r exceeds the rank of F, standard error ∝ 1/√m. Needs no trace of F.
        """
        self._check_fitted()
        delta = self.prior_precision
        rank = None if rank is None else as_count(rank, "rank")
        if probes is not None:
            probes = as_count(probes, "probes")
            if rank is None:
                raise ValueError("probes needs rank: the number of Lanczos steps per probe")
            scaled = (self.fisher() * (1.0 / delta)).add_diagonal(torch.tensor(1.0, dtype=self.network.dtype,
                                                                                device=self.network.device))
            logdet = stochastic_lanczos_quadrature(scaled, torch.log, rank, probes, generator).double()
        elif rank is None:
            logdet = torch.log1p(self._evals / delta).sum()
        else:
            lam, _, rho, rest = self._lanczos(rank)
            logdet = torch.log1p(lam / delta).sum().double() + rest * math.log1p(rho / delta)
        return -self._objective(self._alpha, delta) - 0.5 * logdet

    def _lanczos(self, rank: int) -> tuple[Tensor, Tensor, float, int]:
        """Top Ritz pairs (λ (r,), Q (p, r)) of F after ``rank`` Lanczos steps, the mean ρ of the rest of
        its spectrum over the other directions, and their number p − r."""
        rank = as_count(rank, "rank")
        spectrum = lanczos_spectrum(self.fisher(), rank)
        lam, q = spectrum.eigenvalues, spectrum.eigenvectors
        rest = self.network.num_params - lam.numel()
        rho = max(0.0, float(self._evals.sum() - lam.sum())) / rest if rest > 0 else 0.0
        return lam, q, rho, rest

    def optimize_prior_precision(self, grid: Tensor | None = None, progress: bool = True) -> float:
        """Set δ to the grid value (default 10^-4 … 10^4, 33 points) of largest evidence; return it.

        Each grid value costs the MAP (Newton, warm-started) and one Cholesky factor of the N × N matrix
        (a progress bar over the grid unless ``progress`` is False). Warns when the best value is an
        end of the grid (the optimum may lie beyond it).
        """
        self._check_fitted()
        grid = torch.logspace(-4, 4, 33, dtype=torch.float64) if grid is None else _as_grid(grid)
        best, best_value = None, -math.inf
        for delta in tqdm(grid.tolist(), desc="prior precision", disable=not progress):
            value, self._alpha = self._evidence(delta)  # warm start for the next grid value
            if value > best_value:
                best, best_value = delta, value
        if grid.numel() > 1 and best in (float(grid.min()), float(grid.max())):
            end = "largest" if best == float(grid.max()) else "smallest"
            warnings.warn(f"the evidence is highest at the {end} prior precision of the grid (δ = {best:g}); the "
                          "optimum may lie beyond it: extend the grid", RuntimeWarning, stacklevel=2)
        self._update(best)
        return best

    # ------------------------------------------------------------------ prediction
    def _latent(self, x: Tensor, spread: str) -> tuple[Tensor, Tensor | None]:
        """Mean (m, C) of f_lin at θ_MAP and, for ``spread`` "diag" / "full" / "none", its variance
        (m, C), its covariance blocks (m, C, C) or None."""
        net, c, delta = self.network, self.num_outputs, self.prior_precision
        if spread == "none":  # the mean alone is one JVP along θ_MAP − θ0; K(x, X) is for the spread
            with torch.no_grad():
                return (net(x) + net.jvp(x, self._map_step().unsqueeze(0))[0]).double(), None
        cross = self._cross_kernel(x)
        with torch.no_grad():
            mean = net(x).double() + (cross @ self._alpha).reshape(-1, c)
        reduced = (cross @ self._middle).reshape(-1, c, cross.shape[-1])
        cross = cross.reshape(-1, c, cross.shape[-1])
        if spread == "diag":
            prior = NTKOperator(x, x, network=net, num_outputs=c).diagonal().detach().double().reshape(-1, c)
            return mean, ((prior - (reduced * cross).sum(-1)) / delta).clamp_min(0)
        prior = torch.cat([j @ j.mT for j in net.jacobian_chunks(x)]).detach().double()
        cov = (prior - reduced @ cross.mT) / delta
        return mean, 0.5 * (cov + cov.mT)

    def _cross_kernel(self, x: Tensor) -> Tensor:
        """K(x, X) (m·C, N), float64. J(X) (N × p) is kept after the first call when N·p is at most
        8 · ``jacobian_chunk_elements``, so later batches and calls need only the JVPs at x."""
        net, c, size = self.network, self.num_outputs, self.kernel.shape[0]
        if self._jacobian is None and size * net.num_params <= 8 * net.jacobian_chunk_elements:
            eye = torch.eye(size, dtype=net.dtype, device=net.device).reshape(size, -1, c)
            self._jacobian = net.vjp(self.train_x, eye).detach()  # row k: J(X)ᵀ e_k
        if self._jacobian is None:
            return NTKOperator(x, self.train_x, network=net, num_outputs=c).to_dense().detach().double()
        return net.jvp(x, self._jacobian).detach().reshape(size, -1).mT.double()

    def predict(self, x: Tensor, link: str = "probit", num_samples: int = 1000,
                generator: torch.Generator | None = None, batch_size: int = 256) -> Prediction | Tensor:
        """Linearised (GLM) predictive at x (m, ...).

        Regression: a :class:`Prediction` of the latent function, mean and variance (m,) for C = 1,
        else (m, C). Classification: class probabilities (m, C), by the per-class probit
        softmax(μ / √(1 + π/8 · var)) (``link="probit"``), by ``num_samples`` Monte Carlo draws of
        the logits from their full C × C covariance (``link="mc"``), or softmax(μ), the linearised MAP
        network alone (``link="map"``).
        """
        self._check_fitted()
        check_inputs(x, self.network.dtype, "x", self.network.device, input_shape=self.train_x.shape[1:])
        check_choice(link, "link", _LINKS)
        num_samples, batch_size = as_count(num_samples, "num_samples"), as_count(batch_size, "batch_size")
        check_generator(generator)
        kind = "diag" if self.task == "regression" else {"probit": "diag", "mc": "full", "map": "none"}[link]
        parts = [self._latent(x[i:i + batch_size], kind) for i in range(0, x.shape[0], batch_size)]
        mean, dtype = torch.cat([m for m, _ in parts]), self.network.dtype
        spread = None if kind == "none" else torch.cat([s for _, s in parts])
        check_prediction(x, mean=mean, variance=spread)
        if self.task == "regression":
            squeeze = (lambda t: t.squeeze(-1)) if self.num_outputs == 1 else (lambda t: t)
            return Prediction(squeeze(mean).to(dtype), squeeze(spread).to(dtype))
        if link == "map":
            return torch.softmax(mean, -1).to(dtype)
        if link == "probit":
            return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * spread), -1).to(dtype)
        return mc_class_probabilities(mean, spread, num_samples, generator).to(dtype)

    def sample(self, k: int, rank: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """k parameter vectors θ ~ N(θ_MAP, Σ): (k, p).

        rank None: exact, through the dense eigendecomposition (one JVP and one VJP at the training
        inputs). rank r: Lanczos on F (products by ``hessian``) for its top r Ritz pairs; the remaining
        mass tr F − Σλ is spread evenly over the p − r other directions (precision δ + ρ there).
        """
        self._check_fitted()
        k, generator = as_count(k, "k"), check_generator(generator)
        net, delta = self.network, self.prior_precision
        z = randn(k, net.num_params, dtype=net.dtype, device=net.device, generator=generator)
        if rank is None:
            bz = _blockwise(self._sqrt_h, net.jvp(self.train_x, z).reshape(k, -1).double())
            root = self._evals + delta
            coef = 1.0 / (root.sqrt() * (root.sqrt() + math.sqrt(delta)))
            w = _blockwise(self._sqrt_h, ((bz @ self._evecs) * coef) @ self._evecs.mT)
            correction = net.vjp(self.train_x, w.to(net.dtype).reshape(k, *self.f0.shape))
            return self.mean + (z - correction) / math.sqrt(delta)
        lam, q, rho, _ = self._lanczos(rank)
        scale = (lam + delta).rsqrt() - (delta + rho) ** -0.5
        return self.mean + z * (delta + rho) ** -0.5 + ((z @ q) * scale) @ q.mT
