"""Output-space likelihoods for Fisher products: their Fisher H(f) in the outputs and their KL divergence.

For outputs f (n, C) of a network, each likelihood gives
- ``fisher(f, u)``: H(f) u per input, u (..., n, C) -> (..., n, C) (H is block-diagonal over inputs);
- ``kl(f, g)``: Σ_i KL(p(y | f_i) ‖ p(y | g_i)), whose Hessian in g at g = f is H(f);
- ``kl_gradient(f, g)``: ∇_g of that KL (n, C), written so that it stays accurate when g is close to f
  (``expm1`` instead of differences of exponentials): what finite-difference Fisher products need;
- ``check(num_outputs)``: raise if the network's output width does not fit the likelihood.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Categorical", "Gaussian", "HeteroscedasticGaussian", "get_likelihood", "hessian_blocks", "psd_roots"]


class Gaussian:
    """y ~ N(f, I): H = I, KL = ½‖f − g‖² (scale by 1/σ² outside for another noise)."""

    name = "gaussian"

    def check(self, num_outputs: int) -> None:
        return None

    def fisher(self, f: Tensor, u: Tensor) -> Tensor:
        return u

    def kl(self, f: Tensor, g: Tensor) -> Tensor:
        return 0.5 * (f - g).square().sum()

    def kl_gradient(self, f: Tensor, g: Tensor) -> Tensor:
        return g - f


class Categorical:
    """y ~ Categorical(softmax(f)): H = diag(π) − ππᵀ, KL = Σ π (log π − log π')."""

    name = "categorical"

    def check(self, num_outputs: int) -> None:
        if num_outputs < 2:
            raise ValueError(
                f"a categorical likelihood needs a network with C >= 2 outputs (logits), got C = "
                f"{num_outputs}; use likelihood='gaussian' for a single output"
            )

    def fisher(self, f: Tensor, u: Tensor) -> Tensor:
        pi = torch.softmax(f, dim=-1)
        return pi * u - pi * (pi * u).sum(-1, keepdim=True)

    def kl(self, f: Tensor, g: Tensor) -> Tensor:
        log_p = torch.log_softmax(f, dim=-1)
        return (log_p.exp() * (log_p - torch.log_softmax(g, dim=-1))).sum()

    def kl_gradient(self, f: Tensor, g: Tensor) -> Tensor:
        """softmax(g) − softmax(f) = π ⊙ expm1(δ − log1p(Σ π expm1 δ)), δ = g − f."""
        pi, delta = torch.softmax(f, dim=-1), g - f
        shift = torch.log1p((pi * torch.expm1(delta)).sum(-1, keepdim=True))
        return pi * torch.expm1(delta - shift)


class HeteroscedasticGaussian:
    """y ~ N(μ, exp(η)) with outputs f = [μ (D), η (D)]: H = diag(exp(−η), ½) per output pair."""

    name = "heteroscedastic"

    def check(self, num_outputs: int) -> None:
        if num_outputs % 2:
            raise ValueError(
                f"a heteroscedastic Gaussian needs outputs [mean, log-variance] of even width, got C = {num_outputs}"
            )

    def fisher(self, f: Tensor, u: Tensor) -> Tensor:
        d = f.shape[-1] // 2
        return torch.cat([u[..., :d] * torch.exp(-f[..., d:]), 0.5 * u[..., d:]], dim=-1)

    def kl(self, f: Tensor, g: Tensor) -> Tensor:
        d = f.shape[-1] // 2
        (mu_f, eta_f), (mu_g, eta_g) = (f[..., :d], f[..., d:]), (g[..., :d], g[..., d:])
        return 0.5 * (eta_g - eta_f + (torch.exp(eta_f) + (mu_f - mu_g).square()) * torch.exp(-eta_g) - 1).sum()

    def kl_gradient(self, f: Tensor, g: Tensor) -> Tensor:
        d = f.shape[-1] // 2
        (mu_f, eta_f), (mu_g, eta_g) = (f[..., :d], f[..., d:]), (g[..., :d], g[..., d:])
        grad_mu = (mu_g - mu_f) * torch.exp(-eta_g)
        grad_eta = -0.5 * (torch.expm1(eta_f - eta_g) + (mu_f - mu_g).square() * torch.exp(-eta_g))
        return torch.cat([grad_mu, grad_eta], dim=-1)


_LIKELIHOODS = {cls.name: cls for cls in (Gaussian, Categorical, HeteroscedasticGaussian)}


def get_likelihood(name: str) -> Gaussian | Categorical | HeteroscedasticGaussian:
    """The likelihood called ``name`` ("gaussian", "categorical", "heteroscedastic")."""
    if not isinstance(name, str) or name not in _LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(_LIKELIHOODS)}")
    return _LIKELIHOODS[name]()


def hessian_blocks(likelihood: Gaussian | Categorical | HeteroscedasticGaussian, f: Tensor) -> Tensor:
    """The likelihood's Hessian in the outputs as blocks H_i (n, C, C) at outputs f (n, C): its Fisher applied to the
    identity."""
    eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
    return likelihood.fisher(f.unsqueeze(1), eye.expand(f.shape[0], -1, -1))


def psd_roots(blocks: Tensor) -> Tensor:
    """Symmetric square roots of PSD blocks (n, C, C) (negative rounding in the eigenvalues clamped to 0)."""
    evals, evecs = torch.linalg.eigh(blocks)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.mT
