"""ntkgp: Gaussian processes from pretrained PyTorch networks through their finite neural tangent kernel."""

from .functional import FunctionalNetwork
from .gram_operator import GramOperator, gram_operator
from .ntk_operator import NTKOperator, ntk_operator

__all__ = ["FunctionalNetwork", "GramOperator", "NTKOperator", "gram_operator", "ntk_operator"]
