"""K-FAC preconditioning of the (constant) curvature of LQF, by curvlinops-for-pytorch.

The LQF objective Σ_i ℓ(f_lin(x_i), y_i) + (λ/2)‖θ − θ0‖² has the Hessian H = Σ_i J_iᵀ H_i J_i + λI at every
θ for the MSE loss (H_i = 2I) and at θ0 for cross-entropy (H_i = diag π − ππᵀ, the type-2 Fisher). Its K-FAC
approximation K (Martens & Grosse 2015; Grosse & Martens 2016 for Conv2d) is computed once, by curvlinops'
``KFACLinearOperator`` with the type-2 Fisher and the loss summed (``MSELoss(reduction="sum")``, whose
loss Hessian is 2I: K approximates 2·JᵀJ, exactly the curvature of the sum of squares), and applied as
(K + λI)⁻¹ by ``KFACInverseLinearOperator(K, damping=λ, use_exact_damping=True)``. A layer's weight and bias
form one block (``separate_weight_and_bias=False``, the inputs augmented by a constant 1, as Martens & Grosse):
for one Linear layer K is then exactly 2JᵀJ, where separate blocks miss the weight-bias coupling of features
with a non-zero mean (measured: the preconditioned condition number of a last layer went from 187 to 1). curvlinops handles
Linear and Conv2d layers only; every other parameter in scope (BatchNorm or LayerNorm affine weights,
embeddings) gets a diagonal block, the exact diagonal of the curvature, computed once from per-sample
Jacobians (:meth:`~ntkgp.operators.fisher_operator.FisherOperator._diagonal`).
"""

from __future__ import annotations

import warnings

import torch
from curvlinops import KFACInverseLinearOperator, KFACLinearOperator
from curvlinops.kfac import FisherType
from torch import Tensor, nn

from ..functional import FunctionalNetwork
from ..operators.fisher_operator import FisherOperator
from ..validation import as_count, as_positive_float, check_choice

__all__ = ["KFACPreconditioner", "kfac_layers"]

_LOSSES = {"mse": ("gaussian", 2.0), "cross_entropy": ("categorical", 1.0)}  # likelihood H_i, its scale


def kfac_layers(module: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """Split parameter names into those of Linear/Conv2d layers (K-FAC) and the others (diagonal)."""
    owners = {f"{prefix}.{n}" if prefix else n: m for prefix, m in module.named_modules()
              for n, _ in m.named_parameters(recurse=False)}
    supported = [n for n in names if isinstance(owners[n], (nn.Linear, nn.Conv2d))]
    return supported, [n for n in names if n not in supported]


class _Flat(nn.Module):
    """The network's outputs as (n, C), the shape curvlinops' losses take."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).reshape(x.shape[0], -1)


class KFACPreconditioner:
    """(K + λI)⁻¹, K the K-FAC of Σ_i J_iᵀ H_i J_i over inputs x (n, ...) at θ0: a (p × p) operator.

    Args:
        network: the linearisation (its snapshot at θ0 is what K describes).
        x: training inputs (n, ...).
        damping: λ > 0, the weight decay of the LQF objective.
        loss: ``"mse"`` (H_i = 2I: K ≈ 2JᵀJ) or ``"cross_entropy"`` (H_i = diag π − ππᵀ at f(x_i; θ0), labels
            not used: the type-2 Fisher).
        batch_size: inputs per forward pass while the factors are accumulated.

    The factors and their damped inverses are computed here, once. ``@`` applies (K + λI)⁻¹ to vectors
    (p,) or (p, k); :meth:`curvature` applies K + λI. Raises if no parameter in scope belongs to a Linear or
    Conv2d layer; warns once naming the layers that get a diagonal block instead.
    """

    def __init__(self, network: FunctionalNetwork, x: Tensor, damping: float, loss: str = "mse",
                 batch_size: int = 64):
        check_choice(loss, "loss", tuple(_LOSSES))
        self.damping = as_positive_float(damping, "damping (the weight decay λ, > 0 for K-FAC)")
        batch_size = as_count(batch_size, "batch_size")
        module = network.module_copy()
        self.supported, self.diagonal_names = kfac_layers(module, network.names)
        if not self.supported:
            raise ValueError(f"preconditioner='kfac' needs parameters of Linear or Conv2d layers in scope (curvlinops "
                             f"supports only those); the scope {network.names[:4]} has none: add such a layer to "
                             "params, or use preconditioner=None")
        if self.diagonal_names:
            modules = dict(module.named_modules())
            layers = sorted({n.rsplit(".", 1)[0] if "." in n else "" for n in self.diagonal_names})
            layers = [f"{name or 'the network'} ({type(modules[name]).__name__})" for name in layers]
            warnings.warn(f"K-FAC covers Linear and Conv2d layers only: the parameters of {len(layers)} other "
                          f"layer(s) in scope ({', '.join(layers[:6])}{', …' if len(layers) > 6 else ''}) get a "
                          "diagonal block, the exact diagonal of the curvature", RuntimeWarning, stacklevel=3)
        offsets = dict(zip(network.names, torch.tensor([0, *network.numels]).cumsum(0).tolist()))
        sizes = dict(zip(network.names, network.numels))

        def index(names):
            return torch.cat([torch.arange(offsets[n], offsets[n] + sizes[n]) for n in names]).to(network.device) \
                if names else torch.zeros(0, dtype=torch.long, device=network.device)

        self.kfac_index, self.diagonal_index = index(self.supported), index(self.diagonal_names)
        self.num_params = network.num_params
        likelihood, scale = _LOSSES[loss]
        num_outputs = network.num_outputs(x)
        targets = (torch.zeros(x.shape[0], num_outputs, dtype=x.dtype, device=x.device) if loss == "mse"
                   else torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        data = [(x[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        params = dict(module.named_parameters())
        loss_func = nn.MSELoss(reduction="sum") if loss == "mse" else nn.CrossEntropyLoss(reduction="sum")
        self.kfac = KFACLinearOperator(_Flat(module), loss_func, [params[n] for n in self.supported], data,
                                       fisher_type=FisherType.TYPE2, check_deterministic=False,
                                       separate_weight_and_bias=False, num_data=x.shape[0])
        self.kfac.compute_kronecker_factors()  # now: the factors are lazy, and the weights must be θ0
        self.inverse = KFACInverseLinearOperator(self.kfac, damping=self.damping, use_exact_damping=True)
        self.inverse @ torch.zeros(len(self.kfac_index), dtype=x.dtype, device=x.device)  # cache the inverses
        self.diagonal = x.new_zeros(0)
        if self.diagonal_names:
            rest = FunctionalNetwork(module, self.diagonal_names, network.chunk_size,
                                     network.jacobian_chunk_elements)
            self.diagonal = scale * FisherOperator(x, network=rest, likelihood=likelihood, method="exact",
                                                   epsilon=1.0)._diagonal()  # (no step: exact)

    def _blockwise(self, v: Tensor, kfac, diagonal: Tensor) -> Tensor:
        vector = v.dim() == 1
        columns = v.unsqueeze(-1) if vector else v
        out = torch.empty_like(columns)
        out[self.kfac_index] = kfac(columns[self.kfac_index])
        out[self.diagonal_index] = diagonal.unsqueeze(-1) * columns[self.diagonal_index]
        return out.squeeze(-1) if vector else out

    def __matmul__(self, v: Tensor) -> Tensor:
        """(K + λI)⁻¹ v for v (p,) or (p, k)."""
        return self._blockwise(v, lambda u: self.inverse @ u, 1 / (self.diagonal + self.damping))

    def curvature(self, v: Tensor) -> Tensor:
        """(K + λI) v for v (p,) or (p, k)."""
        return self._blockwise(v, lambda u: self.kfac @ u + self.damping * u, self.diagonal + self.damping)
