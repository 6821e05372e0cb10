"""Square-root covariance (bilinear) pooling, the head of B-LQF, in plain torch ops so that torch.func
transforms it (forward mode included).

For a feature map X (n, c, h, w): Σ = (1/M) Σ_m (x_m − x̄)(x_m − x̄)ᵀ over the M = h·w positions (c × c);
its square root by the coupled Newton–Schulz iteration of iSQRT-COV (Li et al. 2018): A = Σ / tr Σ,
Y₀ = A, Z₀ = I, T = ½(3I − Z Y), Y ← Y T, Z ← T Z; then Σ^{1/2} ≈ √(tr Σ) · Y (the iteration converges
for eigenvalues of A in (0, 1], which the trace normalisation gives). The upper triangle (with the diagonal)
is flattened: c(c + 1)/2 features per input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..validation import as_count

__all__ = ["SqrtCovariancePooling", "newton_schulz_sqrt"]


def newton_schulz_sqrt(sigma: Tensor, iterations: int = 5) -> Tensor:
    """Σ^{1/2} (..., c, c) of symmetric PSD matrices by ``iterations`` coupled Newton–Schulz steps with trace
    pre-normalisation and √trace post-compensation. (Σ = 0 gives 0.)"""
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    safe = torch.where(trace > 0, trace, torch.ones_like(trace))
    y, z = sigma / safe, eye.expand_as(sigma)
    for _ in range(iterations):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * safe.sqrt() * (trace > 0)


class SqrtCovariancePooling(nn.Module):
    """Feature maps (n, c, h, w) -> (n, d(d + 1)/2): the upper triangle of the square root of the channel
    covariance, d = ``reduction`` or c.

    Args:
        in_channels: c.
        reduction: channels after an optional 1 × 1 convolution (no bias) applied first; MobileNetV2's 1280
            channels would give 820k features without it. Without training, its weight is initialised to a
            random semi-orthogonal matrix (``torch.nn.init.orthogonal_``, rows orthonormal, from ``seed``): the
            pooled covariance is then P Σ Pᵀ, a random orthonormal compression of Σ. :meth:`init_pca` sets it
            to the top principal directions of the channels on given feature maps instead.
        iterations: Newton–Schulz steps (5, as iSQRT-COV).
        seed: for the random initialisation of the reduction.
    """

    index: Tensor  # flat positions of the upper triangle, a buffer

    def __init__(self, in_channels: int, reduction: int | None = None, iterations: int = 5, seed: int = 0):
        super().__init__()
        self.in_channels = as_count(in_channels, "in_channels")
        self.iterations = as_count(iterations, "iterations")
        self.reduce: nn.Conv2d | None = None
        if reduction is not None:
            reduction = as_count(reduction, "reduction")
            if reduction > self.in_channels:
                raise ValueError(
                    f"reduction = {reduction} exceeds in_channels = {self.in_channels}: it is the "
                    "number of channels kept"
                )
            self.reduce = nn.Conv2d(self.in_channels, reduction, 1, bias=False)
            with torch.no_grad():
                weight = torch.empty(reduction, self.in_channels)
                nn.init.orthogonal_(weight, generator=torch.Generator().manual_seed(seed))
                self.reduce.weight.copy_(weight[:, :, None, None])
        self.channels = self.in_channels if reduction is None else reduction
        rows, cols = torch.triu_indices(self.channels, self.channels)
        self.register_buffer("index", rows * self.channels + cols, persistent=False)

    @property
    def out_features(self) -> int:
        """d(d + 1)/2."""
        return self.channels * (self.channels + 1) // 2

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SqrtCovariancePooling takes feature maps (n, {self.in_channels}, h, w), got {tuple(x.shape)}"
            )
        if self.reduce is not None:
            x = self.reduce(x)
        features = x.flatten(2)  # (n, d, M)
        centred = features - features.mean(-1, keepdim=True)
        sigma = centred @ centred.mT / features.shape[-1]
        root = newton_schulz_sqrt(sigma, self.iterations)
        return root.flatten(1)[:, self.index]

    @torch.no_grad()
    def init_pca(self, feature_maps: Tensor) -> SqrtCovariancePooling:
        """Set the 1 × 1 reduction to the top ``reduction`` principal directions of the channel vectors of
        ``feature_maps`` (n, c, h, w) (eigenvectors of their covariance over all inputs and positions)."""
        if self.reduce is None:
            raise ValueError("init_pca sets the 1 × 1 reduction: build the pooling with reduction=")
        channels = feature_maps.transpose(0, 1).flatten(1)  # (c, n·M)
        centred = channels - channels.mean(-1, keepdim=True)
        _, vectors = torch.linalg.eigh(centred @ centred.mT)
        top = vectors[:, -self.channels :].flip(-1).mT  # (d, c), largest first
        self.reduce.weight.copy_(top.to(self.reduce.weight)[:, :, None, None])
        return self
