"""ntkgp: Gaussian processes from pretrained PyTorch networks through their finite neural tangent kernel."""

import warnings

with warnings.catch_warnings():  # linear_operator uses torch.jit.script, deprecated in torch 2.14
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
    import gpytorch  # noqa: F401
    import linear_operator  # noqa: F401

from .fisher_operator import FisherOperator, fisher_operator
from .functional import FunctionalNetwork
from .gram_operator import GramOperator, gram_operator
from .kernel import NTKKernel
from .laplace import Laplace, PosteriorCovariance
from .mean import NetworkMean
from .ntk_gp import NTKGP, Prediction
from .ntk_operator import NTKOperator, ntk_operator
from .solver import Solver
from .svi import SVI

__all__ = ["FisherOperator", "FunctionalNetwork", "GramOperator", "Laplace", "NTKGP", "NTKKernel", "NTKOperator",
           "NetworkMean", "PosteriorCovariance", "Prediction", "SVI", "Solver", "fisher_operator", "gram_operator",
           "ntk_operator"]
