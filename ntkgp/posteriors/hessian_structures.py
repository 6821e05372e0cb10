"""The posterior precision F + D of a parameter-space Laplace approximation, by Hessian structure.

F = Σ_i J_iᵀ H_i J_i (p × p) is the GGN at the training inputs, D = diag(δ) the prior precision: one δ, or one per
parameter (per-layer precisions expanded to their entries). Each structure holds F's factors in float64 and gives,
for any D, what the posterior needs:

- ``logdet(δ)``: log det(I + D⁻¹F), the evidence's Occam term;
- ``root(δ, z, transpose)``: R z (or Rᵀ z) for a square root R Rᵀ = (F + D)⁻¹, z (p, k): samples are θ_MAP + R z,
  and W = Rᵀ J(x)ᵀ gives the GLM covariance J(x) Σ J(x)ᵀ = WᵀW;
- ``solve(δ, v)``: (F + D)⁻¹ v = R Rᵀ v.

Structures, as laplace-torch names them:

- ``"full"`` (:class:`FullStructure`): F itself, exact. A Cholesky factor of F + D per δ (kept for the last δ), and
  for the evidence over a grid of one-δ priors the eigenvalues of F once (``eigvalsh``, about 8 Cholesky factors).
- ``"kron"`` (:class:`KronStructure`): K-FAC, F ≈ ⊕ (G ⊗ A) over Linear and Conv2d layers (curvlinops-for-pytorch,
  the type-2 Fisher: exact in expectation over the likelihood) and the exact diagonal of F on every other parameter;
  each block eigendecomposed once, δ added to its eigenvalues exactly, as laplace-torch does (one δ per block).
- ``"diag"`` (:class:`DiagStructure`): the exact diagonal of F.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from ..lqf.kfac import KFACPreconditioner, KroneckerBlock

__all__ = [
    "PARAMETER_STRUCTURES",
    "DiagStructure",
    "FullStructure",
    "KronStructure",
    "Structure",
    "StructureCovariance",
    "restore_structure",
]

PARAMETER_STRUCTURES = ("full", "kron", "diag")


def _as_vector(delta: float | Tensor, size: int, like: Tensor) -> Tensor:
    """δ as a (p,) float64 vector on ``like``'s device."""
    return torch.as_tensor(delta, dtype=torch.float64, device=like.device).expand(size)


class Structure:
    """A Hessian structure: F's factors and the posterior quantities at a prior precision δ (a float, or a (p,)
    float64 tensor)."""

    size: int  # p

    def logdet(self, delta: float | Tensor) -> Tensor:
        """log det(I + D⁻¹F), a 0-d float64 tensor."""
        raise NotImplementedError

    def root(self, delta: float | Tensor, z: Tensor, transpose: bool = False) -> Tensor:
        """R z (``transpose``: Rᵀ z) for z (p, k) float64, R Rᵀ = (F + D)⁻¹."""
        raise NotImplementedError

    def solve(self, delta: float | Tensor, v: Tensor) -> Tensor:
        """(F + D)⁻¹ v for v (p, k) float64."""
        return self.root(delta, self.root(delta, v, transpose=True))

    def prepare_grid(self) -> None:
        """Called before the evidence is evaluated at many one-δ priors (nothing to do unless a structure caches)."""

    def covers(self, layout: tuple[list[slice], list[int]]) -> bool:
        """Whether :meth:`layer_quadratic` applies to the Linear layer of this layout (its θ positions: per output,
        the weight row's slice and the bias index, -1 when not selected)."""
        return True

    def layer_quadratic(self, delta: float | Tensor, a: Tensor, rows: list[slice], biases: list[int]) -> Tensor:
        """V (b, d_out, d_out), V_i[o, q] = ã_iᵀ Σ_{oq} ã_i, for one Linear layer whose parameters are all of θ: a
        (b, d_in) float64 its inputs, ã = [a, 1] over the selected entries, Σ_{oq} the block of outputs o and q."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """The factors as plain tensors and numbers (``torch.load(weights_only=True)`` reads them back), for
        :func:`restore_structure`."""
        raise NotImplementedError


@dataclass
class FullStructure(Structure):
    """F (p × p) float64, exact (module docstring)."""

    matrix: Tensor
    _factor: tuple[Tensor, Tensor] | None = field(default=None, repr=False)  # (δ, Cholesky factor of F + D)
    _eigenvalues: Tensor | None = field(default=None, repr=False)
    _inverse: tuple[Tensor, Tensor] | None = field(default=None, repr=False)  # (the factor it came from, Σ)

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.matrix.shape[-1]

    def _cholesky(self, delta: float | Tensor) -> Tensor:
        d = _as_vector(delta, self.size, self.matrix)
        if self._factor is None or not torch.equal(self._factor[0], d):
            self._factor = (d.clone(), torch.linalg.cholesky(self.matrix + torch.diag(d)))
        return self._factor[1]

    def state(self) -> dict[str, Any]:
        return {"kind": "full", "matrix": self.matrix}

    def inverse(self, delta: float | Tensor) -> Tensor:
        """Σ = (F + D)⁻¹ (p × p) float64, explicitly (from the Cholesky factor; kept for the last δ)."""
        factor = self._cholesky(delta)
        if self._inverse is None or self._inverse[0] is not factor:
            self._inverse = (factor, torch.cholesky_inverse(factor))
        return self._inverse[1]

    def layer_quadratic(self, delta: float | Tensor, a: Tensor, rows: list[slice], biases: list[int]) -> Tensor:
        # ã_iᵀ Σ_{oq} ã_i = aᵀ Σ[W_o, W_q] a + aᵀ Σ[W_o, b_q] + aᵀ Σ[W_q, b_o] + Σ[b_o, b_q], one product per o ≤ q
        sigma, d_out = self.inverse(delta), len(rows)
        v = torch.zeros(len(a), d_out, d_out, dtype=torch.float64, device=a.device)
        for o in range(d_out):
            for q in range(o, d_out):
                value = torch.zeros(len(a), dtype=torch.float64, device=a.device)
                if rows[o].stop > rows[o].start:
                    value = value + ((a @ sigma[rows[o], rows[q]]) * a).sum(-1)
                    if biases[q] >= 0:
                        value = value + a @ sigma[rows[o], biases[q]] + a @ sigma[rows[q], biases[o]]
                if biases[o] >= 0:
                    value = value + sigma[biases[o], biases[q]]
                v[:, o, q] = v[:, q, o] = value
        return v

    def prepare_grid(self) -> None:
        if self._eigenvalues is None:
            self._eigenvalues = torch.linalg.eigvalsh(self.matrix).clamp_min(0)

    def logdet(self, delta: float | Tensor) -> Tensor:
        d = _as_vector(delta, self.size, self.matrix)
        if self._eigenvalues is not None and bool((d == d[0]).all()):
            return torch.log1p(self._eigenvalues / d[0]).sum()
        return 2 * self._cholesky(delta).diagonal().log().sum() - d.log().sum()

    def root(self, delta: float | Tensor, z: Tensor, transpose: bool = False) -> Tensor:
        # R = L⁻ᵀ (L Lᵀ = F + D): R Rᵀ = (L Lᵀ)⁻¹; Rᵀ z = L⁻¹ z
        factor = self._cholesky(delta)
        return torch.linalg.solve_triangular(factor.mT if not transpose else factor, z, upper=not transpose)


@dataclass
class DiagStructure(Structure):
    """The exact diagonal of F (p,) float64."""

    diagonal: Tensor

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.diagonal.shape[-1]

    def state(self) -> dict[str, Any]:
        return {"kind": "diag", "diagonal": self.diagonal}

    def layer_quadratic(self, delta: float | Tensor, a: Tensor, rows: list[slice], biases: list[int]) -> Tensor:
        # Σ is diagonal: V_i = diag_o(Σ_a a² s[W_o, a] + s[b_o]), s = 1/(diag F + δ)
        s = 1.0 / (self.diagonal + _as_vector(delta, self.size, self.diagonal))
        v = torch.zeros(len(a), len(rows), dtype=torch.float64, device=a.device)
        for o, (row, bias) in enumerate(zip(rows, biases)):
            if row.stop > row.start:
                v[:, o] += a.square() @ s[row]
            if bias >= 0:
                v[:, o] += s[bias]
        return torch.diag_embed(v)

    def logdet(self, delta: float | Tensor) -> Tensor:
        return torch.log1p(self.diagonal / _as_vector(delta, self.size, self.diagonal)).sum()

    def root(self, delta: float | Tensor, z: Tensor, transpose: bool = False) -> Tensor:
        return z * (self.diagonal + _as_vector(delta, self.size, self.diagonal)).rsqrt().unsqueeze(-1)


@dataclass
class KronStructure(Structure):
    """K-FAC blocks G ⊗ A (float64 eigenpairs, the scale of F in G's eigenvalues) and the exact diagonal of F on the
    other parameters (positions ``diagonal_index``, values ``diagonal``); :meth:`of` builds it from curvlinops'."""

    blocks: list[KroneckerBlock]
    diagonal_index: Tensor
    diagonal: Tensor
    size: int

    @classmethod
    def of(cls, kfac: KFACPreconditioner, scale: float, size: int) -> KronStructure:
        """From :class:`~ntkgp.lqf.kfac.KFACPreconditioner`'s factors, F ≈ ``scale`` · K."""
        blocks = [
            KroneckerBlock(
                block.index,
                block.rows,
                None if block.input_vectors is None else block.input_vectors.double(),
                None if block.input_values is None else block.input_values.double(),
                block.output_vectors.double(),
                block.output_values.double() * scale,
            )
            for block in kfac.blocks
        ]
        return cls(blocks, kfac.diagonal_index, kfac.diagonal.double() * scale, size)

    def state(self) -> dict[str, Any]:
        blocks = [{f.name: getattr(block, f.name) for f in fields(block)} for block in self.blocks]
        return {
            "kind": "kron",
            "blocks": blocks,
            "index": self.diagonal_index,
            "diagonal": self.diagonal,
            "size": self.size,
        }

    def covers(self, layout: tuple[list[slice], list[int]]) -> bool:
        # one block over the layer, its entries in the (o, [a, 1]) order, and no diagonal part
        return (
            len(self.blocks) == 1
            and self.diagonal_index.numel() == 0
            and torch.equal(self.blocks[0].index.cpu(), _layer_order(*layout))
        )

    def layer_quadratic(self, delta: float | Tensor, a: Tensor, rows: list[slice], biases: list[int]) -> Tensor:
        # Σ = δ⁻¹I + (Q_G ⊗ Q_A) diag(w) (Q_G ⊗ Q_A)ᵀ, w = 1/(λ_g λ_a + δ) − 1/δ:
        # V_i = δ⁻¹ ‖ã_i‖² I + Q_G diag_k(Σ_r w_kr (Q_Aᵀ ã_i)_r²) Q_Gᵀ
        block = self.blocks[0]
        d = self._block_delta(delta, block.index)
        columns = ([a] if rows[0].stop > rows[0].start else []) + (
            [torch.ones_like(a[:, :1])] if biases[0] >= 0 else []
        )
        augmented = torch.cat(columns, 1)  # (b, d')
        u = augmented @ block.input_vectors if block.input_vectors is not None else augmented  # (b, r_a)
        weights = 1.0 / (block.values() + d) - 1.0 / d  # (r_g, r_a)
        core = u.square() @ weights.mT  # (b, r_g)
        qg = block.output_vectors
        eye = torch.eye(len(rows), dtype=torch.float64, device=a.device)
        return (augmented.square().sum(-1) / d)[:, None, None] * eye + (qg * core[:, None, :]) @ qg.mT

    def _block_delta(self, delta: float | Tensor, index: Tensor) -> float:
        """The one δ of a block's entries (K-FAC adds δ to the Kronecker eigenvalues exactly for one δ only)."""
        if not isinstance(delta, Tensor):
            return float(delta)
        values = delta.expand(self.size)[index]
        if not bool((values == values[0]).all()):
            raise ValueError(
                "hessian_structure='kron' needs one prior precision per K-FAC block (a layer's weight and bias "
                "together): give its weight and bias the same precision, or use 'full' or 'diag'"
            )
        return float(values[0])

    def logdet(self, delta: float | Tensor) -> Tensor:
        total = torch.zeros((), dtype=torch.float64, device=self.diagonal.device)
        for block in self.blocks:
            total = total + torch.log1p(block.values() / self._block_delta(delta, block.index)).sum()
        rest = _as_vector(delta, self.size, self.diagonal)[self.diagonal_index]
        return total + torch.log1p(self.diagonal / rest).sum()

    def root(self, delta: float | Tensor, z: Tensor, transpose: bool = False) -> Tensor:
        out = torch.empty_like(z)  # R = (K + D)^{-1/2}, symmetric
        for block in self.blocks:
            out[block.index] = block.apply(z[block.index], self._block_delta(delta, block.index), -0.5)
        rest = _as_vector(delta, self.size, self.diagonal)[self.diagonal_index]
        out[self.diagonal_index] = z[self.diagonal_index] * (self.diagonal + rest).rsqrt().unsqueeze(-1)
        return out

    def solve(self, delta: float | Tensor, v: Tensor) -> Tensor:
        out = torch.empty_like(v)
        for block in self.blocks:
            out[block.index] = block.apply(v[block.index], self._block_delta(delta, block.index), -1.0)
        rest = _as_vector(delta, self.size, self.diagonal)[self.diagonal_index]
        out[self.diagonal_index] = v[self.diagonal_index] / (self.diagonal + rest).unsqueeze(-1)
        return out


class StructureCovariance(LinearOperator):
    """Σ = (F + D)⁻¹ (p × p) of a structure at prior precision δ as a lazy operator: products by its solve, in
    float64, returned in the dtype of ``anchor`` (a 0-d tensor: linear_operator reads dtype and device from it)."""

    def __init__(self, anchor: Tensor, *, structure: Structure, delta: float | Tensor):
        super().__init__(anchor, structure=structure, delta=delta)
        self.anchor, self.structure, self.delta = anchor, structure, delta

    @classmethod
    def of(cls, structure: Structure, delta: float | Tensor, dtype: torch.dtype) -> StructureCovariance:
        anchor = torch.zeros((), dtype=dtype, device=_device(structure))
        return cls(anchor, structure=structure, delta=delta)

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.structure.solve(self.delta, rhs.double()).to(rhs.dtype)

    def _size(self) -> torch.Size:
        return torch.Size((self.structure.size, self.structure.size))

    def _transpose_nonbatch(self) -> LinearOperator:
        return self


def _device(structure: Structure) -> torch.device:
    """The device a structure's factors are on."""
    held = [value for value in vars(structure).values() if isinstance(value, Tensor)]
    return held[0].device


def restore_structure(state: dict[str, Any]) -> Structure:
    """The structure saved by :meth:`Structure.state`."""
    if state["kind"] == "full":
        return FullStructure(state["matrix"])
    if state["kind"] == "diag":
        return DiagStructure(state["diagonal"])
    blocks = [KroneckerBlock(**block) for block in state["blocks"]]
    return KronStructure(blocks, state["index"], state["diagonal"], state["size"])


def _layer_order(rows: list[slice], biases: list[int]) -> Tensor:
    """θ positions of one Linear layer in the (output, [inputs, bias]) order of its K-FAC block."""
    order = [list(range(row.start, row.stop)) + ([bias] if bias >= 0 else []) for row, bias in zip(rows, biases)]
    return torch.tensor([i for entries in order for i in entries], dtype=torch.long)
