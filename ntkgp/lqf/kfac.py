"""K-FAC preconditioning of the (constant) curvature of LQF, with curvlinops-for-pytorch's factors.

The LQF objective Σ_i ℓ(f_lin(x_i), y_i) + (λ/2)‖θ − θ0‖² has the Hessian H = Σ_i J_iᵀ H_i J_i + λI at every
θ for the MSE loss (H_i = 2I) and at θ0 for cross-entropy (H_i = diag π − ππᵀ, the type-2 Fisher). Its K-FAC
approximation K (Martens & Grosse 2015; Grosse & Martens 2016 for Conv2d) is computed once, by curvlinops'
``KFACLinearOperator`` with the type-2 Fisher and the loss summed (``MSELoss(reduction="sum")``, whose loss
Hessian is 2I: K approximates 2·JᵀJ, exactly the curvature of the sum of squares). A layer's weight and bias
form one block (``separate_weight_and_bias=False``, the inputs augmented by a constant 1, as Martens & Grosse):
for one Linear layer K is then exactly 2JᵀJ, where separate blocks miss the weight-bias coupling of features
with a non-zero mean (measured: the preconditioned condition number of a last layer went from 187 to 1).
(K + λI)⁻¹ is applied exactly in the eigenbasis of each layer's factors G ⊗ A, restricted to their ranges
(:class:`KroneckerBlock`; equal to curvlinops' ``KFACInverseLinearOperator(K, damping=λ, use_exact_damping=True)``).
Only Linear and ungrouped Conv2d layers get a K-FAC block; every other parameter in scope (BatchNorm or
LayerNorm affine weights, embeddings, grouped convolutions: :func:`kfac_layers`) gets a diagonal block, the
exact diagonal of the curvature, computed once from per-sample Jacobians (``FisherOperator._diagonal``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..distributed import global_rows
from ..functional import FunctionalNetwork
from ..functional.network_output import OutputSelector, select_output
from ..inputs import Inputs, Layout, call_arguments, convert, inputs_at, layout, leaves, length
from ..operators.fisher_operator import FisherOperator
from ..validation import as_count, as_positive_float, check_choice

__all__ = ["KFACPreconditioner", "KroneckerBlock", "kfac_layers"]

_LOSSES = {"mse": ("gaussian", 2.0), "cross_entropy": ("categorical", 1.0)}  # likelihood H_i, its scale


def kfac_layers(module: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """Split parameter names into those of Linear and ungrouped Conv2d layers (K-FAC) and the others (diagonal);
    raise if there are none of the first kind.

    Grouped (depthwise) convolutions go to the diagonal too: curvlinops' K-FAC shares one input covariance,
    averaged over the groups, between all of them, which on MobileNetV2's depthwise 3 × 3 convolution
    underestimated the curvature of one channel's filter 8·10⁴-fold (the top eigenvalue of P⁻¹H, 30 images)."""
    owners = {
        f"{prefix}.{n}" if prefix else n: m
        for prefix, m in module.named_modules()
        for n, _ in m.named_parameters(recurse=False)
    }
    supported = [
        n
        for n in names
        if isinstance(owners[n], nn.Linear) or (isinstance(owners[n], nn.Conv2d) and owners[n].groups == 1)
    ]
    if not supported:
        raise ValueError(
            f"preconditioner='kfac' needs parameters of Linear or ungrouped Conv2d layers in scope "
            f"(curvlinops supports only those); the scope {names[:4]} has none: add such a layer to "
            "params, or use preconditioner=None"
        )
    return supported, [n for n in names if n not in supported]


def _positions(network: FunctionalNetwork, name: str) -> Tensor:
    """The positions of parameter ``name``'s entries in θ."""
    i = network.names.index(name)
    start = sum(network.numels[:i])
    return torch.arange(start, start + network.numels[i], device=network.device)


def _range_eigenpairs(matrix: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(eigenvalues (r,), eigenvectors (d, r)) of a symmetric PSD Kronecker factor on its numerical range
    (eigenvalues above d·eps·λ_max of float64, the rest are zero), computed in float64, returned in ``dtype``.
    An SVD (U S Uᵀ for a PSD matrix) where LAPACK's eigh does not converge: ResNet-18's zero-padded 3 × 3
    patches give input covariances with many exactly-zero eigenvalues, on which it failed."""
    matrix = matrix.double()
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        vectors, values, _ = torch.linalg.svd(matrix)
    keep = values > matrix.shape[-1] * torch.finfo(torch.float64).eps * values.abs().max().clamp_min(1e-300)
    return values[keep].to(dtype), vectors[:, keep].to(dtype)


class _Flat(nn.Module):
    """The network's f as (n, C), the shape curvlinops' losses take, for inputs as curvlinops holds them: a tensor, or
    a dict of the tensors of inputs of ``held`` layout (curvlinops takes a tensor or a mapping)."""

    def __init__(self, net: nn.Module, held: Layout, output: OutputSelector | None):
        super().__init__()
        self.net, self.held, self.output = net, held, output

    def forward(self, x: Tensor | dict[str, Tensor]) -> Tensor:
        offset = None if isinstance(x, Tensor) else x.get("offset")
        inputs = x if isinstance(x, Tensor) else self.held.build([t for k, t in x.items() if k != "offset"])
        args, kwargs = call_arguments(inputs)
        out = select_output(self.net(*args, **kwargs), self.output).reshape(length(inputs), -1)
        return out if offset is None else out + offset


def _as_curvlinops_inputs(x: Inputs, offset: Tensor | None = None) -> Tensor | dict[str, Tensor]:
    """x as curvlinops takes inputs: a tensor, or a dict of its tensors by name or position (and the outputs'
    ``offset`` under the key "offset", which :class:`_Flat` adds)."""
    if isinstance(x, Tensor) and offset is None:
        return x
    held = {f"{i}": t for i, t in enumerate(leaves(x))}
    return held if offset is None else {**held, "offset": offset}


def _groups(names: list[str], separate: bool) -> list[list[str]]:
    """The parameters of one layer's K-FAC block(s): all together, or (``separate``) one block each."""
    return [[name] for name in names] if separate else [names]


class KFACPreconditioner:
    """(K + λI)⁻¹, K the K-FAC of Σ_i J_iᵀ H_i J_i over inputs x (n, ...) at θ0: a (p × p) operator.

    Args:
        network: the linearisation (its snapshot at θ0 is what K describes).
        x: training inputs (n, ...).
        damping: λ > 0, the weight decay of the LQF objective.
        loss: ``"mse"`` (H_i = 2I: K ≈ 2JᵀJ) or ``"cross_entropy"`` (H_i = diag π − ππᵀ at f(x_i; θ0), labels
            not used: the type-2 Fisher).
        batch_size: inputs per forward pass while the factors are accumulated.
        offset: (n, C) added to the outputs f(x; θ0) where H_i is evaluated (cross-entropy: the Laplace posterior's
            linearised MAP outputs f0 + J Δ), constant in θ: the Jacobians stay those at θ0. Default none.
        separate_weight_and_bias: one block per weight (G ⊗ A) and per bias (G), as laplace-torch forms them,
            instead of one block per layer over both (the default, which keeps their coupling).

    The factors and the eigendecompositions of the damped inverse are computed here, once, in float64 (float32's
    eigh of a gradient covariance factor of MobileNetV2's last block failed to converge), then kept in the
    network's dtype for the products. ``@`` applies (K + λI)⁻¹ to vectors
    (p,) or (p, k); :meth:`curvature` applies K + λI. Raises if no parameter in scope belongs to a Linear or
    Conv2d layer; warns once naming the layers that get a diagonal block instead.
    """

    def __init__(
        self,
        network: FunctionalNetwork,
        x: Inputs,
        damping: float,
        loss: str = "mse",
        batch_size: int = 64,
        offset: Tensor | None = None,
        separate_weight_and_bias: bool = False,
    ):
        try:  # imported here: `import ntkgp` stays light and works where curvlinops is not installed
            from curvlinops import KFACLinearOperator
            from curvlinops.kfac import FisherType
        except ImportError as err:
            raise ImportError(
                "preconditioner='kfac' needs curvlinops-for-pytorch 3.0.x: pip install "
                "'curvlinops-for-pytorch>=3.0.1,<3.1' (or use preconditioner=None)"
            ) from err
        check_choice(loss, "loss", tuple(_LOSSES))
        self.damping = as_positive_float(damping, "damping (the weight decay λ, > 0 for K-FAC)")
        batch_size = as_count(batch_size, "batch_size")
        num_outputs = network.num_outputs(x)
        source, num_data = x, global_rows(network, x)
        x = convert(network.features(x), dtype=torch.float64)  # the frozen prefix's output (cached): the rest only
        module = network.module_copy(suffix=network.splits(source)).double()  # float64 factors (see above)
        self.supported, self.diagonal_names = kfac_layers(module, network.names)
        likelihood, scale = _LOSSES[loss]
        targets = (
            torch.zeros(length(x), num_outputs, dtype=torch.float64, device=network.device)
            if loss == "mse"
            else torch.zeros(length(x), dtype=torch.long, device=network.device)
        )
        data = [
            (
                _as_curvlinops_inputs(
                    inputs_at(x, slice(i, i + batch_size)), None if offset is None else offset[i : i + batch_size]
                ),
                targets[i : i + batch_size],
            )
            for i in range(0, length(x), batch_size)
        ]
        params = dict(module.named_parameters())
        loss_func = nn.MSELoss(reduction="sum") if loss == "mse" else nn.CrossEntropyLoss(reduction="sum")
        flat = _Flat(module, layout(x), network.output)
        self.kfac = KFACLinearOperator(
            flat,
            loss_func,
            [params[n] for n in self.supported],
            data,
            fisher_type=FisherType.TYPE2,
            check_deterministic=False,
            separate_weight_and_bias=separate_weight_and_bias,
            num_data=length(x),
            batch_size_fn=lambda inputs: length(inputs),
        )
        self.kfac.compute_kronecker_factors()  # now: the factors are lazy, and the weights must be θ0
        factors = self.kfac.state_dict()
        if network.is_sharded(source):  # ntkgp.distributed: G = Σ g gᵀ, and A = Σ a aᵀ / n over this rank's n inputs
            share = {"input_covariances": length(x) / num_data, "gradient_covariances": 1.0}
            for kind in ("input_covariances", "gradient_covariances"):
                factors[kind] = {
                    name: network.sum_over_shards(source, share[kind] * factor)
                    for name, factor in sorted(factors[kind].items())
                }
        mapping = self.kfac.compute_parameter_mapping([params[n] for n in self.supported], flat)
        # a layer whose weights the network uses without calling the module (nn.MultiheadAttention's out_proj goes
        # through F.multi_head_attention_forward) has no factors: it gets a diagonal block like unsupported layers
        unseen = [name for name in mapping if name not in factors["gradient_covariances"]]
        for name in unseen:
            self.diagonal_names += [self.supported[i] for i in mapping[name].values()]
        self.diagonal_names = [n for n in network.names if n in set(self.diagonal_names)]
        self.blocks = [
            _block(
                network,
                names,
                None if names == [n for n in names if n.endswith("bias")] else factors["input_covariances"].get(name),
                factors["gradient_covariances"][name],
            )
            for name, positions in mapping.items()
            if name not in unseen
            for names in _groups([self.supported[i] for i in positions.values()], separate_weight_and_bias)
        ]
        if self.diagonal_names:
            modules = dict(module.named_modules())
            layers = sorted({n.rsplit(".", 1)[0] if "." in n else "" for n in self.diagonal_names})
            layers = [f"{name or 'the network'} ({type(modules[name]).__name__})" for name in layers]
            warnings.warn(
                f"K-FAC covers Linear and ungrouped Conv2d layers called as modules only: the parameters of "
                f"{len(layers)} other layer(s) in scope ({', '.join(layers[:6])}{', …' if len(layers) > 6 else ''}) "
                "get a diagonal block, the exact diagonal of the curvature",
                RuntimeWarning,
                stacklevel=3,
            )
        self.diagonal_index = (
            torch.cat([_positions(network, n) for n in self.diagonal_names])
            if self.diagonal_names
            else torch.zeros(0, dtype=torch.long, device=network.device)
        )
        self.diagonal = torch.zeros(0, dtype=torch.float64, device=network.device)
        if self.diagonal_names:
            rest = network.restricted(self.diagonal_names)  # shares the prefix outputs of ``source``
            self.diagonal = scale * network.sum_over_shards(
                source,
                FisherOperator.of(source, network=rest, likelihood=likelihood, method="exact", epsilon=1.0)._diagonal(),
            )  # (exact)
        self.diagonal = self.diagonal.to(network.dtype)

    def _blockwise(self, v: Tensor, inverse: bool) -> Tensor:
        """(K + λI)⁻¹ v (``inverse``) or (K + λI) v, block by block, for v (p,) or (p, k)."""
        vector = v.dim() == 1
        columns = v.unsqueeze(-1) if vector else v
        out = torch.empty_like(columns)
        for block in self.blocks:
            out[block.index] = block.apply(columns[block.index], self.damping, -1.0 if inverse else 1.0)
        diagonal = self.diagonal + self.damping
        out[self.diagonal_index] = (1 / diagonal if inverse else diagonal).unsqueeze(-1) * columns[self.diagonal_index]
        return out.squeeze(-1) if vector else out

    def __matmul__(self, v: Tensor) -> Tensor:
        """(K + λI)⁻¹ v for v (p,) or (p, k)."""
        return self._blockwise(v, inverse=True)

    def curvature(self, v: Tensor) -> Tensor:
        """(K + λI) v for v (p,) or (p, k)."""
        return self._blockwise(v, inverse=False)


@dataclass
class KroneckerBlock:
    """One layer's K-FAC block G ⊗ A on its parameters as a (d_out × d_in) matrix (a Conv2d weight flattened
    to (c_out, c_in·k·k), the bias appended as a last column): the eigenpairs of A and G on their ranges."""

    index: Tensor  # positions of the block's entries in θ, in the order of the matrix (row-major)
    rows: int
    input_vectors: Tensor | None  # (d_in, r_a); None: A = 1 (a bias alone)
    input_values: Tensor | None  # (r_a,)
    output_vectors: Tensor  # (d_out, r_g)
    output_values: Tensor  # (r_g,)

    def apply(self, columns: Tensor, damping: float, power: float) -> Tensor:
        """(G ⊗ A + λI)^power on columns (size, k) (power 1, −1 or −½: a product, a solve, a symmetric root of the
        inverse). On the ranges of G and A the eigenvalues are λ_g λ_a + λ, elsewhere λ:
        M ↦ λ^power M + Q_G [(w − λ^power) ⊙ (Q_Gᵀ M Q_A)] Q_Aᵀ, w = (λ_g λ_aᵀ + λ)^power. Restricting Q_A to A's
        range is exact and the cost O(d_out·d_in·r_a): ResNet-18's layer4 at 32 × 32 has d_in = 4608 and r_a ≤ the
        number of inputs."""
        k = columns.shape[-1]
        m = columns.mT.reshape(k, self.rows, -1)
        scale = damping**power
        weights = (self.values() + damping) ** power - scale
        qa, qg = self.input_vectors, self.output_vectors
        reduced = m if qa is None else m @ qa
        core = qg.mT @ reduced * weights
        back = qg @ core
        if qa is not None:
            back = back @ qa.mT
        return (scale * m + back).reshape(k, -1).mT

    def values(self) -> Tensor:
        """The block's eigenvalues on the ranges of G and A, λ_g λ_aᵀ (r_g, r_a)."""
        return self.output_values[:, None] * (1.0 if self.input_values is None else self.input_values)


def _block(
    network: FunctionalNetwork, names: list[str], input_covariance: Tensor | None, gradient_covariance: Tensor
) -> KroneckerBlock:
    """The block of one layer: its parameters ``names`` (weight and/or bias, in θ order) and K-FAC factors."""
    weight = next((n for n in names if n.endswith("weight")), None)
    bias = next((n for n in names if n.endswith("bias")), None)
    rows = network.shapes[network.names.index(weight or names[0])][0]  # names: the weight and/or the bias
    parts = [_positions(network, n).reshape(rows, -1) for n in (weight, bias) if n is not None]
    index = torch.cat(parts, dim=1).reshape(-1)
    input_vectors = input_values = None
    if input_covariance is not None:
        input_values, input_vectors = _range_eigenpairs(input_covariance, network.dtype)
    output_values, output_vectors = _range_eigenpairs(gradient_covariance, network.dtype)
    return KroneckerBlock(index, rows, input_vectors, input_values, output_vectors, output_values)
