"""The NTK-GP with one kernel scale per parameter group: K = Σ_g s_g² J_g J_gᵀ, J_g the Jacobian in group g's
parameters (per layer by default), learned by the exact marginal likelihood together with the noise σ².

With one scale the evidence has a closed form in the spectrum of K (what :class:`ntkgp.NTKGP` uses); with several
scales the eigenvectors of Σ_g s_g² K_g change with the scales and that shortcut no longer applies. Here the group
kernels K_g(X, X) (n·C × n·C) are made dense once (:func:`ntkgp.operators.layer_kernel.dense_ntk` on the group's
restriction of the network: layer factors or NTK products, never a Jacobian of the data set) and every evidence
evaluation is one float64 Cholesky factorisation of Σ_g s_g² K_g + σ²I, differentiated by autograd (exact
gradients in the log scales and log noise), optimised by L-BFGS. This is function space, for n·C up to a few
thousand; the parameter-space twin (CG on S JᵀJ S + σ²I and stochastic Lanczos quadrature for the log
determinant) is not built. A single group is today's NTKGP (tested).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..functional import FunctionalNetwork, as_functional_network, select_parameters
from ..operators.layer_kernel import dense_ntk
from ..validation import as_count, as_positive_float, check_choice, check_inputs, check_targets
from .ntk_gp import Prediction

__all__ = ["LayerScaledNTKGP", "parameter_groups"]


def parameter_groups(network: FunctionalNetwork, groups: Mapping[str, Sequence[str] | str] | None = None
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
        raise ValueError(f"groups must cover every linearised parameter exactly once; not covered: {missing[:3]}, "
                         f"in several groups: {twice[:3]}")
    return out


class LayerScaledNTKGP(nn.Module):
    """Exact GP regression with K = Σ_g s_g² J_g J_gᵀ (module docstring).

    Args:
        model: the network (eval mode) or a FunctionalNetwork; train_x (n, ...), train_y (n,) or (n, C).
        groups: None (one group per layer, i.e. per module holding parameters) or name -> parameter names /
            module prefixes.
        params: the parameters linearised (default all); mean: ``"network"`` or ``"zero"``.
        outputscales: initial s_g² (one number for all groups, or one per group; default 1); noise: σ² (None:
            learned, default initial value 1e-2·Var(y)).
    Attributes: ``outputscales`` (G,), ``noise``, ``group_names``.
    """

    def __init__(self, model: nn.Module | FunctionalNetwork, train_x: Tensor, train_y: Tensor,
                 groups: Mapping[str, Sequence[str] | str] | None = None, params=None, mean: str = "network",
                 outputscales: float | Sequence[float] = 1.0, noise: float | None = None):
        super().__init__()
        check_choice(mean, "mean", ("network", "zero"))
        self.network = as_functional_network(model, params)
        check_inputs(train_x, self.network.dtype, "train_x", self.network.device)
        self.num_outputs = self.network.num_outputs(train_x)
        targets = check_targets(train_y, train_x.shape[0], self.num_outputs, self.network.dtype)
        self.groups = parameter_groups(self.network, groups)
        self.group_names = list(self.groups)
        self.mean_kind, self.train_x = mean, train_x
        self._nets = [self.network if len(self.groups) == 1 else self.network.restricted(names)
                      for names in self.groups.values()]
        kernels = torch.stack([dense_ntk(net, train_x).double() for net in self._nets])  # (G, N, N)
        self._kernels = 0.5 * (kernels + kernels.mT)
        self._residual = (targets - self._mean(train_x)).reshape(-1).double()
        scales = torch.as_tensor(outputscales, dtype=torch.float64).reshape(-1).expand(len(self.groups))
        for s in scales.tolist():
            as_positive_float(s, "outputscales")
        self.raw_log_scales = nn.Parameter(scales.log().clone())
        self.learn_noise = noise is None
        self._noise_floor = 1e-6 if noise is None else 0.0  # a learned σ² stays above 1e-6, as NTKGP's does
        start = 1e-2 * float(self._residual.var()) + 1e-6 if noise is None else as_positive_float(noise, "noise")
        self.raw_log_noise = nn.Parameter(torch.tensor(math.log(start), dtype=torch.float64),
                                          requires_grad=noise is None)

    @property
    def outputscales(self) -> Tensor:
        return self.raw_log_scales.detach().exp()

    @property
    def noise(self) -> Tensor:
        return self._noise_floor + self.raw_log_noise.detach().exp()

    def _mean(self, x: Tensor) -> Tensor:
        if self.mean_kind == "zero":
            return torch.zeros(x.shape[0], self.num_outputs, dtype=self.network.dtype, device=self.network.device)
        return self.network.outputs(x)

    def _factor(self) -> Tensor:
        """Cholesky factor of Σ_g s_g² K_g + σ²I (differentiable in the log scales and log noise)."""
        kernel = (self.raw_log_scales.exp()[:, None, None] * self._kernels).sum(0)
        eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
        return torch.linalg.cholesky(kernel + (self._noise_floor + self.raw_log_noise.exp()) * eye)

    def log_marginal_likelihood(self) -> Tensor:
        """log p(y) (a float64 scalar, differentiable in ``raw_log_scales`` and ``raw_log_noise``)."""
        factor = self._factor()
        r = self._residual.unsqueeze(-1)
        alpha = torch.cholesky_solve(r, factor)
        return (-0.5 * (r * alpha).sum() - factor.diagonal().log().sum()
                - 0.5 * r.shape[0] * math.log(2 * math.pi))

    def fit(self, max_iter: int = 100) -> LayerScaledNTKGP:
        """Maximise the evidence over the log scales (and the log noise when learned) by L-BFGS. Returns self."""
        max_iter = as_count(max_iter, "max_iter")
        params = [self.raw_log_scales] + ([self.raw_log_noise] if self.learn_noise else [])
        optimizer = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = -self.log_marginal_likelihood()
            loss.backward()
            return loss

        optimizer.step(closure)
        return self

    def predict(self, x: Tensor, observation_noise: bool = False) -> Prediction:
        """Predictive mean and variance at x (m, ...): (m,) for one output, (m, C) otherwise."""
        check_inputs(x, self.network.dtype, "x", self.network.device, input_shape=self.train_x.shape[1:])
        with torch.no_grad():
            scales = self.outputscales
            cross = sum(s * dense_ntk(net, x, self.train_x).double() for s, net in zip(scales, self._nets))
            prior = sum(s * dense_ntk(net, x).double().diagonal() for s, net in zip(scales, self._nets))
            factor = self._factor()
            mean = cross @ torch.cholesky_solve(self._residual.unsqueeze(-1), factor)[:, 0]
            projected = torch.linalg.solve_triangular(factor, cross.T, upper=False)
            variance = prior - (projected * projected).sum(0)
            if observation_noise:
                variance = variance + self.noise
        shape = (x.shape[0],) if self.num_outputs == 1 else (x.shape[0], self.num_outputs)
        dtype = self.network.dtype
        mean = self._mean(x).reshape(-1).double() + mean
        return Prediction(mean.to(dtype).reshape(shape), variance.clamp_min(0).to(dtype).reshape(shape))
