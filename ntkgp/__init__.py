"""ntkgp: Gaussian processes from pretrained PyTorch networks through their finite neural tangent kernel."""

from .functional import FunctionalNetwork
from .gram_operator import GramOperator, gram_operator
from .kernel import NTKKernel
from .mean import NetworkMean
from .ntk_gp import NTKGP, Prediction
from .ntk_operator import NTKOperator, ntk_operator
from .solver import Solver

__all__ = ["FunctionalNetwork", "GramOperator", "NTKGP", "NTKKernel", "NTKOperator", "NetworkMean", "Prediction",
           "Solver", "gram_operator", "ntk_operator"]
