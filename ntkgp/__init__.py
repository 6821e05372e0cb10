"""ntkgp: Gaussian processes from pretrained PyTorch networks through their finite neural tangent kernel."""

import warnings

with warnings.catch_warnings():  # linear_operator uses torch.jit.script, deprecated in torch 2.14
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
    import gpytorch  # noqa: F401
    import linear_operator  # noqa: F401

from .functional import FunctionalNetwork
from .gp import NTKGP, JacobianKernel, NetworkMean, Prediction, Solver
from .lqf import LQF, KFACPreconditioner, LeakyReLU6, SqrtCovariancePooling, leaky_relu
from .operators import (FisherOperator, GramOperator, LayerKernel, NTKOperator, fisher_operator, gram_operator,
                        ntk_operator)
from .posteriors import SVI, Laplace, PosteriorCovariance

__all__ = ["FisherOperator", "FunctionalNetwork", "GramOperator", "JacobianKernel", "KFACPreconditioner", "LQF",
           "Laplace", "LayerKernel", "LeakyReLU6", "NTKGP", "NTKOperator", "NetworkMean", "PosteriorCovariance",
           "Prediction", "SVI", "Solver", "SqrtCovariancePooling", "fisher_operator", "gram_operator", "leaky_relu",
           "ntk_operator"]
