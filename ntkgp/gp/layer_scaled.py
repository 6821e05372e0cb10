"""The NTK-GP with one kernel scale per parameter group: K = Σ_g s_g² J_g J_gᵀ = J D Jᵀ, J_g the Jacobian in group
g's parameters (per layer by default) and D the diagonal of the s_g² over the parameters, learned by the exact
marginal likelihood together with the noise σ².

With one scale the evidence has a closed form in the spectrum of K or of JᵀJ (what :class:`ntkgp.NTKGP` uses); with
several scales the eigenvectors of J D Jᵀ change with the scales and that shortcut no longer applies. Every evidence
evaluation here factors or iterates on a matrix that depends on the scales, and autograd (or linear_operator's
derivative of CG/SLQ) gives its gradient in the log scales and the log noise; L-BFGS optimises them.

Both spaces solve with a matrix M = I + (…)/σ² whose eigenvalues are ≥ 1 and equal to 1 off the data's directions,
so that log det C = log det M + N log σ² (N = n·C) and a stochastic estimate of log det M sees only the data's
directions (SLQ on C itself, or on JᵀJ + σ²D⁻¹, also sees log σ² or log(σ²/d) on every other direction: its
estimate was 1.2 nats off at a fitted point in parameter space):

- Function space (N rows): M = I + Σ_g (s_g²/σ²) K_g, rᵀC⁻¹r = rᵀM⁻¹r/σ². Dense with the group kernels K_g(X, X)
  formed once by :func:`ntkgp.operators.layer_kernel.dense_ntk` on each group's restriction of the network (layer
  factors or NTK products, never a Jacobian of the data set); iterative with each K_g a lazy
  :class:`~ntkgp.operators.NTKOperator` (CG for the solves, stochastic Lanczos quadrature for log det M).
- Parameter space (p rows), by Woodbury with S = D^½: M = I + S JᵀJ S/σ², rᵀC⁻¹r = (‖r‖² − b̃ᵀM⁻¹b̃/σ²)/σ²
  with b̃ = S Jᵀr. Dense (JᵀJ formed once) or iterative (S, the lazy :class:`~ntkgp.operators.GramOperator` and S
  again). Posterior over the parameters: mean S M⁻¹ b̃/σ², covariance S M⁻¹ S.

Dense M is positive definite by construction wherever the optimiser goes (:mod:`ntkgp.gp.identity_plus_gram`):
each K_g (or JᵀJ) is replaced once by its resolved positive semi-definite part with a root L_g (eigenvalues under
the network dtype's rounding floor dropped: a float32 kernel's are slightly negative), and M = I + WWᵀ, W = [√c_g
L_g], is factored by Cholesky while that is accurate and by the QR of [I; Wᵀ] beyond (a line search of the
sinusoid's fit tried s² = 1e13 against σ² = 2.6e-6, where the formed M had an eigenvalue of −7e3). The log scales
and the log noise are kept within ±:data:`LOG_BOUND`.

``solver`` chooses as in NTKGP (dense up to 2048 rows of the space's system). SLQ runs with fixed probe vectors
(``trace_samples`` of them) so that the objective L-BFGS sees is deterministic; its log determinant is an estimate
(with 256 probes the evidence was within 2.5e-5 of the exact one and its gradient within 4e-5, relative; fitted
with 32, the exact evidence at the result was 0.09 nats below the dense optimum). A single group is today's NTKGP in
both spaces (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import gpytorch
import torch
from linear_operator import settings
from linear_operator.operators import (
    AddedDiagLinearOperator,
    ConstantDiagLinearOperator,
    DiagLinearOperator,
    LinearOperator,
    SumLinearOperator,
)
from linear_operator.utils.linear_cg import linear_cg
from torch import Tensor, nn

from ..functional import FunctionalNetwork, as_functional_network, select_parameters
from ..inputs import Inputs, check_inputs, length, structure
from ..memory import default_budget
from ..operators.gram_operator import GramOperator
from ..operators.layer_kernel import dense_ntk
from ..operators.ntk_operator import NTKOperator
from ..validation import as_count, as_positive_float, check_choice, check_targets
from .identity_plus_gram import identity_plus_factor, log_determinant, psd_root
from .ntk_gp import Prediction
from .parameter_space import dense_gram
from .solver import Solver, as_solver

__all__ = ["LOG_BOUND", "LayerScaledNTKGP", "parameter_groups"]

#: The log scales and the log noise are clamped to ±LOG_BOUND (1e±30): a line search that steps further sees a flat
#: evidence there instead of an overflow.
LOG_BOUND = 69.0


def parameter_groups(
    network: FunctionalNetwork, groups: Mapping[str, Sequence[str] | str] | None = None
) -> dict[str, list[str]]:
    """Group name -> the network's selected parameter names in it: one group per module that holds parameters
    (``groups=None``), or the user's groups (name -> parameter names or module prefixes), which must cover every
    selected parameter exactly once."""
    if groups is None:
        out: dict[str, list[str]] = {}
        for name in network.names:
            out.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
        return out
    if not isinstance(groups, Mapping) or not groups:
        raise TypeError("groups must be a non-empty dict of group name -> parameter names or module prefixes")
    out = {g: select_parameters(network.module, spec) for g, spec in groups.items()}
    selected = set(network.names)
    for g, names in out.items():
        outside = [n for n in names if n not in selected]
        if outside:
            raise ValueError(f"group {g!r} names parameters the network does not linearise: {outside[:3]}")
    counts = {n: sum(n in names for names in out.values()) for n in network.names}
    missing, twice = [n for n, c in counts.items() if c == 0], [n for n, c in counts.items() if c > 1]
    if missing or twice:
        raise ValueError(
            f"groups must cover every linearised parameter exactly once; not covered: {missing[:3]}, "
            f"in several groups: {twice[:3]}"
        )
    return out


class _System(AddedDiagLinearOperator):
    """M = (lazy part) + I, whose CG runs with eps at the dtype's smallest normal number: linear_operator's default
    eps = 1e-10 clamps r·z and stalls CG near a relative residual of 1e-5 (Solver's note), so that
    ``inv_quad_logdet`` with its probe vectors ran all 2000 iterations at a residual of 1.2e-4."""

    def _solve(self, rhs: Tensor, preconditioner: Any = None, num_tridiag: int | None = 0) -> Any:
        tiny = torch.finfo(rhs.dtype).tiny
        return linear_cg(
            self._matmul,
            rhs,
            n_tridiag=num_tridiag,
            max_iter=settings.max_cg_iterations.value(),
            max_tridiag_iter=settings.max_lanczos_quadrature_iterations.value(),
            preconditioner=preconditioner,
            eps=tiny,
            stop_updating_after=tiny,
        )


class LayerScaledNTKGP(nn.Module):
    """Exact GP regression with K = Σ_g s_g² J_g J_gᵀ (module docstring).

    Args:
        model: the network (eval mode) or a FunctionalNetwork.
        train_x: n inputs (:mod:`ntkgp.inputs`).
        train_y: (n,) or (n, C).
        groups: None (one group per layer, i.e. per module holding parameters) or name -> parameter names /
            module prefixes.
        params: the parameters linearised (default all).
        space: ``"function"`` (N = n·C rows) or ``"parameter"`` (p rows).
        mean: ``"network"`` or ``"zero"``.
        outputscales: initial s_g² (one number for all groups, or one per group; default 1).
        noise: σ² (None: learned, default initial value 1e-2·Var(y)).
        solver: a :class:`~ntkgp.gp.solver.Solver` or its method name (default ``"auto"``: dense up to 2048 rows of
            the space's system, CG and SLQ beyond).
        trace_samples: SLQ probe vectors (fixed across evaluations).
    Attributes: ``outputscales`` (G,), ``noise``, ``group_names``.
    """

    def __init__(
        self,
        model: nn.Module | FunctionalNetwork,
        train_x: Inputs,
        train_y: Tensor,
        groups: Mapping[str, Sequence[str] | str] | None = None,
        params: Sequence[str] | str | None = None,
        space: str = "function",
        mean: str = "network",
        outputscales: float | Sequence[float] = 1.0,
        noise: float | None = None,
        solver: Solver | str | None = None,
        trace_samples: int = 32,
    ):
        super().__init__()
        check_choice(mean, "mean", ("network", "zero"))
        check_choice(space, "space", ("function", "parameter"))
        self.solver, self.trace_samples = as_solver(solver), as_count(trace_samples, "trace_samples")
        self.network = as_functional_network(model, params)
        train_x = check_inputs(train_x, self.network.dtype, "train_x", self.network.device)
        self.num_outputs = self.network.num_outputs(train_x)
        targets = check_targets(train_y, length(train_x), self.num_outputs, self.network.dtype)
        self.groups = parameter_groups(self.network, groups)
        self.group_names = list(self.groups)
        self.space, self.mean_kind, self.train_x = space, mean, train_x
        if space == "parameter":
            self._check_grouped_in_order()
        self._nets = [
            self.network if len(self.groups) == 1 else self.network.restricted(names) for names in self.groups.values()
        ]
        self._residual = (targets - self._mean(train_x)).reshape(-1).double()
        size = dict(zip(self.network.names, self.network.numels))
        self._group_sizes = torch.tensor(
            [sum(size[n] for n in names) for names in self.groups.values()],
            dtype=torch.float64,
            device=self.network.device,
        )
        self._group_of = torch.repeat_interleave(
            torch.arange(len(self.groups), device=self.network.device), self._group_sizes.long()
        )  # (p,): the group of each parameter
        self._dense = self.solver.dense(self._residual.numel() if space == "function" else self.network.num_params)
        self._parts = self._gradient = None  # dense: the PSD parts of the group kernels, or of JᵀJ
        with torch.no_grad():
            if space == "function" and self._dense:
                self._parts = [psd_root(dense_ntk(net, train_x)) for net in self._nets]  # K_g (N × N) each
            elif space == "parameter":
                n, c = length(train_x), self.num_outputs
                residual = self._residual.to(self.network.dtype).reshape(1, n, c)
                self._gradient = self.network.vjp(train_x, residual)[0].double()  # Jᵀr (p,)
                if self._dense:
                    self._parts = [psd_root(dense_gram(self.network, train_x, c, default_budget(self.network.device)))]
        scales = torch.as_tensor(outputscales, dtype=torch.float64).reshape(-1).expand(len(self.groups))
        for s in scales.tolist():
            as_positive_float(s, "outputscales")
        self.raw_log_scales = nn.Parameter(scales.log().clone())
        self.learn_noise = noise is None
        self._noise_floor = 1e-6 if noise is None else 0.0  # a learned σ² stays above 1e-6, as NTKGP's does
        start = 1e-2 * float(self._residual.var()) + 1e-6 if noise is None else as_positive_float(noise, "noise")
        self.raw_log_noise = nn.Parameter(
            torch.tensor(math.log(start), dtype=torch.float64), requires_grad=noise is None
        )

    def _check_grouped_in_order(self) -> None:
        """Parameter space puts s_g² on the parameters by position: each group's parameters must be consecutive in
        the network's parameter order (as the per-layer default always is)."""
        order = [name for names in self.groups.values() for name in names]
        if order != list(self.network.names):
            raise ValueError(
                "groups: in parameter space each group must hold consecutive parameters, listed in the "
                "network's order; reorder the groups or use space='function'"
            )

    @property
    def outputscales(self) -> Tensor:
        """s_g² (G,), detached."""
        return self._hyperparameters()[0].detach()

    @property
    def noise(self) -> float:
        """σ², a plain number."""
        return float(self._hyperparameters()[1].detach())

    def _mean(self, x: Inputs) -> Tensor:
        if self.mean_kind == "zero":
            return torch.zeros(length(x), self.num_outputs, dtype=self.network.dtype, device=self.network.device)
        return self.network.outputs(x)

    def _hyperparameters(self) -> tuple[Tensor, Tensor]:
        """(s_g² (G,), σ²), differentiable in the raw parameters."""
        bound = lambda raw: raw.clamp(-LOG_BOUND, LOG_BOUND).exp()  # noqa: E731
        return bound(self.raw_log_scales), self._noise_floor + bound(self.raw_log_noise)

    def _system(self) -> Tensor | LinearOperator:
        """M at the current hyperparameters (differentiable in them): I + Σ_g (s_g²/σ²) K_g in function space,
        I + S JᵀJ S/σ² in parameter space; when dense its triangular factor L (M = L Lᵀ, float64,
        :func:`~ntkgp.gp.identity_plus_gram.identity_plus_factor`), else a LinearOperator in the network's dtype."""
        scales, noise = self._hyperparameters()
        dtype, x = self.network.dtype, self.train_x
        if self.space == "function":
            if self._parts is not None:  # dense
                parts, weights = self._parts, scales / noise  # c_g (G,)
                gram = torch.stack([w * part.matrix for w, part in zip(weights, parts)]).sum(0)
                norm = sum(float(w.detach()) * part.top for w, part in zip(weights, parts))
                return identity_plus_factor(
                    gram, lambda: torch.cat([w.sqrt() * part.root for w, part in zip(weights, parts)], -1), norm
                )
            ops = [
                NTKOperator.of(x, x, network=net, num_outputs=self.num_outputs) * (s / noise).to(dtype)
                for s, net in zip(scales, self._nets)
            ]
            total = ops[0] if len(ops) == 1 else SumLinearOperator(*ops)
        else:
            weights = (scales / noise).sqrt()[self._group_of]  # S/σ (p,)
            if self._parts is not None:  # dense
                (part,) = self._parts
                gram = weights[:, None] * part.matrix * weights[None, :]
                norm = float(weights.detach().max()) ** 2 * part.top
                return identity_plus_factor(gram, lambda: weights[:, None] * part.root, norm)
            scaling = DiagLinearOperator(weights.to(dtype))
            total = scaling @ GramOperator.of(x, network=self.network) @ scaling
        unit = torch.ones(1, dtype=dtype, device=self.network.device)
        return _System(total, ConstantDiagLinearOperator(unit, diag_shape=total.shape[-1]))

    def _scaled_gradient(self) -> Tensor:
        """b̃ = S Jᵀr (p,) (parameter space), differentiable in the scales."""
        assert self._gradient is not None  # parameter space (set in __init__)
        return self._hyperparameters()[0].sqrt()[self._group_of] * self._gradient

    @contextmanager
    def _iterative(self) -> Iterator[None]:
        """CG and SLQ as the solver says, with the same probe vectors on every call (a seeded generator: the
        objective is deterministic), products at train_x from one cached forward pass."""
        devices = [self.network.device] if self.network.device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices),
            self.solver.settings(),
            gpytorch.settings.num_trace_samples(self.trace_samples),
            self.network.linearised(self.train_x),
        ):
            torch.manual_seed(0)
            yield

    def _inv_quad_logdet(self, system: Tensor | LinearOperator, rhs: Tensor) -> tuple[Tensor, Tensor]:
        """(rhsᵀ M⁻¹ rhs, log det M) for the system M (its factor when dense) and rhs (rows,), in float64."""
        if isinstance(system, Tensor):
            solved = torch.cholesky_solve(rhs.unsqueeze(-1), system)[:, 0]
            return rhs @ solved, log_determinant(system)
        with self._iterative():
            quad, logdet = system.inv_quad_logdet(rhs.to(self.network.dtype).unsqueeze(-1), logdet=True)
        return quad.double(), logdet.double()

    def _solve(self, system: Tensor | LinearOperator, rhs: Tensor) -> Tensor:
        """M⁻¹ rhs (rows, k) in float64."""
        if isinstance(system, Tensor):
            return torch.cholesky_solve(rhs, system)
        with self._iterative():
            return system.solve(rhs.to(self.network.dtype)).double()

    def log_marginal_likelihood(self) -> Tensor:
        """log p(y) (a float64 scalar, differentiable in ``raw_log_scales`` and ``raw_log_noise``)."""
        r, system, noise = self._residual, self._system(), self._hyperparameters()[1]
        if self.space == "function":
            quad, logdet = self._inv_quad_logdet(system, r)
            fit = quad / noise
        else:
            quad, logdet = self._inv_quad_logdet(system, self._scaled_gradient())
            fit = (r @ r - quad / noise) / noise
        return -0.5 * fit - 0.5 * (logdet + r.numel() * noise.log()) - 0.5 * r.numel() * math.log(2 * math.pi)

    def fit(self, max_iter: int = 100) -> LayerScaledNTKGP:
        """Maximise the evidence over the log scales (and the log noise when learned) by L-BFGS. Returns self.

        The dense evidence is finite at every point the line search may try (module docstring); an iterative one that
        is not raises a FloatingPointError naming the hyperparameters, never a raw linear-algebra error."""
        max_iter = as_count(max_iter, "max_iter")
        params = [self.raw_log_scales] + ([self.raw_log_noise] if self.learn_noise else [])
        optimizer = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            try:
                loss = -self.log_marginal_likelihood()
            except torch.linalg.LinAlgError as err:
                raise FloatingPointError(self._failure(str(err).splitlines()[0])) from err
            if not torch.isfinite(loss):
                raise FloatingPointError(self._failure("the evidence is not finite"))
            loss.backward()
            return loss

        optimizer.step(closure)
        return self

    def _failure(self, what: str) -> str:
        scales, noise = (t.detach() for t in self._hyperparameters())
        return (
            f"LayerScaledNTKGP.fit: {what} at outputscales {[f'{s:.3g}' for s in scales.tolist()]}, noise "
            f"{float(noise):.3g} ({self.solver.method} solver): use solver='cholesky' (exact and finite "
            "everywhere), a fixed noise, or float64"
        )

    def predict(self, x: Inputs, observation_noise: bool = False) -> Prediction:
        """Predictive mean and variance at x (m, ...): (m,) for one output, (m, C) otherwise."""
        x = check_inputs(x, self.network.dtype, "x", self.network.device, like=structure(self.train_x))
        with torch.no_grad():
            system, (scales, noise) = self._system(), self._hyperparameters()
            if self.space == "function":  # C⁻¹ = M⁻¹/σ²
                cross = sum(s * dense_ntk(net, x, self.train_x).double() for s, net in zip(scales, self._nets))
                prior = sum(s * dense_ntk(net, x).double().diagonal() for s, net in zip(scales, self._nets))
                solved = self._solve(system, torch.cat([self._residual.unsqueeze(-1), cross.T], -1)) / noise
                variance = prior - (cross.T * solved[:, 1:]).sum(0)
            else:  # the posterior over the parameters: mean S M⁻¹ b̃/σ², covariance S M⁻¹ S
                p, root = self.network.num_params, scales.sqrt()[self._group_of]
                cross = root * torch.cat(list(self.network.jacobian_chunks(x))).reshape(-1, p).double()  # J(x) S
                rhs = torch.cat([self._scaled_gradient().unsqueeze(-1) / noise, cross.T], -1)
                solved = self._solve(system, rhs)
                variance = (cross.T * solved[:, 1:]).sum(0)
            mean = self._mean(x).reshape(-1).double() + cross @ solved[:, 0]
            if observation_noise:
                variance = variance + self.noise
        shape = (length(x),) if self.num_outputs == 1 else (length(x), self.num_outputs)
        dtype = self.network.dtype
        return Prediction(mean.to(dtype).reshape(shape), variance.clamp_min(0).to(dtype).reshape(shape))
