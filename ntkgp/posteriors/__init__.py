"""Layer 4: posteriors over the weights of the linearised network f0 + J Δ — Laplace and mean-field SVI."""

from .laplace import Laplace, PosteriorCovariance
from .svi import SVI

__all__ = ["Laplace", "PosteriorCovariance", "SVI"]
